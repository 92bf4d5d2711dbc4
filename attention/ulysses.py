"""Ulysses attention: trade the sequence shard for a head shard with one all-to-all, and back.

``[B, S/P, H, D]`` on each of ``P`` ranks → all-to-all carrying q, k and v together →
``[B, S, H/P, D]`` → local attention over the whole sequence for ``H/P`` heads → all-to-all of the
output → ``[B, S/P, H, D]``.

Inference (no gradients) pipelines this over ``head_chunks`` groups of heads: every chunk's q/k/v
all-to-all is posted at once, and each chunk's attention starts as soon as its chunk has arrived,
while the next chunks and the previous outputs are still in flight. q, k and v travel interleaved
(``[.., S, 3, heads, D]``), so for ``B = 1`` the received buffer already is the strided q, k and v
the kernel reads: one copy in (packing) and one copy out (placing heads), nothing else.
With gradients the same exchange is composed from differentiable all-to-alls (one chunk).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from attention.backends import AttentionCall, Backend, select_backend
from attention.checks import check_qkv, needs_grad, resolve_scale
from attention.local import run_backend
from xdit_core.collectives import all_to_all

Tensor = torch.Tensor
Inner = Callable[[Tensor, Tensor, Tensor], Tensor]

# Auto head chunking: aim for about this many bytes of q/k/v per all-to-all (measured on H200s:
# see docs/performance.md), between 1 chunk and one head per chunk.
_CHUNK_BYTES = 32 * 2**20


def check_heads(num_heads: int, ulysses: int, what: str) -> None:
    if num_heads % ulysses:
        fits = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"{what}: {num_heads} heads do not split over a ulysses degree of {ulysses}; "
            f"use a ulysses degree in {fits} (with ring for the rest of the ranks)"
        )


def resolve_head_chunks(head_chunks: int | None, q: Tensor, ulysses: int) -> int:
    """The number of head groups to pipeline (validated, or chosen from the message size)."""
    heads_per_rank = q.shape[2] // ulysses
    if head_chunks is None:
        qkv_bytes = 3 * q.numel() * q.element_size()
        return max(1, min(heads_per_rank, round(qkv_bytes / _CHUNK_BYTES)))
    if not isinstance(head_chunks, int) or isinstance(head_chunks, bool) or not 1 <= head_chunks <= heads_per_rank:
        raise ValueError(
            f"head_chunks={head_chunks!r} must be an integer in [1, {heads_per_rank}] "
            f"({q.shape[2]} heads over a ulysses degree of {ulysses})"
        )
    return head_chunks


def _pipelined(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, inner: Inner, chunks: int) -> Tensor:
    world = dist.get_world_size(group)
    b, s_local, h, d = q.shape
    hp = h // world
    bounds = [(int(c[0]), int(c[-1]) + 1) for c in torch.arange(hp).tensor_split(chunks)]
    inbound = []
    for h0, h1 in bounds:
        # send[p, b, s, t] = tensor t's heads [p*hp + h0, p*hp + h1) of this rank's rows: for rank p
        send = q.new_empty((world, b, s_local, 3, h1 - h0, d))
        for t, x in enumerate((q, k, v)):
            send[:, :, :, t].copy_(x.view(b, s_local, world, hp, d)[:, :, :, h0:h1].permute(2, 0, 1, 3, 4))
        recv = torch.empty_like(send)
        inbound.append((dist.all_to_all_single(recv, send, group=group, async_op=True), send, recv))
    out = q.new_empty((b, s_local, world, hp, d))
    outbound = []
    for (h0, h1), (work, _send, recv) in zip(bounds, inbound, strict=True):
        work.wait()
        # recv[p] holds rows of sequence chunk p: [B, P*S_local, 3, hc, D] (a view when B == 1)
        qkv = recv.transpose(0, 1).reshape(b, world * s_local, 3, h1 - h0, d)
        o = inner(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B, S, hc, D]
        o_send = o.reshape(b, world, s_local, h1 - h0, d).transpose(0, 1).contiguous()
        o_recv = torch.empty_like(o_send)
        outbound.append((dist.all_to_all_single(o_recv, o_send, group=group, async_op=True), o_send, o_recv))
    for (h0, h1), (work, _send, o_recv) in zip(bounds, outbound, strict=True):
        work.wait()
        out[:, :, :, h0:h1].copy_(o_recv.permute(1, 2, 0, 3, 4))  # o_recv[p]: heads of group p
    return out.view(b, s_local, h, d)


def ulysses_core(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, inner: Inner, head_chunks: int | None = None
) -> Tensor:
    """Head-scatter q/k/v over ``group``, run ``inner`` on ``[B, S_group, H/P, D]``, scatter back."""
    world = dist.get_world_size(group)
    if world == 1:
        return inner(q, k, v)
    if needs_grad(q, k, v):
        q, k, v = all_to_all((q, k, v), group, scatter_dim=2, gather_dim=1)
        return all_to_all((inner(q, k, v),), group, scatter_dim=1, gather_dim=2)[0]
    return _pipelined(q, k, v, group, inner, resolve_head_chunks(head_chunks, q, world))


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    *,
    scale: float | None = None,
    backend: str = "auto",
    head_chunks: int | None = None,
) -> Tensor:
    """Exact attention over a sequence sharded across ``group``, by all-to-all over heads.

    q, k, v ``[B, S_local, H, D]``: rank ``i`` of ``group`` holds chunk ``i`` of the sequence (all
    chunks the same length); ``H`` must be divisible by the group size. Returns
    ``[B, S_local, H, D]``. ``head_chunks`` (inference only) pipelines communication with compute
    over that many head groups; ``None`` chooses by size. Differentiable; gradients equal the
    single-device ones.
    """
    check_qkv(q, k, v, self_attention=True, what="ulysses_attention")
    world = dist.get_world_size(group)
    check_heads(q.shape[2], world, "ulysses_attention")
    scale = resolve_scale(scale, q.shape[-1])
    chunks = resolve_head_chunks(head_chunks, q, world)
    chosen: Backend = select_backend(backend, AttentionCall(q.device, q.dtype, q.shape[-1], needs_grad(q, k, v)))
    return ulysses_core(q, k, v, group, lambda q, k, v: run_backend(chosen, q, k, v, scale)[0], chunks)
