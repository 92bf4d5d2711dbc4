"""CPU offload for the pipelines, parallel or not: the weights live in CPU memory and come to the GPU to compute.

Three modes, each on the mechanism the field maintains (accelerate's hooks as diffusers uses them,
diffusers' group offloading), made to compose with this project's parallel models:

* ``model``: the whole component (text encoder, transformer, VAE) on the GPU while it runs; the previous
  one goes back to the CPU when the next one starts. :class:`WholeOffload`, on accelerate's hook API.
* ``layerwise``: ``blocks_per_group`` blocks of the transformer at a time (plus the layers outside the
  blocks), one layer of a text encoder at a time; with ``prefetch`` the next one is copied on a side CUDA
  stream while the current one computes. diffusers' ``apply_group_offloading`` (``block_level``;
  ``leaf_level`` for the text encoders).
* ``sequential``: one leaf layer at a time, copied per call: least memory, slowest. accelerate's
  ``cpu_offload``.

Why the ``model`` mode is not accelerate's ``cpu_offload_with_hook`` (what diffusers'
``enable_model_cpu_offload`` installs): that hook moves a component with ``module.to()`` both ways, from
pageable memory, and copies the unchanged weights back on every offload; on the FLUX.1-dev pipeline
(33.5 GB of weights) that cost 31.6 s per call on an H200, against 4.9 s of compute. :class:`WholeOffload`
keeps one pinned CPU copy of each weight, onloads with asynchronous copies from it and offloads by
dropping the device copy (inference does not change weights). It speaks accelerate's hook protocol, so
diffusers (``_execution_device``, the VAE's ``decode``) and this project's refusals see it as theirs.
diffusers' own ``enable_model_cpu_offload`` on the stock pipeline still works, parallelized or not.

Text encoders go layer by layer (diffusers' ``leaf_level``): transformers' T5 and CLIP nest their block
lists (``encoder.block``) where diffusers' block level, which looks among a module's direct children,
does not find them, and its ``block_modules`` recursion registers its prefetch hooks twice with a stream
(diffusers 0.42.1). A whole T5-XXL onloaded as one group was the peak of the layerwise FLUX pipeline.

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

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

from models.tensor_parallel import is_tensor_parallel
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
            self.hooks[name].pre_forward(module)

    def release(self) -> None:
        """After a pipeline call: every whole-component hook puts its component back on the CPU."""
        for hook in self.hooks.values():
            hook.offload()


class _OnDevice:
    """Which whole-offloaded component of a pipeline is on the device (one at a time)."""

    def __init__(self) -> None:
        self.current: WholeOffload | None = None


class WholeOffload:
    """A component offloaded whole: its weights live in one (pinned, on CUDA) CPU copy; the call of its
    ``forward`` (or :meth:`pre_forward`) copies them to ``device`` asynchronously, sending the pipeline's
    previous component back first; :meth:`offload` drops the device copy (no copy back).

    Installed with accelerate's ``add_hook_to_module`` (it implements accelerate's ``ModelHook``
    protocol: ``init_hook``, ``pre_forward``, ``post_forward``, ``detach_hook``), so it is the module's
    ``_hf_hook`` as diffusers' own offload hooks are.
    """

    no_grad = False

    def __init__(self, device: torch.device, on_device: _OnDevice) -> None:
        self.execution_device = device  # read by diffusers' _execution_device
        self.on_device = on_device
        self.tensors: list[tuple[torch.Tensor, torch.Tensor]] = []  # (the module's tensor, its CPU copy)

    def init_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        seen: set[int] = set()
        for tensor in itertools.chain(module.parameters(), module.buffers()):
            if id(tensor) in seen:  # tied weights: one copy
                continue
            seen.add(id(tensor))
            host = tensor.data.to("cpu", copy=True)
            if self.execution_device.type == "cuda":
                host = host.pin_memory()
            tensor.data = host
            self.tensors.append((tensor, host))
        return module

    def pre_forward(self, module: torch.nn.Module, *args: Any, **kwargs: Any) -> tuple[tuple, dict]:
        from accelerate.utils import send_to_device

        if self.on_device.current is not self:
            if self.on_device.current is not None:
                self.on_device.current.offload()
            for tensor, host in self.tensors:
                tensor.data = host.to(self.execution_device, non_blocking=True)
            self.on_device.current = self
        return send_to_device(args, self.execution_device), send_to_device(kwargs, self.execution_device)

    def post_forward(self, module: torch.nn.Module, output: Any) -> Any:
        return output

    def offload(self) -> None:
        """Back to the CPU copy (the device copy is freed once the work queued on it is done)."""
        for tensor, host in self.tensors:
            tensor.data = host
        if self.on_device.current is self:
            self.on_device.current = None

    def detach_hook(self, module: torch.nn.Module) -> torch.nn.Module:
        return module


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
    if prefetch is None:  # the default: prefetch wherever it can run
        prefetch = mode == "layerwise" and device.type == "cuda" and blocks_per_group == 1
    if prefetch and blocks_per_group != 1:
        raise ValueError(
            f"{what}: prefetch copies one block ahead (diffusers' streamed group offloading); "
            f"blocks_per_group must be 1 with it, got {blocks_per_group}"
        )
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
    if is_tensor_parallel(transformer):
        raise ValueError(f"{what}: the transformer is tensor-parallel (DTensor weights); offload does not combine")
    found = offload_hook_on(transformer)
    if found is not None:
        raise ValueError(f"{what}: offload hooks are on the transformer already ({found})")
    return Offload(mode, device, blocks_per_group, prefetch)


def has_block_list(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds its blocks in a list among its direct children (diffusers' transformers,
    STDiT3), which is where diffusers' block-level offloading looks for them."""
    return any(isinstance(child, (torch.nn.ModuleList, torch.nn.Sequential)) for child in module.children())


def offload_components(components: Iterable[tuple[str, torch.nn.Module | None]], offload: Offload, *, whole=()) -> None:
    """Offload each named component (``None`` ones are skipped, e.g. text encoders a rank does not hold)
    by ``offload.mode``, in the order given (the order they run: in the ``model`` mode each one's onload
    sends the previous one back). Components named in ``whole`` are offloaded whole in every mode; their
    hooks land in ``offload.hooks`` (call :meth:`Offload.onload` before using them other than by ``forward``)."""
    from accelerate import cpu_offload
    from accelerate.hooks import add_hook_to_module
    from diffusers.hooks import apply_group_offloading

    on_device = _OnDevice()
    for name, module in components:
        if module is None:
            continue
        if offload.mode == "model" or name in whole:
            hook = offload.hooks[name] = WholeOffload(offload.device, on_device)
            add_hook_to_module(module, hook)
        elif offload.mode == "layerwise":
            blocks = has_block_list(module)
            apply_group_offloading(
                module,
                onload_device=offload.device,
                offload_type="block_level" if blocks else "leaf_level",
                num_blocks_per_group=offload.blocks_per_group if blocks else None,
                use_stream=offload.prefetch,
                non_blocking=offload.prefetch,
            )
        else:
            cpu_offload(module, offload.device, offload_buffers=len(module._parameters) > 0)
