"""Mesh, start-up and collectives for sequence-parallel attention."""

from xdit_core.collectives import (
    all_gather,
    all_to_all,
    broadcast_tensors,
    gather_sequence,
    shard_sequence,
    split_sizes,
)
from xdit_core.launch import DistributedContext, init_distributed, spawn
from xdit_core.mesh import ParallelMesh, mesh_coordinates, sp_index
from xdit_core.peer import PeerExchange
from xdit_core.ring_exchange import RingExchange

__all__ = [
    "DistributedContext",
    "ParallelMesh",
    "PeerExchange",
    "RingExchange",
    "all_gather",
    "all_to_all",
    "broadcast_tensors",
    "gather_sequence",
    "init_distributed",
    "mesh_coordinates",
    "shard_sequence",
    "sp_index",
    "spawn",
    "split_sizes",
]
