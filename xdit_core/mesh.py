"""The process mesh: which ranks form the ulysses, ring, batch and sequence-parallel groups.

World ranks are laid out as a ``batch × ring × ulysses`` grid with ulysses varying fastest, so each
ulysses group is a run of contiguous ranks (the fast links on one host)::

    rank = (batch_rank * ring_size + ring_rank) * ulysses_size + ulysses_rank
    sp_rank = ring_rank * ulysses_size + ulysses_rank

``sp_rank`` is the index of the sequence chunk a rank owns (``shard_sequence`` takes chunk ``sp_rank``);
Ulysses and ring attention assume exactly this order, so it is defined here once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from xdit_core.peer import PeerExchange

AXES = ("batch", "ring", "ulysses")


def mesh_coordinates(rank: int, *, ulysses: int, ring: int, batch: int = 1) -> tuple[int, int, int]:
    """``(batch_rank, ring_rank, ulysses_rank)`` of a world rank in a ``batch × ring × ulysses`` grid."""
    _check_degrees(ulysses, ring, batch)
    if not 0 <= rank < ulysses * ring * batch:
        raise ValueError(f"rank {rank} is outside a mesh of {ulysses * ring * batch} ranks")
    ulysses_rank = rank % ulysses
    ring_rank = (rank // ulysses) % ring
    batch_rank = rank // (ulysses * ring)
    return batch_rank, ring_rank, ulysses_rank


def sp_index(ring_rank: int, ulysses_rank: int, ulysses: int) -> int:
    """The sequence chunk owned by the rank at ``(ring_rank, ulysses_rank)``."""
    return ring_rank * ulysses + ulysses_rank


def _check_degrees(ulysses: int, ring: int, batch: int) -> None:
    for name, value in (("ulysses", ulysses), ("ring", ring), ("batch", batch)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"mesh degree {name}={value!r} must be a positive integer")


def suggest_meshes(world_size: int) -> list[str]:
    """Every ``ulysses × ring`` split of ``world_size`` (batch 1), as readable strings."""
    return [f"ulysses={u}, ring={world_size // u}" for u in range(1, world_size + 1) if world_size % u == 0]


@dataclass(frozen=True)
class ParallelMesh:
    """A ``batch × ring × ulysses`` mesh over an initialised ``torch.distributed`` world.

    Build it with :meth:`build`; every communicating function takes it (or one of its groups)
    explicitly. ``sp_group`` spans ``ring × ulysses`` (the ranks that share one sequence);
    ``world_group`` spans every rank of the mesh (what the VAE decoder splits its rows over).
    ``ulysses_exchange`` is the ulysses group's :class:`PeerExchange` if the mesh was built with
    ``peer_exchange=True`` (``None`` otherwise); ``ulysses_transport`` is what Ulysses uses.
    ``check_ranks``: what the mesh's users (USP, ``gather_sequence``, the model adapters) do by
    default: agree across ranks on each new call signature before communicating (``xdit_core.agreement``).
    """

    device_mesh: DeviceMesh
    world_group: dist.ProcessGroup
    ulysses_group: dist.ProcessGroup
    ring_group: dist.ProcessGroup
    batch_group: dist.ProcessGroup
    sp_group: dist.ProcessGroup
    ulysses_size: int
    ring_size: int
    batch_size: int
    ulysses_rank: int
    ring_rank: int
    batch_rank: int
    ulysses_exchange: PeerExchange | None = None
    check_ranks: bool = True

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
        return self.sp_size * self.batch_size

    @classmethod
    def build(
        cls,
        *,
        ulysses: int = 1,
        ring: int = 1,
        batch: int = 1,
        device_type: str | None = None,
        peer_exchange: bool = False,
        check_ranks: bool = True,
    ) -> ParallelMesh:
        """Build the mesh over the current world; ``ulysses * ring * batch`` must equal its size.

        ``device_type`` defaults to ``"cuda"`` for an NCCL world and ``"cpu"`` otherwise.
        ``peer_exchange=True`` (CUDA, the ulysses group's GPUs able to map each other's memory, as
        over NVLink): Ulysses' all-to-alls write straight into the peers' memory
        (:class:`PeerExchange`) instead of going through NCCL. No effect when ``ulysses == 1``.
        ``check_ranks=False`` turns off the rank-agreement check of the mesh's users (saves a few
        microseconds of host time per call; a disagreement then aborts or hangs instead of raising).
        """
        _check_degrees(ulysses, ring, batch)
        if not isinstance(check_ranks, bool):
            raise ValueError(f"check_ranks must be True or False, got {check_ranks!r}")
        if not dist.is_initialized():
            raise ValueError(
                "ParallelMesh.build needs an initialised torch.distributed world: call "
                "xdit_core.init_distributed() under torchrun, or run inside xdit_core.spawn(...)"
            )
        world = dist.get_world_size()
        if ulysses * ring * batch != world:
            raise ValueError(
                f"mesh degrees ulysses={ulysses} × ring={ring} × batch={batch} = {ulysses * ring * batch} "
                f"do not match the world size {world}; with batch={batch} choose one of: "
                + (
                    "; ".join(suggest_meshes(world // batch))
                    if world % batch == 0
                    else f"(none: batch={batch} does not divide {world})"
                )
            )
        if device_type is None:
            device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
        if peer_exchange and device_type != "cuda":
            raise ValueError(f"peer_exchange=True needs a CUDA mesh (symmetric memory), not {device_type!r}")
        device_mesh = init_device_mesh(device_type, (batch, ring, ulysses), mesh_dim_names=AXES)
        batch_rank, ring_rank, ulysses_rank = mesh_coordinates(dist.get_rank(), ulysses=ulysses, ring=ring, batch=batch)
        sp = ulysses * ring
        # Every rank must create every sp group, in the same order.
        sp_group, _ = dist.new_subgroups_by_enumeration([list(range(b * sp, (b + 1) * sp)) for b in range(batch)])
        ulysses_group = device_mesh.get_group("ulysses")
        return cls(
            device_mesh=device_mesh,
            world_group=dist.group.WORLD,  # the mesh spans the whole world (checked above)
            ulysses_group=ulysses_group,
            ring_group=device_mesh.get_group("ring"),
            batch_group=device_mesh.get_group("batch"),
            sp_group=sp_group,
            ulysses_size=ulysses,
            ring_size=ring,
            batch_size=batch,
            ulysses_rank=ulysses_rank,
            ring_rank=ring_rank,
            batch_rank=batch_rank,
            ulysses_exchange=PeerExchange(ulysses_group) if peer_exchange and ulysses > 1 else None,
            check_ranks=check_ranks,
        )

    def describe(self) -> str:
        """A short label such as ``"u2×r2"`` or ``"b2×u2×r1"``."""
        label = f"u{self.ulysses_size}×r{self.ring_size}"
        return label if self.batch_size == 1 else f"b{self.batch_size}×{label}"
