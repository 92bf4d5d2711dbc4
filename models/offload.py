"""CPU offload for the pipelines, parallel or not: the weights live in CPU memory and come to the GPU to compute.

Three modes, each on the mechanism the field maintains (accelerate's hooks as diffusers uses them,
diffusers' group offloading), made to compose with this project's parallel models:

============  ==========================================================================  =========================
mode          what is on the GPU while a component computes                               mechanism
============  ==========================================================================  =========================
``model``     the whole component (text encoder, transformer, VAE); the previous one      accelerate's
              goes back to the CPU when the next one starts                               ``cpu_offload_with_hook``
``layerwise`` ``blocks_per_group`` blocks of the transformer / text encoder at a time     diffusers'
              (plus the layers outside the blocks); with ``prefetch`` the next group      ``apply_group_offloading``
              is copied on a side CUDA stream while the current one computes             (``block_level``)
``sequential`` one leaf layer at a time (weights kept on the CPU, copied per call):        accelerate's
              least memory, slowest                                                        ``cpu_offload``
============  ==========================================================================  =========================

A parallel VAE (``parallel_vae``) is offloaded as a whole in every mode (onloaded for its decode,
offloaded after the call): its banded decode reads some weights directly rather than through the
layers' ``forward``, which per-layer hooks cannot see. It is small (0.17 GB for FLUX, 0.39 GB for
Open-Sora's); its activations, which ``vae_tile_rows`` bounds, are what counts.

Composition: the seam's hooks (parallel boundary, CFG pairing, step cache) sit *below* accelerate's
and diffusers' hooks on the same ``forward`` whichever is installed first (:mod:`xdit_core.hooks`), so
offload moves the weights and the inputs, then the parallel call runs. Refused with a clear error:
CUDA graphs (``apply_cuda_graph``: a graph replays the addresses of its capture; either order),
FSDP2-sharded weights (``shard_weights``: the weights are already split; either order), a second
offload on the same pipeline, ``prefetch`` without CUDA. ``device`` is where the components compute
(each rank its own GPU; the CPU in tests).

The pipelines call this module: ``ParallelFluxPipeline.enable_model_cpu_offload() /
enable_group_offload(...) / enable_sequential_cpu_offload()`` (diffusers' names) and
``OpenSoraPipeline.enable_offload(mode, device=...)``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

from xdit_core.graphs import CUDA_GRAPH_HOOK
from xdit_core.hooks import get_hook, offload_hook_on

MODES = ("model", "layerwise", "sequential")


@dataclass
class Offload:
    """A pipeline's offload: ``mode``, the ``device`` its components compute on, ``blocks_per_group`` and
    ``prefetch`` (layerwise), and the accelerate hooks that onload whole components (``hooks``, by name)."""

    mode: str
    device: torch.device
    blocks_per_group: int = 1
    prefetch: bool = False
    hooks: dict[str, Any] = field(default_factory=dict)

    def onload(self, name: str, module: torch.nn.Module) -> None:
        """Bring the whole component ``name`` to the device now (for entry points other than ``forward``)."""
        if name in self.hooks:
            self.hooks[name].hook.pre_forward(module)  # accelerate's CpuOffload: to the device, the previous one back

    def release(self) -> None:
        """After a pipeline call: every whole-component hook puts its component back on the CPU."""
        for hook in self.hooks.values():
            hook.offload()


def resolve_offload(
    mode: str,
    *,
    device: str | torch.device | None,
    blocks_per_group: int,
    prefetch: bool | None,
    transformer: torch.nn.Module,
    current: Offload | None,
    what: str,
) -> Offload:
    """Check the request against the model's state (before anything moves) and return the :class:`Offload`."""
    if mode not in MODES:
        raise ValueError(f"{what}: unknown offload mode {mode!r}; one of {list(MODES)}")
    if current is not None:
        raise ValueError(f"{what}: the pipeline is offloaded already ({current.mode!r}); load it again to change")
    if device is None:
        if not torch.cuda.is_available():
            raise ValueError(f"{what}: no CUDA device here; pass device= (the device the components compute on)")
        device = torch.device("cuda", torch.cuda.current_device())
    device = torch.device(device)
    if device.type == "meta":
        raise ValueError(f"{what}: cannot compute on the meta device")
    if isinstance(blocks_per_group, bool) or not isinstance(blocks_per_group, int) or blocks_per_group < 1:
        raise ValueError(f"{what}: blocks_per_group must be a positive int, got {blocks_per_group!r}")
    prefetch = (mode == "layerwise" and device.type == "cuda") if prefetch is None else prefetch
    if prefetch and (mode != "layerwise" or device.type != "cuda"):
        raise ValueError(f"{what}: prefetch (a side CUDA stream) needs mode 'layerwise' on a CUDA device")
    if get_hook(transformer, CUDA_GRAPH_HOOK) is not None:
        raise ValueError(
            f"{what}: the transformer replays CUDA graphs, which hold the weights' addresses of their capture: "
            "remove_cuda_graph(transformer) first"
        )
    if isinstance(transformer, FSDPModule):
        raise ValueError(
            f"{what}: the transformer's weights are sharded with FSDP2 (shard_weights); offload one or other"
        )
    found = offload_hook_on(transformer)
    if found is not None:
        raise ValueError(f"{what}: offload hooks are on the transformer already ({found})")
    return Offload(mode, device, blocks_per_group, prefetch)


def offload_components(components: Iterable[tuple[str, torch.nn.Module | None]], offload: Offload, *, whole=()) -> None:
    """Offload each named component (``None`` ones are skipped, e.g. text encoders a rank does not hold)
    by ``offload.mode``, in the order given (the order they run: in the ``model`` mode each one's onload
    sends the previous one back). Components named in ``whole`` are offloaded whole in every mode; their
    hooks land in ``offload.hooks`` (call :meth:`Offload.onload` before using them other than by ``forward``)."""
    from accelerate import cpu_offload, cpu_offload_with_hook
    from diffusers.hooks import apply_group_offloading

    previous = None
    for name, module in components:
        if module is None:
            continue
        if offload.mode == "model" or name in whole:
            module, previous = cpu_offload_with_hook(module, offload.device, prev_module_hook=previous)
            offload.hooks[name] = previous
        elif offload.mode == "layerwise":
            apply_group_offloading(
                module,
                onload_device=offload.device,
                offload_type="block_level",
                num_blocks_per_group=offload.blocks_per_group,
                use_stream=offload.prefetch,
                non_blocking=offload.prefetch,
            )
        else:
            cpu_offload(module, offload.device, offload_buffers=len(module._parameters) > 0)
