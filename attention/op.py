"""USP attention as a ``torch.library`` custom op, so that ``torch.compile`` keeps it inside its graph.

Traced by ``torch.compile``, :func:`~attention.usp.usp_attention` would break the graph: its collectives,
host-side length bookkeeping and rank-agreement check are not traceable. Registered as one custom op,
``xdit::usp_attention``, it is a single node the compiler does not look into: a fake (meta)
implementation gives the output shapes (those of the inputs), and an autograd formula makes it
differentiable. So ``torch.compile(block, fullgraph=True)`` compiles a whole parallel transformer block.

* :func:`usp_attention_op` is :func:`~attention.usp.usp_attention` (``seq_len``, ``joint`` and ``backend``)
  through the op. The model processors call :func:`usp_attention_compilable` (and
  :func:`attention_compilable`), which takes the op while ``torch.compile`` traces them and the function
  directly when they run eagerly (the op's dispatch costs host time and changes nothing else: both run
  :func:`~attention.usp.usp_on_groups`).
* The mesh travels as its three groups' names (``ProcessGroup.group_name``, resolved back by torch's
  registry, as torch's functional collectives do): sp, ulysses, ring. A ``PeerExchange`` cannot
  travel by name, so a mesh built with ``peer_exchange=True`` is refused here (the processors keep its
  attention eager: one graph break per attention).
* Backward (``xdit::usp_attention_backward``, itself an op) recomputes the forward with autograd on and
  differentiates it: exact gradients, at the price of a second forward in the backward pass. The
  inference path pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.distributed.distributed_c10d import _resolve_process_group

from attention.local import attention_with_lse
from attention.usp import usp_attention, usp_on_groups
from xdit_core.mesh import ParallelMesh

Tensor = torch.Tensor


def _run(
    q: Tensor, k: Tensor, v: Tensor, joint: tuple[Tensor, ...] | None, seq_len: list[int], groups: list[str],
    backend: str, check_ranks: bool,
) -> tuple[Tensor, ...]:  # fmt: skip
    sp, ulysses, ring = (_resolve_process_group(name) for name in groups)
    out = usp_on_groups(
        q, k, v, sp, ulysses, ring, seq_len=seq_len, joint=joint, backend=backend, check_ranks=check_ranks
    )
    return (out,) if joint is None else tuple(out)


def _joint(jq: Tensor | None, jk: Tensor | None, jv: Tensor | None) -> tuple[Tensor, Tensor, Tensor] | None:
    given = [t is not None for t in (jq, jk, jv)]
    if any(given) and not all(given):
        raise ValueError("xdit::usp_attention: pass all three joint tensors (q, k, v) or none")
    return None if jq is None else (jq, jk, jv)


@torch.library.custom_op("xdit::usp_attention", mutates_args=())
def _usp_attention(
    q: Tensor, k: Tensor, v: Tensor, jq: Tensor | None, jk: Tensor | None, jv: Tensor | None,
    seq_len: list[int], sp_group: str, ulysses_group: str, ring_group: str, backend: str, check_ranks: bool,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """``(out, joint_out)``; ``joint_out`` is empty without joint tokens (an op returns a fixed arity)."""
    groups = [sp_group, ulysses_group, ring_group]
    outs = _run(q, k, v, _joint(jq, jk, jv), seq_len, groups, backend, check_ranks)
    return _dense(outs[0]), (q.new_empty(0) if len(outs) == 1 else _dense(outs[1]))


@_usp_attention.register_fake
def _usp_attention_fake(q, k, v, jq, jk, jv, seq_len, sp_group, ulysses_group, ring_group, backend, check_ranks):
    return q.new_empty(q.shape), q.new_empty(0 if jq is None else jq.shape)


@contextmanager
def _autograd_inside_op() -> Iterator[None]:
    """Autograd back on inside an op's kernel: the dispatcher runs an op without an autograd formula (the
    backward op) with autograd's dispatch keys excluded, where ``torch.enable_grad`` alone records
    nothing. This puts the thread's keys back as outside any op, for the recomputation only."""
    keys = torch._C.DispatchKey
    exclude = torch._C._dispatch_tls_local_exclude_set()
    for key in (keys.AutogradFunctionality, keys.ADInplaceOrView):
        exclude = exclude.remove(key)
    with torch._C._ForceDispatchKeyGuard(torch._C._dispatch_tls_local_include_set(), exclude), torch.enable_grad():
        yield


def _recomputed_grads(forward, inputs: tuple[Tensor, ...], grads: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The gradients of ``forward(*inputs)`` (a tuple of outputs) given its outputs' ``grads``, by running it
    again with autograd on (inside a backward op's kernel)."""
    with _autograd_inside_op():
        leaves = [t.detach().requires_grad_() for t in inputs]
        outs = forward(*leaves)
        return torch.autograd.grad(outs, leaves, grads[: len(outs)])


@torch.library.custom_op("xdit::usp_attention_backward", mutates_args=())
def _usp_attention_backward(
    grad_out: Tensor, grad_joint: Tensor, q: Tensor, k: Tensor, v: Tensor, jq: Tensor | None, jk: Tensor | None,
    jv: Tensor | None, seq_len: list[int], sp_group: str, ulysses_group: str, ring_group: str, backend: str,
    check_ranks: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of q, k, v and of the joint q, k, v (empty without joint tokens), by recomputation."""
    joint = _joint(jq, jk, jv)
    groups = [sp_group, ulysses_group, ring_group]

    def forward(q: Tensor, k: Tensor, v: Tensor, *joint: Tensor) -> tuple[Tensor, ...]:
        return _run(q, k, v, joint or None, seq_len, groups, backend, check_ranks)

    grads = _recomputed_grads(forward, (q, k, v, *(joint or ())), (grad_out, grad_joint))
    if joint is None:
        grads = (*grads, q.new_empty(0), q.new_empty(0), q.new_empty(0))
    return _unaliased(grads)


def _dense(t: Tensor) -> Tensor:
    """``t`` as a tensor of its own, contiguous from offset 0: what the fake implementations promise (an op's
    outputs may not alias its inputs or each other; USP can return a view, q, k, v's gradients share one
    buffer)."""
    return t if t.is_contiguous() and t.storage_offset() == 0 else t.clone(memory_format=torch.contiguous_format)


def _unaliased(tensors: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """:func:`_dense` of each, and copies of later ones sharing memory with an earlier one."""
    seen: set[int] = set()
    out = []
    for t in map(_dense, tensors):
        if t.numel() and t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out.append(t)
    return tuple(out)


@_usp_attention_backward.register_fake
def _usp_attention_backward_fake(grad_out, grad_joint, q, k, v, jq, jk, jv, *args):
    joint = [q.new_empty(0)] * 3 if jq is None else [t.new_empty(t.shape) for t in (jq, jk, jv)]
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), *joint)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, jq, jk, jv, *rest = inputs
    ctx.joint = jq is not None
    ctx.save_for_backward(q, k, v, *((jq, jk, jv) if ctx.joint else ()))
    ctx.rest = rest  # seq_len, the three group names, backend, check_ranks


def _backward(ctx, grad_out: Tensor, grad_joint: Tensor):
    q, k, v, *joint = ctx.saved_tensors
    jq, jk, jv = joint if ctx.joint else (None, None, None)
    grads = _usp_attention_backward(grad_out, grad_joint, q, k, v, jq, jk, jv, *ctx.rest)
    joint_grads = grads[3:] if ctx.joint else (None, None, None)
    return (*grads[:3], *joint_grads, *(None for _ in ctx.rest))


_usp_attention.register_autograd(_backward, setup_context=_setup_context)


def usp_attention_op(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mesh: ParallelMesh,
    *,
    seq_len: Sequence[int],
    joint: tuple[Tensor, Tensor, Tensor] | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`~attention.usp.usp_attention` ``(q, k, v, mesh, seq_len=..., joint=..., backend=...)`` through the
    custom op (one node in a ``torch.compile`` graph); ``out``, or ``(out, joint_out)`` with ``joint``.
    ``seq_len``: every sequence-parallel rank's length, as there. The mesh's ``check_ranks`` applies."""
    if mesh.ulysses_exchange is not None:
        raise ValueError(
            "usp_attention_op: a PeerExchange cannot be passed to a custom op by name; call usp_attention "
            "(outside the compiled graph) on a mesh built with peer_exchange=True"
        )
    groups = (mesh.sp_group.group_name, mesh.ulysses_group.group_name, mesh.ring_group.group_name)
    jq, jk, jv = (None, None, None) if joint is None else joint
    lengths = [int(n) for n in seq_len]
    out, joint_out = _usp_attention(q, k, v, jq, jk, jv, lengths, *groups, backend, mesh.check_ranks)
    return out if joint is None else (out, joint_out)


# ---------------------------------------------------------------- local attention (key masks, backend choice)
@torch.library.custom_op("xdit::attention", mutates_args=())
def _attention(
    q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, scale: float | None, backend: str
) -> tuple[Tensor, Tensor]:
    """:func:`~attention.local.attention_with_lse`: ``(out, lse)``."""
    out, lse = attention_with_lse(q, k, v, key_mask=key_mask, scale=scale, backend=backend)
    return _unaliased((out, lse))


@_attention.register_fake
def _attention_fake(q, k, v, key_mask, scale, backend):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=torch.float32)


@torch.library.custom_op("xdit::attention_backward", mutates_args=())
def _attention_backward(
    grad_out: Tensor, grad_lse: Tensor, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None,
    scale: float | None, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    """The gradients of q, k and v, by recomputation."""

    def forward(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return attention_with_lse(q, k, v, key_mask=key_mask, scale=scale, backend=backend)

    return _unaliased(_recomputed_grads(forward, (q, k, v), (grad_out, grad_lse)))


@_attention_backward.register_fake
def _attention_backward_fake(grad_out, grad_lse, q, k, v, key_mask, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup(ctx, inputs, output) -> None:
    q, k, v, key_mask, scale, backend = inputs
    ctx.save_for_backward(q, k, v, key_mask)
    ctx.rest = (scale, backend)


def _attention_grad(ctx, grad_out: Tensor, grad_lse: Tensor):
    q, k, v, key_mask = ctx.saved_tensors
    return (*_attention_backward(grad_out, grad_lse, q, k, v, key_mask, *ctx.rest), None, None, None)


_attention.register_autograd(_attention_grad, setup_context=_attention_setup)


def attention_op(
    q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None, scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`~attention.local.attention_with_lse` through the custom op ``xdit::attention`` (one node in a
    ``torch.compile`` graph: its kernel choice and key-mask bookkeeping run on the host, untraced)."""
    return _attention(q, k, v, key_mask, scale, backend)


# ---------------------------------------------------------------- what the model processors call
def usp_attention_compilable(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mesh: ParallelMesh,
    *,
    seq_len: Sequence[int],
    joint: tuple[Tensor, Tensor, Tensor] | None = None,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """:func:`~attention.usp.usp_attention` wherever a processor runs: through the custom op while
    ``torch.compile`` traces (one node, no graph break), the function itself when eager (the same
    computation without the dispatcher's host time), and eager, outside the graph, on a mesh built with
    ``peer_exchange=True`` (a ``PeerExchange`` cannot be passed to an op: one graph break there)."""
    if torch.compiler.is_compiling() and mesh.ulysses_exchange is None:
        return usp_attention_op(q, k, v, mesh, seq_len=seq_len, joint=joint, backend=backend)
    return _usp_eager(q, k, v, mesh, seq_len=seq_len, joint=joint, backend=backend)


@torch.compiler.disable
def _usp_eager(q: Tensor, k: Tensor, v: Tensor, mesh: ParallelMesh, **options: Any) -> Tensor | tuple[Tensor, ...]:
    return usp_attention(q, k, v, mesh, **options)


def attention_compilable(
    q: Tensor, k: Tensor, v: Tensor, *, key_mask: Tensor | None = None, scale: float | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """:func:`~attention.local.attention_with_lse` wherever a processor runs: through the custom op while
    ``torch.compile`` traces, the function itself when eager."""
    attend = attention_op if torch.compiler.is_compiling() else attention_with_lse
    return attend(q, k, v, key_mask=key_mask, scale=scale, backend=backend)
