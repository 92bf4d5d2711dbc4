"""Ulysses attention: trade the sequence shard for a head shard with one all-to-all, and back.

``[B, S/P, H, D]`` on each of ``P`` ranks → all-to-all carrying q, k and v together →
``[B, S, H/P, D]`` → local attention over the whole sequence for ``H/P`` heads → all-to-all of the
output → ``[B, S/P, H, D]``.

For inference (no gradients) q, k and v travel interleaved (``[.., S, 3, heads, D]``), so for
``B = 1`` the received buffer already is the strided q, k and v the kernel reads: one packing copy
in, one copy placing the heads out, nothing else. ``head_chunks > 1`` pipelines this over groups
of heads (each chunk's attention starts when its chunk has arrived, while later chunks and earlier
outputs are in flight); on H200s with FLUX shapes that gained nothing (the attention kernels fill
every SM, so NCCL cannot run beside them; docs/performance.md), hence the default of one chunk.
With gradients the exchange is composed from differentiable all-to-alls.
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


def check_heads(num_heads: int, ulysses: int, what: str) -> None:
    if num_heads % ulysses:
        fits = [d for d in range(1, num_heads + 1) if num_heads % d == 0]
        raise ValueError(
            f"{what}: {num_heads} heads do not split over a ulysses degree of {ulysses}; "
            f"use a ulysses degree in {fits} (with ring for the rest of the ranks)"
        )


def check_head_chunks(head_chunks: int, q: Tensor, ulysses: int) -> None:
    heads_per_rank = q.shape[2] // ulysses
    if not isinstance(head_chunks, int) or isinstance(head_chunks, bool) or not 1 <= head_chunks <= heads_per_rank:
        raise ValueError(
            f"head_chunks={head_chunks!r} must be an integer in [1, {heads_per_rank}] "
            f"({q.shape[2]} heads over a ulysses degree of {ulysses})"
        )


def _exchange(recv: Tensor, send: Tensor, group: dist.ProcessGroup, overlap: bool) -> dist.Work | None:
    """All-to-all into ``recv``. Either way the host does not block: without ``overlap`` the current
    stream waits for the transfer (cheapest to issue); with it the caller waits on the returned work."""
    return dist.all_to_all_single(recv, send, group=group, async_op=overlap)


def _pipelined(q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, inner: Inner, chunks: int) -> Tensor:
    world = dist.get_world_size(group)
    b, s_local, h, d = q.shape
    hp = h // world
    overlap = chunks > 1
    bounds = [(c * hp // chunks, (c + 1) * hp // chunks) for c in range(chunks)]
    inbound = []
    for h0, h1 in bounds:
        # send[p, b, s, t] = tensor t's heads [p*hp + h0, p*hp + h1) of this rank's rows: for rank p
        parts = [x.view(b, s_local, world, hp, d)[:, :, :, h0:h1].permute(2, 0, 1, 3, 4) for x in (q, k, v)]
        send = torch.stack(parts, dim=3)  # one copy kernel: [P, B, S_local, 3, hc, D]
        recv = torch.empty_like(send)
        inbound.append((_exchange(recv, send, group, overlap), send, recv))
    outbound = []
    for (h0, h1), (work, _send, recv) in zip(bounds, inbound, strict=True):
        if work is not None:
            work.wait()
        # recv[p] holds rows of sequence chunk p: [B, P*S_local, 3, hc, D] (a view when B == 1)
        qkv = recv.transpose(0, 1).reshape(b, world * s_local, 3, h1 - h0, d)
        o = inner(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])  # [B, S, hc, D]
        o_send = o.reshape(b, world, s_local, h1 - h0, d).transpose(0, 1).contiguous()
        o_recv = torch.empty_like(o_send)
        outbound.append((_exchange(o_recv, o_send, group, overlap), o_send, o_recv))
    heads = []
    for work, _send, o_recv in outbound:
        if work is not None:
            work.wait()
        heads.append(o_recv.permute(1, 2, 0, 3, 4))  # o_recv[p]: heads of group p -> [B, S_local, P, hc, D]
    out = heads[0] if chunks == 1 else torch.cat(heads, dim=3)
    return out.reshape(b, s_local, h, d)


def ulysses_core(
    q: Tensor, k: Tensor, v: Tensor, group: dist.ProcessGroup, inner: Inner, head_chunks: int = 1
) -> Tensor:
    """Head-scatter q/k/v over ``group``, run ``inner`` on ``[B, S_group, H/P, D]``, scatter back."""
    world = dist.get_world_size(group)
    if world == 1:
        return inner(q, k, v)
    if needs_grad(q, k, v):
        q, k, v = all_to_all((q, k, v), group, scatter_dim=2, gather_dim=1)
        return all_to_all((inner(q, k, v),), group, scatter_dim=1, gather_dim=2)[0]
    return _pipelined(q, k, v, group, inner, head_chunks)


def ulysses_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    group: dist.ProcessGroup,
    *,
    scale: float | None = None,
    backend: str = "auto",
    head_chunks: int = 1,
) -> Tensor:
    """Exact attention over a sequence sharded across ``group``, by all-to-all over heads.

    q, k, v ``[B, S_local, H, D]``: rank ``i`` of ``group`` holds chunk ``i`` of the sequence (all
    chunks the same length); ``H`` must be divisible by the group size. Returns
    ``[B, S_local, H, D]``. ``head_chunks`` (inference only) pipelines communication with compute
    over that many groups of heads. Differentiable; gradients equal the single-device ones.
    """
    check_qkv(q, k, v, self_attention=True, what="ulysses_attention")
    world = dist.get_world_size(group)
    check_heads(q.shape[2], world, "ulysses_attention")
    scale = resolve_scale(scale, q.shape[-1])
    check_head_chunks(head_chunks, q, world)
    chosen: Backend = select_backend(backend, AttentionCall(q.device, q.dtype, q.shape[-1], needs_grad(q, k, v)))
    return ulysses_core(q, k, v, group, lambda q, k, v: run_backend(chosen, q, k, v, scale)[0], head_chunks)
