"""What the step cache needs to know of a model: its blocks in call order, their streams, its parallel state.

A *kind* lists the model's blocks in the order its forward calls them, grouped into units (FLUX: one
block per unit, 19 dual-stream then 38 single-stream; STDiT3: a (spatial, temporal) pair per unit),
reads the streams a block takes and returns (FLUX: ``(hidden_states, encoder_hidden_states)``, both
kinds of block return ``(encoder_hidden_states, hidden_states)``; STDiT3: the tokens ``x``), and
finds the parallel adapter's per-call layout, which says which samples this rank holds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import nn

from models.flux.adapter import BOUNDARY_HOOK as FLUX_BOUNDARY
from models.flux.adapter import cfg_branches
from models.stdit.model import STDiT3
from models.stdit.parallel import BOUNDARY_HOOK as STDIT_BOUNDARY
from xdit_core.hooks import get_hook
from xdit_core.mesh import ParallelMesh

Tensor = torch.Tensor


@dataclass(frozen=True)
class Parallel:
    """This rank's part of the call: its mesh (``None``: one process), the adapter's layout of the call,
    and where its samples start among ``total``."""

    mesh: ParallelMesh | None
    layout: Any
    start: int
    total: int


@dataclass(frozen=True)
class Kind:
    name: str
    blocks: list[nn.Module]
    unit: int  # blocks per unit
    streams: Callable[[tuple, dict], tuple[Tensor, ...]]  # a block call's input streams
    unpack: Callable[[Any], tuple[Tensor, ...]]  # a block's output → streams
    pack: Callable[[tuple[Tensor, ...]], Any]  # streams → a block's output
    boundary: str  # the parallel adapter's boundary hook
    paired: Callable[[nn.Module], tuple[str, ...] | None]  # the branch names of a paired call in progress
    refused: tuple[str, ...] = ()  # forward arguments the cache cannot follow

    @property
    def units(self) -> int:
        return len(self.blocks) // self.unit

    def parallel(self, model: nn.Module, local_batch: int) -> Parallel:
        boundary = get_hook(model, self.boundary)
        if boundary is None:
            return Parallel(None, None, 0, local_batch)
        mesh, layout = boundary.state.mesh, boundary.state.context.layout
        rank = mesh.rank("batch")
        return Parallel(mesh, layout, sum(layout.samples[:rank]), sum(layout.samples))

    def branches(self, model: nn.Module) -> tuple[str, ...] | None:
        """The names of a paired call's branches, cond first (``None``: not a paired call)."""
        return self.paired(model)


def _flux_branches(model: nn.Module) -> tuple[str, ...] | None:
    pair = cfg_branches(model)
    return None if pair is None else pair.names


def _flux_streams(args: tuple, kwargs: dict) -> tuple[Tensor, Tensor]:
    hidden = args[0] if args else kwargs["hidden_states"]
    context = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
    return hidden, context


def transformer_of(target: Any, what: str) -> nn.Module:
    """The transformer of a pipeline (``.transformer``), or ``target`` itself if it is a module."""
    if isinstance(target, nn.Module):
        return target
    model = getattr(target, "transformer", None)
    if isinstance(model, nn.Module):
        return model
    raise ValueError(f"{what}: need a transformer or a pipeline with .transformer, got {type(target).__name__}")


def kind_of(model: nn.Module, what: str = "enable_cache") -> Kind:
    """The cache's view of ``model``; a ``ValueError`` (naming ``what`` was called) for a model whose blocks
    it cannot address."""
    if isinstance(model, FluxTransformer2DModel):
        return Kind(
            "FLUX",
            [*model.transformer_blocks, *model.single_transformer_blocks],
            1,
            _flux_streams,
            lambda out: (out[1], out[0]),
            lambda streams: (streams[1], streams[0]),
            FLUX_BOUNDARY,
            _flux_branches,
            ("controlnet_block_samples", "controlnet_single_block_samples"),
        )
    if isinstance(model, STDiT3):
        pairs = [b for pair in zip(model.spatial_blocks, model.temporal_blocks, strict=True) for b in pair]
        return Kind(
            "STDiT3",
            pairs,
            2,
            lambda args, kwargs: (args[0] if args else kwargs["x"],),
            lambda out: (out,),
            lambda streams: streams[0],
            STDIT_BOUNDARY,
            lambda model: None,  # the Open-Sora sampler's CFG pair is one batch on one process too
        )
    raise ValueError(
        f"{what}: cannot address the blocks of a {type(model).__name__} (supported: diffusers' "
        "FluxTransformer2DModel, STDiT3, and pipelines holding one as .transformer)"
    )
