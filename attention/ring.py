"""Ring attention: queries stay, key/value blocks rotate, partial results merge by their LSE.

With ``P`` ranks, step ``s`` attends the local queries to the k/v block that started on rank
``r - s`` while the next block travels (``RingExchange``); the ``P`` partial ``(out, lse)`` are merged
in float32. The backward pass rotates k/v again; each block's ``dk``/``dv`` accumulate (float32) in a
buffer that travels with it and is returned to its owner after the last step. Block gradients use
the *merged* out and lse, so they are the exact single-device gradients.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from attention.backends import AttentionCall, Backend, select_backend
from attention.checks import check_qkv, needs_grad, resolve_scale
from attention.local import run_backend
from attention.merge import merge_attention_
from xdit_core.ring_exchange import RingExchange

Tensor = torch.Tensor


def _ring_forward(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, scale: float, backend: Backend
) -> tuple[Tensor, Tensor]:
    ring = RingExchange(group)
    kv = torch.stack((k, v))  # one buffer travels: [2, B, S_local, H, D]
    out = lse = None
    for step in range(ring.size):
        last = step == ring.size - 1
        if not last:
            ring.start(kv)
        block_out, block_lse = backend.forward(q, kv[0], kv[1], scale)
        if out is None:
            out, lse = block_out.float(), block_lse.float()
        else:
            merge_attention_(out, lse, block_out, block_lse)
        if not last:
            kv = ring.wait()
    return out.to(q.dtype), lse


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale, backend):  # type: ignore[override]
        out, lse = _ring_forward(q, k, v, group, scale, backend)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.backend = group, scale, backend
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        backend: Backend = ctx.backend
        kv_ring, grad_ring = RingExchange(ctx.group), RingExchange(ctx.group)
        kv = torch.stack((k, v))
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        for step in range(kv_ring.size):
            last = step == kv_ring.size - 1
            if not last:
                kv_ring.start(kv)
            block_dq, block_dk, block_dv = backend.backward(dout, q, kv[0], kv[1], out, lse, ctx.scale)
            dq += block_dq
            if step > 0:
                dkv = grad_ring.wait()  # the gradient buffer of the block we now hold
            dkv[0] += block_dk
            dkv[1] += block_dv
            grad_ring.start(dkv)
            if not last:
                kv = kv_ring.wait()
        dkv = grad_ring.wait()  # our own block's gradients, back from their last visit
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None


def ring_attention_core(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, scale: float, backend: Backend
) -> Tensor:
    """Ring attention on validated inputs with a chosen backend (no checks)."""
    if dist.get_world_size(group) == 1:
        return run_backend(backend, q, k, v, scale)[0]
    if needs_grad(q, k, v):
        return _RingAttention.apply(q, k, v, group, scale, backend)
    return _ring_forward(q, k, v, group, scale, backend)[0]


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    *,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """Exact attention over a sequence sharded across ``group`` by rotating k/v blocks.

    q, k, v ``[B, S_local, H, D]``: rank ``i`` of ``group`` holds chunk ``i`` of the sequence (all
    chunks the same length). Returns ``[B, S_local, H, D]``, this rank's rows of the full-sequence
    attention. Any head count. Differentiable; gradients equal the single-device ones.
    """
    check_qkv(q, k, v, self_attention=True, what="ring_attention")
    scale = resolve_scale(scale, q.shape[-1])
    chosen = select_backend(backend, AttentionCall(q.device, q.dtype, q.shape[-1], needs_grad(q, k, v)))
    return ring_attention_core(q, k, v, group, scale, chosen)
