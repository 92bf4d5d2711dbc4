"""Ring attention: queries stay, key/value blocks rotate, partial results merge by their LSE.

With ``P`` ranks, step ``s`` attends the local queries to the k/v block that started on rank
``r - s`` while the next block travels (``RingExchange``); the ``P`` partial ``(out, lse)`` are merged
in float32. The backward pass rotates k/v again; each block's ``dk``/``dv`` accumulate (float32) in a
buffer that travels with it and is returned to its owner after the last step. Block gradients use
the *merged* out and lse, so they are the exact single-device gradients.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from attention.backends import Backend
from attention.checks import check_sequence_call, needs_grad
from attention.joint import attend_layout
from attention.local import lse_backward, masked_backward, run_masked
from attention.masking import Keep, block_keep
from attention.merge import merge_attention_
from xdit_core.collectives import reduce_gradients
from xdit_core.ring_exchange import RingExchange

Tensor = torch.Tensor


def _pack_kv(k: Tensor, v: Tensor, rows: int) -> Tensor:
    """k and v as the one buffer that travels, ``[2, B, rows, H, D]`` (rows beyond k's are never read)."""
    if k.shape[1] == rows:
        return torch.stack((k, v))
    kv = k.new_zeros((2, k.shape[0], rows, *k.shape[2:]))
    kv[0, :, : k.shape[1]] = k
    kv[1, :, : k.shape[1]] = v
    return kv


def _starts(lengths: list[int]) -> list[int]:
    return [sum(lengths[:i]) for i in range(len(lengths))]


def _ring_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    scale: float,
    backend: Backend,
    lengths: list[int],
    keep: Keep | None,
) -> tuple[Tensor, Tensor]:
    ring = RingExchange(group)
    starts = _starts(lengths)
    kv = _pack_kv(k, v, max(lengths))
    work = q.shape[1] > 0 and q.shape[2] > 0
    out = lse = None
    for step in range(ring.size):
        last = step == ring.size - 1
        if not last:
            ring.start(kv)
        src = (ring.rank - step) % ring.size  # the block we hold started there
        rows = lengths[src]  # its real rows
        if work and rows:
            kept = block_keep(keep, starts[src], starts[src] + rows, q.device)
            block_out, block_lse = run_masked(backend, q, kv[0, :, :rows], kv[1, :, :rows], scale, kept)
            if out is None:
                out, lse = block_out.float(), block_lse.float()
            else:
                merge_attention_(out, lse, block_out, block_lse)
        if not last:
            kv = ring.wait()
    if out is None:  # no queries or no heads here: nothing was computed
        return torch.zeros_like(q), torch.zeros((q.shape[0], q.shape[2], q.shape[1]), device=q.device)
    return out.to(q.dtype), lse


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, group, scale, backend, lengths, keep):  # type: ignore[override]
        out, lse = _ring_forward(q, k, v, group, scale, backend, lengths, keep)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.group, ctx.scale, ctx.backend, ctx.lengths, ctx.keep = group, scale, backend, lengths, keep
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        backend: Backend = ctx.backend
        lengths: list[int] = ctx.lengths
        starts = _starts(lengths)
        kv_ring, grad_ring = RingExchange(ctx.group), RingExchange(ctx.group)
        kv = _pack_kv(k, v, max(lengths))
        work = q.shape[1] > 0 and q.shape[2] > 0
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dkv = torch.zeros(kv.shape, dtype=torch.float32, device=q.device)
        for step in range(kv_ring.size):
            last = step == kv_ring.size - 1
            if not last:
                kv_ring.start(kv)
            src = (kv_ring.rank - step) % kv_ring.size
            rows = lengths[src]
            if step > 0:
                dkv = grad_ring.wait()  # the gradient buffer of the block we now hold
            if work and rows:
                kept = block_keep(ctx.keep, starts[src], starts[src] + rows, q.device)
                k_block, v_block = kv[0, :, :rows], kv[1, :, :rows]
                if dout is not None:
                    block_dq, block_dk, block_dv = masked_backward(
                        backend, dout, q, k_block, v_block, out, lse, ctx.scale, kept
                    )
                    dq += block_dq
                    dkv[0, :, :rows] += block_dk
                    dkv[1, :, :rows] += block_dv
                if dlse is not None:  # d lse_i / d s_ij = p_ij, with p from the merged lse
                    block_dq, block_dk = lse_backward(backend, dlse, q, k_block, lse, ctx.scale, kept)
                    dq += block_dq
                    dkv[0, :, :rows] += block_dk
            grad_ring.start(dkv)
            if not last:
                kv = kv_ring.wait()
        dkv = grad_ring.wait()[:, :, : k.shape[1]]  # our own block's gradients, back from their last visit
        return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None, None


def ring_attention_core(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    scale: float,
    backend: Backend,
    kv_lengths: list[int] | None,
    keep: Keep | None = None,
    with_lse: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Ring attention on validated inputs with a chosen backend: ``out``, or ``(out, lse)`` ``with_lse``.

    ``kv_lengths``: every rank's key/value tokens (``None``: every rank holds all of them, and
    nothing travels; their gradients are summed over the group); ``keep``: per sample, the kept key
    positions in the order of the ranks' blocks (``None``: no mask).
    """
    if kv_lengths is None or group.size() == 1:
        if kv_lengths is None:
            k, v = reduce_gradients(k, group), reduce_gradients(v, group)
        out, lse = run_masked(backend, q, k, v, scale, block_keep(keep, 0, k.shape[1], q.device))
    elif needs_grad(q, k, v):
        out, lse = _RingAttention.apply(q, k, v, group, scale, backend, kv_lengths, keep)
    else:
        out, lse = _ring_forward(q, k, v, group, scale, backend, kv_lengths, keep)
    return (out, lse) if with_lse else out


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    *,
    seq_len: int | Sequence[int] | None = None,
    kv_seq_len: int | Sequence[int] | None = None,
    kv_replicated: bool = False,
    key_mask: Tensor | None = None,
    joint: tuple[Tensor, Tensor, Tensor] | None = None,
    joint_key_mask: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    check_ranks: bool = True,
) -> Tensor | tuple[Tensor, ...]:
    """Exact attention over a sequence sharded across ``group`` by rotating k/v blocks.

    q, k, v ``[B, S_local, H, D]``: rank ``i`` of ``group`` holds chunk ``i`` of the sequence.
    ``seq_len`` as in ``ulysses_attention`` (``None``: equal chunks; ``L``: the ``shard_sequence``
    layout; or every rank's length): blocks travel padded to the longest and only their real rows
    are attended. Returns ``[B, S_local, H, D]``, this rank's rows of the full-sequence attention;
    with ``joint`` (replicated tokens, as in ``ulysses_attention``) ``(out, joint_out)``.
    ``key_mask`` / ``joint_key_mask``, ``kv_seq_len`` / ``kv_replicated`` (cross-attention),
    ``return_lse`` and ``check_ranks`` as in ``ulysses_attention``. Any head count.
    Differentiable; gradients equal the single-device ones.
    """
    call = check_sequence_call(
        q, k, v, group=group, group_rank=group.rank(), seq_len=seq_len, kv_seq_len=kv_seq_len,
        kv_replicated=kv_replicated, key_mask=key_mask, joint=joint, joint_key_mask=joint_key_mask, scale=scale,
        backend=backend, return_lse=return_lse, check_ranks=check_ranks, what="ring_attention",
    )  # fmt: skip

    def attend(
        q: Tensor, k: Tensor, v: Tensor, lengths: list[int], kv_lengths: list[int] | None, keep: Keep | None
    ) -> tuple[Tensor, Tensor]:
        return ring_attention_core(q, k, v, group, call.scale, call.backend, kv_lengths, keep, with_lse=True)

    return attend_layout(attend, q, k, v, group, call, return_lse)
