"""The process mesh: which ranks form the tensor-parallel, ulysses, ring, batch and sequence-parallel groups.

World ranks are laid out as a ``batch × ring × ulysses × tp`` grid with tp varying fastest, then
ulysses, so each tensor-parallel group, then each ulysses group, is a run of contiguous ranks (the
fast links on one host)::

    rank = ((batch_rank * ring_size + ring_rank) * ulysses_size + ulysses_rank) * tp_size + tp_rank
    sp_rank = ring_rank * ulysses_size + ulysses_rank

The ranks of one tensor-parallel group hold the same tokens and split the weights; the sequence-parallel
group of a rank is the ranks with its batch and tp coordinates.

``sp_rank`` is the index of the sequence chunk a rank owns (``shard_sequence`` takes chunk ``sp_rank``);
Ulysses and ring attention assume exactly this order, so it is defined here once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from xdit_core.peer import PeerExchange

AXES = ("batch", "ring", "ulysses", "tp")


def mesh_coordinates(rank: int, *, ulysses: int, ring: int, batch: int = 1, tp: int = 1) -> tuple[int, ...]:
    """``(batch_rank, ring_rank, ulysses_rank)`` of a world rank in a ``batch × ring × ulysses × tp`` grid
    (with ``tp > 1``: ``(batch_rank, ring_rank, ulysses_rank, tp_rank)``)."""
    _check_degrees(ulysses, ring, batch, tp)
    if not 0 <= rank < ulysses * ring * batch * tp:
        raise ValueError(f"rank {rank} is outside a mesh of {ulysses * ring * batch * tp} ranks")
    tp_rank, rank = rank % tp, rank // tp
    ulysses_rank = rank % ulysses
    ring_rank = (rank // ulysses) % ring
    batch_rank = rank // (ulysses * ring)
    return (batch_rank, ring_rank, ulysses_rank) + ((tp_rank,) if tp > 1 else ())


def sp_index(ring_rank: int, ulysses_rank: int, ulysses: int) -> int:
    """The sequence chunk owned by the rank at ``(ring_rank, ulysses_rank)``."""
    return ring_rank * ulysses + ulysses_rank


def _check_degrees(ulysses: int, ring: int, batch: int, tp: int = 1) -> None:
    for name, value in (("ulysses", ulysses), ("ring", ring), ("batch", batch), ("tp", tp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"mesh degree {name}={value!r} must be a positive integer")


def _check_flags(**flags: object) -> None:
    for name, value in flags.items():
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def _check_ranks(ranks: Sequence[int], world: int) -> list[int]:
    members = list(ranks)
    if not members or any(not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < world for r in members):
        raise ValueError(f"ranks {members} must be world ranks (0 to {world - 1})")
    if len(set(members)) != len(members):
        raise ValueError(f"ranks {members} name a rank twice")
    return members


def _device_type(device_type: str | None) -> str:
    """``"cuda"`` for an NCCL world and ``"cpu"`` otherwise, unless given."""
    if device_type is None:
        return "cuda" if dist.get_backend() == "nccl" else "cpu"
    return device_type


def _subgroups(member_lists: list[list[int]]) -> dist.ProcessGroup | None:
    """This rank's group among ``member_lists`` (every rank creates all of them, in order), or ``None``."""
    mine = None
    for members in member_lists:
        group = dist.new_group(sorted(members))
        if dist.get_rank() in members:
            mine = group
    return mine


def suggest_meshes(world_size: int) -> list[str]:
    """Every ``ulysses × ring`` split of ``world_size`` (batch 1), as readable strings."""
    return [f"ulysses={u}, ring={world_size // u}" for u in range(1, world_size + 1) if world_size % u == 0]


@dataclass(frozen=True)
class ParallelMesh:
    """A ``batch × ring × ulysses × tp`` mesh of named axes over ranks of an initialised ``torch.distributed`` world.

    Build it with :meth:`build` (a layout of the world's ranks, or of a subset) or
    :meth:`from_device_mesh` (a torch ``DeviceMesh`` you already have); every communicating
    function takes it (or one of its groups) explicitly. Groups by name (:meth:`group`): one per
    axis in ``AXES``, ``"sp"`` (``ring × ulysses`` flattened: the ranks that share one sequence,
    group rank = ``sp_rank``) and ``"world"`` (every rank of the mesh: what the VAE decoder splits
    its rows over). ``degrees`` / ``coordinates``: each axis's size and this rank's index on it.
    ``ulysses_exchange`` is the ulysses group's :class:`PeerExchange` if the mesh was built with
    ``peer_exchange=True`` (``None`` otherwise); ``ulysses_transport`` is what Ulysses uses.
    ``check_ranks``: what the mesh's users (USP, ``gather_sequence``, the model adapters) do by
    default: agree across ranks on each new call signature before communicating (``xdit_core.agreement``).
    The properties of the fixed-axis mesh (``ulysses_group``, ``ring_size``, ``sp_rank``, ...) read these.
    """

    device_mesh: DeviceMesh
    degrees: Mapping[str, int]
    coordinates: Mapping[str, int]
    groups: Mapping[str, dist.ProcessGroup]
    ulysses_exchange: PeerExchange | None = None
    check_ranks: bool = True

    def group(self, name: str) -> dist.ProcessGroup:
        """The process group of axis ``name`` (one of ``AXES``), of ``"sp"`` or of ``"world"``."""
        if name not in self.groups:
            raise ValueError(f"ParallelMesh has no group {name!r}; it has {sorted(self.groups)}")
        return self.groups[name]

    def size(self, name: str) -> int:
        """The number of ranks in :meth:`group` ``(name)``."""
        return self.group(name).size()

    def rank(self, name: str) -> int:
        """This rank's index in :meth:`group` ``(name)``."""
        return self.group(name).rank()

    # The fixed-axis names of the first mesh (kept: every adapter and test reads them).
    ulysses_group = property(lambda self: self.groups["ulysses"])
    ring_group = property(lambda self: self.groups["ring"])
    batch_group = property(lambda self: self.groups["batch"])
    sp_group = property(lambda self: self.groups["sp"])
    world_group = property(lambda self: self.groups["world"])
    ulysses_size = property(lambda self: self.degrees["ulysses"])
    ring_size = property(lambda self: self.degrees["ring"])
    batch_size = property(lambda self: self.degrees["batch"])
    ulysses_rank = property(lambda self: self.coordinates["ulysses"])
    ring_rank = property(lambda self: self.coordinates["ring"])
    batch_rank = property(lambda self: self.coordinates["batch"])
    tp_group = property(lambda self: self.groups["tp"])
    tp_size = property(lambda self: self.degrees["tp"])
    tp_rank = property(lambda self: self.coordinates["tp"])

    @property
    def ulysses_transport(self) -> dist.ProcessGroup | PeerExchange:
        """The ulysses group's all-to-all transport: its ``PeerExchange`` if there is one, else the group."""
        return self.ulysses_group if self.ulysses_exchange is None else self.ulysses_exchange

    @property
    def sp_size(self) -> int:
        """Number of ranks sharing one sequence (``ulysses_size * ring_size``)."""
        return self.ulysses_size * self.ring_size

    @property
    def sp_rank(self) -> int:
        """Index of the sequence chunk this rank owns, in ``shard_sequence`` order."""
        return sp_index(self.ring_rank, self.ulysses_rank, self.ulysses_size)

    @property
    def world_size(self) -> int:
        """Number of ranks in the mesh (all of the world's, or the subset it was built on)."""
        return self.sp_size * self.batch_size * self.tp_size

    @classmethod
    def build(
        cls,
        *,
        ulysses: int = 1,
        ring: int = 1,
        batch: int = 1,
        tp: int = 1,
        ranks: Sequence[int] | None = None,
        device_type: str | None = None,
        peer_exchange: bool = False,
        check_ranks: bool = True,
    ) -> ParallelMesh | None:
        """Build the mesh over the world's ranks (or over ``ranks``); ``ulysses * ring * batch * tp`` must match
        their count. ``tp``: the tensor-parallel degree (the fastest-varying axis: a tensor-parallel group is
        a run of contiguous ranks), for models made tensor-parallel (``models.parallelize_flux``).

        ``ranks``: the world ranks the mesh spans, in increasing order (laid out ulysses fastest),
        for several models or replicas in one job; every rank of the world must call ``build`` alike
        (creating process groups is collective), and ranks outside ``ranks`` get ``None``.
        ``device_type`` defaults to ``"cuda"`` for an NCCL world and ``"cpu"`` otherwise.
        ``peer_exchange=True`` (CUDA, the ulysses group's GPUs able to map each other's memory, as
        over NVLink): Ulysses' all-to-alls write straight into the peers' memory
        (:class:`PeerExchange`) instead of going through NCCL. No effect when ``ulysses == 1``.
        ``check_ranks=False`` turns off the rank-agreement check of the mesh's users (saves a few
        microseconds of host time per call; a disagreement then aborts or hangs instead of raising).
        """
        _check_degrees(ulysses, ring, batch, tp)
        _check_flags(peer_exchange=peer_exchange, check_ranks=check_ranks)
        if not dist.is_initialized():
            raise ValueError(
                "ParallelMesh.build needs an initialised torch.distributed world: call "
                "xdit_core.init_distributed() under torchrun, or run inside xdit_core.spawn(...)"
            )
        world = dist.get_world_size()
        members = list(range(world)) if ranks is None else _check_ranks(ranks, world)
        if ulysses * ring * batch * tp != len(members):
            where = f"the world size {world}" if ranks is None else f"the {len(members)} ranks {members}"
            fixed, tp_text = batch * tp, f" × tp={tp}" if tp > 1 else ""
            raise ValueError(
                f"mesh degrees ulysses={ulysses} × ring={ring} × batch={batch}{tp_text} = {ulysses * ring * fixed} "
                f"do not match {where}; with batch={batch}{tp_text.replace(' ×', ',')} choose one of: "
                + (
                    "; ".join(suggest_meshes(len(members) // fixed))
                    if len(members) % fixed == 0
                    else f"(none: batch={batch}{tp_text} does not divide {len(members)})"
                )
            )
        device_type = _device_type(device_type)
        # the torch device mesh has a tp dim only when there is tensor parallelism (as before it existed)
        names = AXES if tp > 1 else AXES[:3]
        shape = (batch, ring, ulysses, tp)[: len(names)]
        layout = torch.tensor(members).reshape(shape)
        if ranks is None:
            device_mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
        else:
            device_mesh = DeviceMesh(device_type, layout, mesh_dim_names=names)
        layout = layout.reshape(batch, ring, ulysses, tp)
        return cls._from_layout(device_mesh, layout, peer_exchange, check_ranks)

    @classmethod
    def from_device_mesh(
        cls, device_mesh: DeviceMesh, *, peer_exchange: bool = False, check_ranks: bool = True
    ) -> ParallelMesh | None:
        """The mesh of a torch ``DeviceMesh`` you already have (e.g. the one given to diffusers'
        ``ContextParallelConfig(mesh=...)``): its dims named from ``AXES`` (``"batch"``, ``"ring"``,
        ``"ulysses"``, ``"tp"``; any subset, in this order; a missing axis has degree 1).

        The world ranks must increase along the mesh (tp fastest, then ulysses, ring, batch), as a
        process group numbers its ranks in world-rank order: a device mesh laid out otherwise is
        refused, naming its layout. Every rank of the world calls it; ranks outside the device mesh get ``None``.
        """
        if not isinstance(device_mesh, DeviceMesh):
            raise ValueError(f"from_device_mesh needs a torch DeviceMesh, got {type(device_mesh).__name__}")
        _check_flags(peer_exchange=peer_exchange, check_ranks=check_ranks)
        names = tuple(device_mesh.mesh_dim_names or ())
        if not names or any(n not in AXES for n in names) or list(names) != [a for a in AXES if a in names]:
            raise ValueError(
                f"from_device_mesh: the device mesh's dims must be named from {AXES}, in that order "
                f"(a subset is fine), got {names or 'no names'}"
            )
        sizes = dict(zip(names, device_mesh.mesh.shape, strict=True))
        layout = device_mesh.mesh.reshape([sizes.get(a, 1) for a in AXES])
        return cls._from_layout(device_mesh, layout, peer_exchange, check_ranks)

    @classmethod
    def _from_layout(
        cls, device_mesh: DeviceMesh, layout: torch.Tensor, peer_exchange: bool, check_ranks: bool
    ) -> ParallelMesh | None:
        """The mesh over ``layout`` (``[batch, ring, ulysses, tp]`` world ranks); every world rank calls it."""
        batch, ring, ulysses, tp = layout.shape
        # per (batch, tp) index: the sp ranks in sp_rank order
        sequences = layout.permute(0, 3, 1, 2).reshape(batch * tp, ring * ulysses)
        members = layout.flatten().tolist()
        if members != sorted(members):
            raise ValueError(
                "ParallelMesh: the world ranks must increase along the mesh (tp fastest, then ulysses, ring, "
                f"batch), got {layout.tolist()}: a process group numbers its ranks in world-rank order, and "
                "shard_sequence gives chunk i to group rank i"
            )
        device_type = device_mesh.device_type
        if peer_exchange and device_type != "cuda":
            raise ValueError(f"peer_exchange=True needs a CUDA mesh (symmetric memory), not {device_type!r}")
        # Every rank must create every group, in the same order (new_group is collective over the world).
        whole = len(members) == dist.get_world_size()
        groups = {"sp": _subgroups(sequences.tolist()), "world": dist.group.WORLD if whole else _subgroups([members])}
        names = tuple(device_mesh.mesh_dim_names or ())
        singles = _subgroups([[r] for r in members]) if any(a not in names for a in AXES) else None
        me = dist.get_rank()
        if me not in members:
            return None
        coordinate = dict(zip(AXES, (int(i[0]) for i in torch.nonzero(layout == me, as_tuple=True)), strict=True))
        for axis in AXES:  # an axis the device mesh lacks has degree 1: a group of this rank alone
            groups[axis] = device_mesh.get_group(axis) if axis in names else singles
        ulysses_group = groups["ulysses"]
        return cls(
            device_mesh=device_mesh,
            degrees=MappingProxyType(dict(zip(AXES, (batch, ring, ulysses, tp), strict=True))),
            coordinates=MappingProxyType(coordinate),
            groups=MappingProxyType(groups),
            ulysses_exchange=PeerExchange(ulysses_group) if peer_exchange and ulysses > 1 else None,
            check_ranks=check_ranks,
        )

    def describe(self) -> str:
        """A short label such as ``"u2×r2"``, ``"b2×u2×r1"`` or ``"u2×r1×t2"``."""
        label = f"u{self.ulysses_size}×r{self.ring_size}"
        label = label if self.batch_size == 1 else f"b{self.batch_size}×{label}"
        return label if self.tp_size == 1 else f"{label}×t{self.tp_size}"
