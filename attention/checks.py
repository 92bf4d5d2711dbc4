"""Input validation shared by the attention entry points.

A sequence-parallel call is validated on each rank, then (``check_ranks``) the ranks agree that
they all make the same call (``xdit_core.agreement``): a bad call, or ranks that disagree, raise
one ``ValueError`` on every rank before any collective of the call.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from attention.backends import AttentionCall, Backend, select_backend
from attention.joint import check_joint
from attention.masking import check_masks
from xdit_core.agreement import agreed, content_digest
from xdit_core.collectives import resolve_lengths


def check_qkv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, what: str, q_sharded: bool = False, kv_sharded: bool = False
) -> None:
    """q ``[B, S_q, H, D]``, k and v ``[B, S_k, H, D]``; a sharded sequence's chunk may hold no tokens."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{what}: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{what}: {name} must be [B, S, H, D] (4-D), got shape {tuple(x.shape)}")
        if not x.dtype.is_floating_point:
            raise ValueError(f"{what}: {name} must be floating point, got {x.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"{what}: q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{what}: q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise ValueError(f"{what}: k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape")
    if q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:]:
        raise ValueError(
            f"{what}: q {tuple(q.shape)} and k {tuple(k.shape)} must agree on batch, heads and head_dim ([B, S, H, D])"
        )
    # A sequence-parallel rank may hold no tokens (fewer tokens than ranks); every other size must be >= 1.
    may_be_empty = {1} if q_sharded else set()
    may_be_empty |= {5} if kv_sharded else set()
    empty = [n for i, n in enumerate((*q.shape, *k.shape)) if n == 0 and i not in may_be_empty]
    if empty:
        raise ValueError(f"{what}: empty input, q {tuple(q.shape)}, k {tuple(k.shape)}")


def resolve_scale(scale: float | None, head_dim: int) -> float:
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number or None, got {scale!r}")
    return float(scale)


def needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


@dataclass(frozen=True)
class SequenceCall:
    """A validated sequence-parallel call: every rank's lengths, the scale, the kernel, host masks.

    ``lengths``: every rank's query tokens; ``kv_lengths``: every rank's key/value tokens (equal to
    ``lengths`` for self-attention), or ``None`` when every rank holds all keys/values.
    """

    joint: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    lengths: list[int]
    kv_lengths: list[int] | None
    scale: float
    backend: Backend
    key_mask: torch.Tensor | None  # on the host
    joint_key_mask: torch.Tensor | None  # on the host


def check_sequence_call(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    group: dist.ProcessGroup,
    group_rank: int,
    seq_len: int | Sequence[int] | None,
    kv_seq_len: int | Sequence[int] | None,
    kv_replicated: bool,
    key_mask: torch.Tensor | None,
    joint: object,
    joint_key_mask: torch.Tensor | None,
    scale: float | None,
    backend: str,
    return_lse: bool,
    check_ranks: bool,
    what: str,
    extra_names: tuple[str, ...] = (),
    extra_values: tuple[object, ...] = (),
) -> SequenceCall:
    """Validate a Ulysses / ring / USP call and choose its kernel; with ``check_ranks`` the ranks of
    ``group`` (the sequence's group) first agree that they all make this call (``xdit_core.agreement``).

    ``extra_names`` / ``extra_values``: further values every rank must agree on (e.g. the mesh's degrees).
    """

    def validate() -> SequenceCall:
        return _validate(
            q, k, v, group.size(), group_rank, seq_len, kv_seq_len, kv_replicated, key_mask, joint,
            joint_key_mask, scale, backend, return_lse, what,
        )  # fmt: skip

    def values(call: SequenceCall) -> tuple[object, ...]:
        return _signature(call, q, k, v, return_lse, extra_values)

    return agreed(group, what, check_ranks, validate, SIGNATURE_NAMES + extra_names, values)


def _validate(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group_size: int,
    group_rank: int,
    seq_len: int | Sequence[int] | None,
    kv_seq_len: int | Sequence[int] | None,
    kv_replicated: bool,
    key_mask: torch.Tensor | None,
    joint: object,
    joint_key_mask: torch.Tensor | None,
    scale: float | None,
    backend: str,
    return_lse: bool,
    what: str,
) -> SequenceCall:
    check_qkv(q, k, v, what=what, q_sharded=True, kv_sharded=not kv_replicated)
    for name, flag in (("kv_replicated", kv_replicated), ("return_lse", return_lse)):
        if not isinstance(flag, bool):
            raise ValueError(f"{what}: {name} must be True or False, got {flag!r}")
    if kv_replicated and kv_seq_len is not None:
        raise ValueError(f"{what}: pass kv_seq_len (sharded keys/values) or kv_replicated=True, not both")
    checked = None if joint is None else check_joint(joint, q, what)
    if checked is not None and (kv_replicated or kv_seq_len is not None):
        raise ValueError(
            f"{what}: joint tokens join self-attention; they cannot be combined with kv_seq_len or kv_replicated"
        )
    lengths = resolve_lengths(seq_len, group_size, group_rank, q.shape[1], what)
    if kv_replicated:
        kv_lengths = None
        key_len = k.shape[1]
    elif kv_seq_len is None:
        if k.shape[1] != q.shape[1]:
            raise ValueError(
                f"{what}: q holds {q.shape[1]} tokens here but k/v hold {k.shape[1]}: for keys/values laid out "
                "differently from the queries pass kv_seq_len (sharded) or kv_replicated=True (every rank holds all)"
            )
        kv_lengths, key_len = lengths, sum(lengths)
    else:
        kv_lengths = resolve_lengths(kv_seq_len, group_size, group_rank, k.shape[1], f"{what} (kv_seq_len)")
        key_len = sum(kv_lengths)
    check_masks(key_mask, joint_key_mask, checked, q.shape[0], key_len, what)
    grad = needs_grad(q, k, v, *(checked or ()))
    chosen = select_backend(backend, AttentionCall(q.device, q.dtype, q.shape[-1], grad, keys=key_len))
    return SequenceCall(
        checked, lengths, kv_lengths, resolve_scale(scale, q.shape[-1]), chosen,
        None if key_mask is None else key_mask.detach().to("cpu"),
        None if joint_key_mask is None else joint_key_mask.detach().to("cpu"),
    )  # fmt: skip


# What every rank of the group must pass alike (not its local lengths: every rank's are in the lengths).
SIGNATURE_NAMES = (
    "batch, heads, head_dim",
    "dtype",
    "device type",
    "every rank's tokens (seq_len; None means equal chunks: pass the global length for uneven ones)",
    "every rank's key/value tokens",
    "joint tokens",
    "key_mask",
    "joint_key_mask",
    "scale",
    "gradients",
    "return_lse",
)


def _signature(
    call: SequenceCall,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    return_lse: bool,
    extra_values: tuple[object, ...],
) -> tuple[object, ...]:
    """The values named by ``SIGNATURE_NAMES`` (then ``extra_values``): cheap to build and to hash."""
    joint = call.joint
    shape = q.shape
    return (
        (shape[0], shape[2], shape[3]),
        q.dtype,
        q.device.type,
        tuple(call.lengths),
        "replicated" if call.kv_lengths is None else tuple(call.kv_lengths),
        None if joint is None else joint[0].shape[1],
        None if call.key_mask is None else content_digest(call.key_mask),
        None if call.joint_key_mask is None else content_digest(call.joint_key_mask),
        call.scale,
        needs_grad(q, k, v, *(joint or ())),
        return_lse,
        *extra_values,
    )
