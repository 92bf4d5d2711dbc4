"""Collectives with autograd: all-to-all, sequence shard and sequence gather.

Every function takes its process group (or mesh) explicitly. Hot paths ask the group itself for its
size and this rank (``group.size()``, ``group.rank()``): ``dist.get_world_size(group)`` costs
several microseconds of Python per call. Gradients follow the single-device
semantics: a tensor replicated on every rank gets the full gradient on every rank.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from xdit_core.agreement import agreed
from xdit_core.blocks import as_words, block_shape, block_words, pack_block
from xdit_core.peer import PeerExchange

if TYPE_CHECKING:
    from xdit_core.mesh import ParallelMesh

Group = dist.ProcessGroup | PeerExchange


def process_group_of(group: Group) -> dist.ProcessGroup:
    """The process group under a transport (a ``PeerExchange``'s group, or the group itself)."""
    return group.group if isinstance(group, PeerExchange) else group


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``torch.tensor_split`` of ``total`` items into ``parts`` chunks (the first ones larger)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def resolve_lengths(
    seq_len: int | Sequence[int] | None, group_size: int, group_rank: int, local_len: int, what: str
) -> list[int]:
    """Every rank's sequence length, in group-rank order, decided from arguments alone.

    ``None``: every rank holds ``local_len`` tokens (equal chunks). An int ``L``: the
    ``shard_sequence`` layout (``torch.tensor_split`` of ``L`` tokens). A sequence: the lengths
    themselves. This rank's own length must match, so a wrong layout raises before communicating.
    """
    if seq_len is None:
        lengths = [local_len] * group_size
    elif _is_int(seq_len):
        if seq_len < 1:
            raise ValueError(f"{what}: seq_len={seq_len} must be at least 1")
        lengths = split_sizes(int(seq_len), group_size)
    else:
        if not isinstance(seq_len, Sequence) or isinstance(seq_len, str) or not all(_is_int(n) for n in seq_len):
            raise ValueError(
                f"{what}: seq_len must be None, an int (the global length) or a list of ints (every rank's "
                f"length), got {seq_len!r:.80}"
            )
        lengths = [int(n) for n in seq_len]
        if len(lengths) != group_size or min(lengths) < 0 or sum(lengths) < 1:
            raise ValueError(
                f"{what}: seq_len {list(seq_len)} must give {group_size} non-negative lengths "
                "(one per sequence-parallel rank, in sp_rank order) with at least one token"
            )
    if lengths[group_rank] != local_len:
        raise ValueError(
            f"{what}: this rank (chunk {group_rank} of {group_size}) holds {local_len} tokens, but the layout "
            f"{lengths} gives it {lengths[group_rank]}; shard with shard_sequence(x, mesh) and pass the same seq_len"
        )
    return lengths


def _is_int(n: object) -> bool:
    """An integer (Python or NumPy / torch integer scalar), not a bool or a float."""
    if isinstance(n, bool):
        return False
    try:
        operator.index(n)
    except TypeError:
        return False
    return True


def check_dim(dim: object, ndim: int, what: str) -> int:
    """``dim`` as a non-negative index into ``ndim`` dims; out-of-range or non-integer dims raise."""
    if not _is_int(dim) or not -ndim <= int(dim) < ndim:
        raise ValueError(f"{what}: dim {dim!r} is out of range for a {ndim}-D tensor (valid: {-ndim} to {ndim - 1})")
    return int(dim) % ndim


def _all_to_all_forward(
    tensors: tuple[torch.Tensor, ...],
    group: Group,
    scatter_dim: int,
    gather_dim: int,
    scatter_sizes: list[int],
    gather_sizes: list[int],
    transient: bool = False,
) -> tuple[torch.Tensor, ...]:
    """One ``all_to_all_single`` (or one peer exchange) for all tensors (same shape and dtype).

    The block for rank ``p`` is ``[gather, T, rest...]``: this rank's gather-dim entries first, the T
    tensors next, then the remaining dims with ``scatter_sizes[p]`` entries of the scatter dim. The
    received blocks concatenate along their first dim, so every output is a view of the buffer.
    """
    nd = tensors[0].dim()
    back = [*range(1, gather_dim + 1), 0, *range(gather_dim + 1, nd)]  # the gather dim back in its place
    if isinstance(group, PeerExchange):
        recv = group.exchange(tensors, scatter_dim, gather_dim, scatter_sizes, gather_sizes, transient)
        return tuple(recv.select(1, t).permute(back) for t in range(len(tensors)))
    world, me = group.size(), group.rank()
    x0 = tensors[0]
    if len(tensors) == 1 and x0.is_contiguous() and math.prod(x0.shape[:scatter_dim]) == 1:
        return (_exchange_in_place(x0, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes),)
    count = len(tensors)

    def numel(rows: int, scatter: int) -> int:  # of one block
        return math.prod(block_shape(x0.shape, count, scatter_dim, gather_dim, rows, scatter))

    if len(set(scatter_sizes)) == 1:  # equal split: one copy kernel
        # view the scatter dim as (rank, entries), then order dims as (rank, gather, rest...)
        split = [*x0.shape[:scatter_dim], world, scatter_sizes[0], *x0.shape[scatter_dim + 1 :]]
        g = gather_dim if gather_dim < scatter_dim else gather_dim + 1
        order = [scatter_dim, g, *(i for i in range(nd + 1) if i not in (scatter_dim, g))]
        parts = [x.reshape(split).permute(order) for x in tensors]  # [P, gather, rest...] each
        send = x0.new_empty((*parts[0].shape[:2], count, *parts[0].shape[2:]))
        send_w, *parts_w = as_words(send, *parts)
        torch.stack(parts_w, dim=2, out=send_w)  # into a contiguous buffer: one copy kernel per tensor
        send = send.view(-1)
    else:
        words = block_words(tensors, scatter_dim, gather_dim)
        shapes = [
            block_shape(words[0].shape, count, scatter_dim, gather_dim, x0.shape[gather_dim], s) for s in scatter_sizes
        ]
        send_w = words[0].new_empty(sum(math.prod(shape) for shape in shapes))
        offset = start = 0
        for size, shape in zip(scatter_sizes, shapes, strict=True):
            pack_block(
                words, scatter_dim, gather_dim, start, size, send_w[offset : offset + math.prod(shape)].view(shape)
            )
            offset, start = offset + math.prod(shape), start + size
        send = send_w.view(x0.dtype)
    recv = send.new_empty(block_shape(x0.shape, count, scatter_dim, gather_dim, sum(gather_sizes), scatter_sizes[me]))
    if len(set(scatter_sizes)) == 1 and len(set(gather_sizes)) == 1:
        dist.all_to_all_single(recv.view(-1), send, group=group)
    else:
        send_counts = [numel(x0.shape[gather_dim], size) for size in scatter_sizes]
        recv_counts = [numel(rows, scatter_sizes[me]) for rows in gather_sizes]
        dist.all_to_all_single(recv.view(-1), send, recv_counts, send_counts, group=group)
    return tuple(recv.select(1, t).permute(back) for t in range(len(tensors)))


def _exchange_in_place(
    x: torch.Tensor,
    group: dist.ProcessGroup,
    scatter_dim: int,
    gather_dim: int,
    scatter_sizes: list[int],
    gather_sizes: list[int],
) -> torch.Tensor:
    """The same exchange for one tensor whose scatter-dim chunks already lie one after another.

    (Contiguous, every dim before the scatter dim of size 1: Ulysses' output for ``B = 1``.) The
    tensor is sent as it is, and one ``cat`` places the received pieces: one copy, contiguous output.
    """
    me = group.rank()

    def numel(scatter: int, gather: int) -> int:
        shape = list(x.shape)
        shape[scatter_dim], shape[gather_dim] = scatter, gather
        return math.prod(shape)

    send_counts = [numel(n, x.shape[gather_dim]) for n in scatter_sizes]
    recv_counts = [numel(scatter_sizes[me], n) for n in gather_sizes]
    recv = x.new_empty(sum(recv_counts))
    if len(set(send_counts)) == 1 and len(set(recv_counts)) == 1:
        dist.all_to_all_single(recv, x.view(-1), group=group)
    else:
        dist.all_to_all_single(recv, x.view(-1), recv_counts, send_counts, group=group)
    pieces, offset = [], 0
    for n, count in zip(gather_sizes, recv_counts, strict=True):
        shape = list(x.shape)
        shape[scatter_dim], shape[gather_dim] = scatter_sizes[me], n
        pieces.append(recv[offset : offset + count].view(shape))
        offset += count
    return torch.cat(pieces, dim=gather_dim)


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes, *tensors):  # type: ignore[override]
        ctx.args = (group, gather_dim, scatter_dim, gather_sizes, scatter_sizes)  # the inverse exchange
        return _all_to_all_forward(tensors, group, scatter_dim, gather_dim, scatter_sizes, gather_sizes)

    @staticmethod
    def backward(ctx, *grads):  # type: ignore[override]
        grads = tuple(torch.zeros_like(g) if g is None else g for g in grads)
        return (None, None, None, None, None, *_all_to_all_forward(grads, *ctx.args))


def all_to_all(
    tensors: list[torch.Tensor] | tuple[torch.Tensor, ...],
    group: Group,
    *,
    scatter_dim: int,
    gather_dim: int,
    scatter_sizes: list[int] | None = None,
    gather_sizes: list[int] | None = None,
    transient: bool = False,
    check_ranks: bool = True,
) -> tuple[torch.Tensor, ...]:
    """Scatter ``scatter_dim`` and gather ``gather_dim`` across ``group``, in one collective.

    Each tensor's ``scatter_dim`` is cut into ``scatter_sizes`` (default: ``P = group size`` equal
    chunks); chunk ``p`` goes to rank ``p``; the chunks received are concatenated along
    ``gather_dim`` in rank order, rank ``p`` contributing ``gather_sizes[p]`` entries (default: as
    many as this rank has). E.g. for Ulysses, ``[B, S_local, H, D]`` with ``scatter_dim=2,
    gather_dim=1`` becomes ``[B, S, H/P, D]``; uneven sizes give uneven heads and lengths, exactly.
    Every rank must pass the same size lists. All tensors must share shape, dtype and device (q, k
    and v travel together). Outputs are views of one receive buffer. Differentiable.

    ``group`` is a process group (NCCL / gloo ``all_to_all_single``) or a
    :class:`~xdit_core.peer.PeerExchange` (direct writes into the peers' symmetric memory). With a
    ``PeerExchange`` the outputs are copied out of its buffer, unless ``transient=True`` and no
    gradient is needed: then they are views of the buffer, kernels that read them must be issued
    before the next exchange on that ``PeerExchange``, and transient exchanges come in pairs
    (``xdit_core.peer``'s notes). Ulysses uses that for its two exchanges.

    ``check_ranks``: first agree with the group's ranks that all pass the same sizes, dims,
    dtypes and shapes (one small collective per new call signature; ``xdit_core.agreement``).
    """
    tensors = tuple(tensors)
    grad = torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in tensors)
    plan = agreed(
        process_group_of(group),
        "all_to_all",
        check_ranks,
        lambda: _plan_all_to_all(
            tensors, group.size(), group.rank(), scatter_dim, gather_dim, scatter_sizes, gather_sizes
        ),
        _ALL_TO_ALL_NAMES,
        lambda plan: (
            len(tensors),
            tensors[0].dtype,
            tensors[0].device.type,
            plan.shape,
            (plan.scatter_dim, plan.gather_dim),
            tuple(plan.scatter_sizes),
            tuple(plan.gather_sizes),
            grad,
        ),
    )
    if group.size() == 1:
        return tensors
    args = (plan.scatter_dim, plan.gather_dim, plan.scatter_sizes, plan.gather_sizes)
    if not grad:  # inference: skip autograd's cost
        return _all_to_all_forward(tensors, group, *args, transient)
    return _AllToAll.apply(group, *args, *tensors)


_ALL_TO_ALL_NAMES = (
    "tensors",
    "dtype",
    "device type",
    "shape (gather dim as -1)",
    "scatter_dim, gather_dim",
    "scatter_sizes",
    "gather_sizes",
    "gradients",
)


@dataclass(frozen=True)
class _AllToAllPlan:
    scatter_dim: int
    gather_dim: int
    scatter_sizes: list[int]
    gather_sizes: list[int]
    shape: tuple[int, ...]  # the tensors' shape with the gather dim as -1 (what every rank shares)


def _plan_all_to_all(
    tensors: tuple[torch.Tensor, ...],
    world: int,
    me: int,
    scatter_dim: int,
    gather_dim: int,
    scatter_sizes: list[int] | None,
    gather_sizes: list[int] | None,
) -> _AllToAllPlan:
    if not tensors or not all(isinstance(x, torch.Tensor) for x in tensors):
        raise ValueError("all_to_all needs at least one tensor (and only tensors)")
    x0 = tensors[0]
    for x in tensors[1:]:
        if x.shape != x0.shape or x.dtype != x0.dtype or x.device != x0.device:
            raise ValueError(
                f"all_to_all tensors must share shape/dtype/device: {tuple(x0.shape)} {x0.dtype} {x0.device} "
                f"vs {tuple(x.shape)} {x.dtype} {x.device}"
            )
    nd = x0.dim()
    scatter_dim, gather_dim = check_dim(scatter_dim, nd, "all_to_all"), check_dim(gather_dim, nd, "all_to_all")
    if scatter_dim == gather_dim:
        raise ValueError(f"scatter_dim and gather_dim must differ, both are {scatter_dim}")
    size = x0.shape[scatter_dim]
    if scatter_sizes is None:
        if size % world:
            raise ValueError(
                f"all_to_all: dim {scatter_dim} of size {size} does not split into {world} equal chunks; "
                "pass scatter_sizes for an uneven split"
            )
        scatter_sizes = [size // world] * world
    if gather_sizes is None:
        gather_sizes = [x0.shape[gather_dim]] * world
    for name, sizes in (("scatter_sizes", scatter_sizes), ("gather_sizes", gather_sizes)):
        if not all(_is_int(n) for n in sizes) or len(sizes) != world or min(sizes) < 0:
            raise ValueError(f"all_to_all: {name} {list(sizes)} must hold {world} non-negative ints, one per rank")
    scatter_sizes, gather_sizes = [int(n) for n in scatter_sizes], [int(n) for n in gather_sizes]
    if sum(scatter_sizes) != size:
        raise ValueError(f"all_to_all: scatter_sizes {scatter_sizes} sum to {sum(scatter_sizes)}, dim has {size}")
    if gather_sizes[me] != x0.shape[gather_dim]:
        raise ValueError(
            f"all_to_all: gather_sizes[{me}] = {gather_sizes[me]} but this rank's dim {gather_dim} has "
            f"{x0.shape[gather_dim]} entries"
        )
    shape = tuple(-1 if d == gather_dim else n for d, n in enumerate(x0.shape))
    return _AllToAllPlan(scatter_dim, gather_dim, scatter_sizes, gather_sizes, shape)


def shard(x: torch.Tensor, group: dist.ProcessGroup, *, dim: int) -> torch.Tensor:
    """This rank's chunk of a tensor replicated over ``group``: ``tensor_split(x, size, dim)[rank]``.

    Differentiable: the gradient of ``x`` is all-gathered over ``group``, so the replicated ``x``
    receives the full (single-device) gradient on every rank.
    """
    dim = check_dim(dim, x.dim(), "shard")
    world = group.size()
    if world == 1:
        return x
    return _Shard.apply(x, group, split_sizes(x.shape[dim], world), group.rank(), dim)


def gather(x_local: torch.Tensor, group: dist.ProcessGroup, *, dim: int, sizes: list[int]) -> torch.Tensor:
    """Every rank's chunk (``sizes[p]`` entries from rank ``p``) concatenated along ``dim``, on every rank.

    Differentiable: the gradient is this rank's chunk of the (replicated) output gradient. For
    callers that have validated the layout already (no rank agreement here; see :func:`gather_sequence`).
    """
    dim = check_dim(dim, x_local.dim(), "gather")
    if group.size() == 1:
        return x_local
    return _Gather.apply(x_local, group, sizes, group.rank(), dim)


def reduce_gradients(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """``x`` (replicated over ``group``, each rank using it for its share of the work) unchanged;
    its gradient is summed over ``group``, so every rank gets the full single-device gradient."""
    if group.size() == 1 or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    return _ReduceGradients.apply(x, group)


def shard_sequence(x: torch.Tensor, mesh: ParallelMesh, dim: int = 1) -> torch.Tensor:
    """This rank's chunk of a tensor replicated on every rank: ``tensor_split(x, sp_size, dim)[sp_rank]``.

    Any length: the first ``L % sp_size`` chunks are one longer, and a rank may get none. The
    gradient of ``x`` is the full single-device gradient on every rank (see :func:`shard`).
    """
    return shard(x, mesh.sp_group, dim=dim)


def gather_sequence(
    x_local: torch.Tensor,
    mesh: ParallelMesh,
    dim: int = 1,
    seq_len: int | Sequence[int] | None = None,
    *,
    check_ranks: bool | None = None,
) -> torch.Tensor:
    """Concatenate every sequence-parallel rank's chunk along ``dim``, in ``sp_rank`` order.

    ``seq_len``: ``None`` (every chunk has this rank's length), the global length ``L`` (the
    ``shard_sequence`` layout) or every rank's length; the result has exactly ``L`` entries along
    ``dim``, replicated on every rank. Differentiable: the gradient is this rank's chunk of the
    (replicated) output gradient. ``check_ranks`` (``None``: ``mesh.check_ranks``): the ranks first
    agree on the layout, shape and dtype (``xdit_core.agreement``).
    """

    def validate() -> tuple[int, list[int]]:
        d = check_dim(dim, x_local.dim(), "gather_sequence")
        return d, resolve_lengths(seq_len, mesh.sp_size, mesh.sp_rank, x_local.shape[d], "gather_sequence")

    d, sizes = agreed(
        mesh.sp_group,
        "gather_sequence",
        mesh.check_ranks if check_ranks is None else check_ranks,
        validate,
        _GATHER_NAMES,
        lambda plan: _gather_values(x_local, *plan),
    )
    return gather(x_local, mesh.sp_group, dim=d, sizes=sizes)


_GATHER_NAMES = ("shape (gathered dim as -1)", "dim", "dtype", "device type", "sizes", "gradients")


def _gather_values(x: torch.Tensor, dim: int, sizes: list[int] | None) -> tuple[object, ...]:
    """What the ranks of a gather share (``_GATHER_NAMES``): the shape but for the gathered dim, the
    dtype, every rank's size."""
    shape = tuple(-1 if d == dim and sizes is not None else n for d, n in enumerate(x.shape))
    grad = torch.is_grad_enabled() and x.requires_grad
    return (shape, dim, x.dtype, x.device.type, None if sizes is None else tuple(sizes), grad)


def _check_sizes(sizes: object, world: int, me: int, extent: int, what: str) -> list[int]:
    if not isinstance(sizes, Sequence) or len(sizes) != world or not all(_is_int(n) and n >= 0 for n in sizes):
        raise ValueError(f"{what}: sizes {sizes!r:.80} must hold {world} non-negative ints, one per rank")
    if sizes[me] != extent:
        raise ValueError(f"{what}: sizes[{me}] = {sizes[me]} but this rank's tensor has {extent} entries along dim")
    return [int(n) for n in sizes]


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather(
    x: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    dim: int,
    sizes: list[int] | None = None,
    check_ranks: bool = True,
) -> torch.Tensor:
    """Concatenate every rank's ``x`` along ``dim`` in group-rank order.

    ``sizes``: every rank's extent along ``dim`` (default: all equal to this rank's). Uneven chunks
    travel padded to the longest and are cut back, so the result has exactly ``sum(sizes)``
    entries. One collective; not differentiable (see ``gather_sequence`` for the autograd version).
    ``check_ranks``: the ranks first agree on sizes, shapes and dtype (``xdit_core.agreement``).
    """

    def validate() -> tuple[int, list[int] | None]:
        d = check_dim(dim, x.dim(), "all_gather")
        return d, None if sizes is None else _check_sizes(sizes, group.size(), group.rank(), x.shape[d], "all_gather")

    d, checked = agreed(
        group, "all_gather", check_ranks, validate, _GATHER_NAMES, lambda plan: _gather_values(x, *plan)
    )
    return _all_gather(x, group, d, checked)


def _all_gather(x: torch.Tensor, group: dist.ProcessGroup, dim: int, sizes: list[int] | None) -> torch.Tensor:
    world = group.size()
    x = _padded_leading(x, dim, x.shape[dim] if sizes is None else max(sizes))
    out = x.new_empty((world * x.shape[0], *x.shape[1:]))
    _all_gather_single(out, x, group=group)
    out = out.unflatten(0, (world, -1))  # [P, longest, ...]
    if sizes is not None and len(set(sizes)) > 1:
        return torch.cat([out[p, :n] for p, n in enumerate(sizes)]).movedim(0, dim)
    return out.flatten(0, 1).movedim(0, dim)


def gather_to(
    x: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    dim: int,
    sizes: list[int],
    dst: int,
    check_ranks: bool = True,
) -> torch.Tensor | None:
    """On group rank ``dst``: every rank's ``x`` concatenated along ``dim`` (``sizes[p]`` entries from
    rank ``p``, uneven chunks padded for transport and cut back); ``None`` on the other ranks. One
    collective; not differentiable. ``check_ranks`` as in :func:`all_gather` (``dst`` included)."""

    def validate() -> tuple[int, list[int]]:
        if not _is_int(dst) or not 0 <= dst < group.size():
            raise ValueError(f"gather_to: dst {dst!r} is not a rank of a group of {group.size()}")
        d = check_dim(dim, x.dim(), "gather_to")
        return d, _check_sizes(sizes, group.size(), group.rank(), x.shape[d], "gather_to")

    d, checked = agreed(
        group,
        "gather_to",
        check_ranks,
        validate,
        (*_GATHER_NAMES, "dst"),
        lambda plan: (*_gather_values(x, *plan), dst),
    )
    if group.size() == 1:
        return x
    x = _padded_leading(x, d, max(checked))
    chunks = [torch.empty_like(x) for _ in checked] if group.rank() == dst else None
    dist.gather(x, chunks, group=group, group_dst=dst)
    if chunks is None:
        return None
    return torch.cat([c[:n] for c, n in zip(chunks, checked, strict=True)]).movedim(0, d)


def _padded_leading(x: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """``x`` with ``dim`` moved first and zero-padded to ``length`` entries, contiguous (for transport)."""
    if x.shape[dim] < length:
        pad = list(x.shape)
        pad[dim] = length - x.shape[dim]
        x = torch.cat((x, x.new_zeros(pad)), dim)
    return x.movedim(dim, 0).contiguous()


class _Shard(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, sizes, rank, dim):  # type: ignore[override]
        ctx.group, ctx.sizes, ctx.dim = group, sizes, dim
        return torch.tensor_split(x, len(sizes), dim)[rank].clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return _all_gather(grad, ctx.group, ctx.dim, ctx.sizes), None, None, None, None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_local, group, sizes, rank, dim):  # type: ignore[override]
        ctx.sizes, ctx.rank, ctx.dim = sizes, rank, dim
        return _all_gather(x_local, group, dim, sizes)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        start = sum(ctx.sizes[: ctx.rank])
        return grad.narrow(ctx.dim, start, ctx.sizes[ctx.rank]).contiguous(), None, None, None, None


class _ReduceGradients(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):  # type: ignore[override]
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def broadcast_tensors(
    tensors: Sequence[torch.Tensor] | None, group: dist.ProcessGroup, *, src: int, device: torch.device
) -> list[torch.Tensor]:
    """Rank ``src`` of ``group`` (a group rank) sends ``tensors``; every rank returns them on ``device``.

    Other ranks pass ``None``: the shapes and dtypes travel first, so only ``src`` needs to know them.
    """
    meta: list[Any] = [None]
    if group.rank() == src:
        if tensors is None:
            raise ValueError("broadcast_tensors: the source rank must pass its tensors")
        meta = [[(tuple(t.shape), t.dtype) for t in tensors]]
    dist.broadcast_object_list(meta, group=group, group_src=src, device=device)
    out = []
    for i, (shape, dtype) in enumerate(meta[0]):
        t = (
            tensors[i].to(device).contiguous()
            if group.rank() == src
            else torch.empty(shape, dtype=dtype, device=device)
        )
        dist.broadcast(t, group=group, group_src=src)
        out.append(t)
    return out
