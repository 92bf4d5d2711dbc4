"""Collectives with autograd: all-to-all, sequence shard and sequence gather.

Every function takes its process group (or mesh) explicitly. Gradients follow the single-device
semantics: a tensor replicated on every rank gets the full gradient on every rank.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from xdit_core.mesh import ParallelMesh


def _all_to_all_forward(
    tensors: tuple[torch.Tensor, ...], group: dist.ProcessGroup, scatter_dim: int, gather_dim: int
) -> tuple[torch.Tensor, ...]:
    """One ``all_to_all_single`` for all tensors (same shape and dtype)."""
    world = dist.get_world_size(group)
    x0 = tensors[0]
    n = x0.shape[scatter_dim] // world
    # send[p, t] = tensor t's chunk p along scatter_dim
    send = x0.new_empty((world, len(tensors), *x0.shape[:scatter_dim], n, *x0.shape[scatter_dim + 1 :]))
    for t, x in enumerate(tensors):
        send[:, t].copy_(x.unflatten(scatter_dim, (world, n)).movedim(scatter_dim, 0))
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)
    # recv[p, t] came from rank p: it is chunk p of the gathered dim.
    return tuple(recv[:, t].movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1) for t in range(len(tensors)))


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, scatter_dim, gather_dim, *tensors):  # type: ignore[override]
        ctx.group, ctx.scatter_dim, ctx.gather_dim = group, scatter_dim, gather_dim
        return _all_to_all_forward(tensors, group, scatter_dim, gather_dim)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        grads = tuple(torch.zeros_like(g) if g is None else g for g in grads)
        return (None, None, None, *_all_to_all_forward(grads, ctx.group, ctx.gather_dim, ctx.scatter_dim))


def all_to_all(
    tensors: list[torch.Tensor] | tuple[torch.Tensor, ...],
    group: dist.ProcessGroup,
    *,
    scatter_dim: int,
    gather_dim: int,
) -> tuple[torch.Tensor, ...]:
    """Scatter ``scatter_dim`` and gather ``gather_dim`` across ``group``, in one collective.

    Each tensor's ``scatter_dim`` is split into ``P = group size`` equal chunks; chunk ``p`` goes to
    rank ``p``; the chunks received are concatenated along ``gather_dim`` in rank order. E.g. for
    Ulysses, ``[B, S_local, H, D]`` with ``scatter_dim=2, gather_dim=1`` becomes ``[B, S, H/P, D]``.
    All tensors must share shape, dtype and device (q, k and v travel together). Differentiable.
    """
    tensors = tuple(tensors)
    if not tensors:
        raise ValueError("all_to_all needs at least one tensor")
    x0 = tensors[0]
    for x in tensors[1:]:
        if x.shape != x0.shape or x.dtype != x0.dtype or x.device != x0.device:
            raise ValueError(
                f"all_to_all tensors must share shape/dtype/device: {tuple(x0.shape)} {x0.dtype} {x0.device} "
                f"vs {tuple(x.shape)} {x.dtype} {x.device}"
            )
    nd = x0.dim()
    scatter_dim, gather_dim = scatter_dim % nd, gather_dim % nd
    if scatter_dim == gather_dim:
        raise ValueError(f"scatter_dim and gather_dim must differ, both are {scatter_dim}")
    world = dist.get_world_size(group)
    if x0.shape[scatter_dim] % world:
        raise ValueError(
            f"all_to_all: dim {scatter_dim} of size {x0.shape[scatter_dim]} does not split into {world} equal chunks"
        )
    if world == 1:
        return tensors
    return _AllToAll.apply(group, scatter_dim, gather_dim, *tensors)


def shard_sequence(x: torch.Tensor, mesh: ParallelMesh, dim: int = 1) -> torch.Tensor:
    """This rank's chunk of a tensor replicated on every rank: ``tensor_split(x, sp_size, dim)[sp_rank]``.

    Differentiable: the gradient of ``x`` is all-gathered over the sequence-parallel group, so the
    replicated ``x`` receives the full (single-device) gradient on every rank.
    """
    if mesh.sp_size == 1:
        return x
    return _Shard.apply(x, mesh.sp_group, mesh.sp_size, mesh.sp_rank, dim % x.dim())


def gather_sequence(x_local: torch.Tensor, mesh: ParallelMesh, dim: int = 1) -> torch.Tensor:
    """Concatenate every sequence-parallel rank's chunk along ``dim``, in ``sp_rank`` order.

    The result is replicated on every rank. All chunks must have the same length. Differentiable:
    the gradient is this rank's chunk of the (replicated) output gradient.
    """
    if mesh.sp_size == 1:
        return x_local
    return _Gather.apply(x_local, mesh.sp_group, mesh.sp_size, mesh.sp_rank, dim % x_local.dim())


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather(x: torch.Tensor, group: dist.ProcessGroup, *, dim: int) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in group-rank order (same shape on every rank).

    One collective; not differentiable (see ``gather_sequence`` for the autograd version).
    """
    world = dist.get_world_size(group)
    dim = dim % x.dim()
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x.contiguous(), group=group)
    return out.unflatten(0, (world, -1)).movedim(0, dim).flatten(dim, dim + 1)


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, world, rank, dim):  # type: ignore[override]
        ctx.group, ctx.world, ctx.dim = group, world, dim
        ctx.sizes = [c.shape[dim] for c in torch.tensor_split(x, world, dim)]
        return torch.tensor_split(x, world, dim)[rank].clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if len(set(ctx.sizes)) != 1:
            raise ValueError(f"shard_sequence backward needs equal chunks; got lengths {ctx.sizes} along dim {ctx.dim}")
        return all_gather(grad, ctx.group, dim=ctx.dim), None, None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, group, world, rank, dim):  # type: ignore[override]
        ctx.world, ctx.rank, ctx.dim = world, rank, dim
        return all_gather(x_local, group, dim=dim)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return torch.tensor_split(grad, ctx.world, ctx.dim)[ctx.rank].contiguous(), None, None, None, None
