"""Inference with sharded weights: torch FSDP2 (``fully_shard``) over a mesh axis, composed with sequence parallelism.

``shard_weights(model, mesh, axis="sp")`` gives every block of a FLUX or STDiT3 transformer (and the
rest of the model, as one more unit) to FSDP2 over the ranks of ``mesh``'s axis ``axis``: each rank
keeps 1/N of every weight, and a block's weights are all-gathered just before it runs and freed after
(``reshard_after_forward``), the next block's gather issued while the current one computes
(``set_modules_to_forward_prefetch``). Sequence parallelism (``parallelize_flux`` /
``parallelize_stdit``, before or after) and step caching work on the sharded model unchanged: FSDP2
hooks ``__call__`` of each block, the seam's hooks its ``forward``. Any axis works: ``"sp"`` (the
ranks that share one sequence), ``"batch"``, ``"world"`` (every rank of the mesh), ``"ulysses"``,
``"ring"``.

What it is not: training (no gradients are reduced: the weights are frozen here), undoable (FSDP2
replaces the parameters with sharded ones; load a fresh model to go back), or combinable with a CUDA
graph of the whole step (the gathers are collectives FSDP2 issues on its own streams; refused).
"""

from __future__ import annotations

import itertools
from typing import Any

from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, fully_shard

from models.caching.kinds import kind_of, transformer_of
from models.tensor_parallel import is_tensor_parallel
from xdit_core.graphs import CUDA_GRAPH_HOOK
from xdit_core.hooks import get_hook, offload_hook_on
from xdit_core.mesh import ParallelMesh


def shard_weights(target: Any, mesh: ParallelMesh, *, axis: str = "sp", prefetch: bool = True) -> Any:
    """Shard the weights of ``target``'s transformer (a FLUX or STDiT3 model, or a pipeline holding one as
    ``.transformer``) over ``mesh``'s axis ``axis``; returns ``target``. Every rank of the mesh calls it."""
    model = transformer_of(target, "shard_weights")
    if not isinstance(mesh, ParallelMesh):
        raise ValueError(f"shard_weights needs a ParallelMesh, got {type(mesh).__name__}")
    if isinstance(model, FSDPModule):
        raise ValueError("shard_weights: the weights of this model are sharded already")
    if is_tensor_parallel(model):
        raise ValueError(
            "shard_weights: the model is tensor-parallel (its weights are split over the tp axis already); "
            "FSDP2 over another axis on top is not supported"
        )
    if get_hook(model, CUDA_GRAPH_HOOK) is not None:
        raise ValueError(
            "shard_weights: the model replays CUDA graphs (apply_cuda_graph / cuda_graph=True), which cannot "
            "follow FSDP2's weight gathers: remove_cuda_graph(model) first"
        )
    offloaded = offload_hook_on(model)
    if offloaded is not None:
        raise ValueError(f"shard_weights: the model is CPU-offloaded ({offloaded}); shard or offload, not both")
    blocks = kind_of(model, "shard_weights").blocks
    group = mesh.group(axis)
    device_mesh = DeviceMesh.from_group(group, mesh.device_mesh.device_type)
    for block in blocks:
        fully_shard(block, mesh=device_mesh, reshard_after_forward=True)
    fully_shard(model, mesh=device_mesh, reshard_after_forward=True)  # embeddings, norms, output layer
    if prefetch:
        for current, following in itertools.pairwise(blocks):
            current.set_modules_to_forward_prefetch([following])
    model.requires_grad_(False)
    return target


def is_sharded(target: Any) -> bool:
    """Whether :func:`shard_weights` sharded ``target``'s transformer."""
    return isinstance(transformer_of(target, "is_sharded"), FSDPModule)
