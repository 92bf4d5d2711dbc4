"""A stock diffusers ``FluxPipeline`` generating in parallel (a tiny random one for CPUs: :mod:`models.testing`).

:func:`parallelize_flux_pipeline` parallelizes the pipeline's transformer and returns a
:class:`ParallelFluxPipeline` that is called like the pipeline on every rank. Around the stock
call it makes the parallel parts agree: the mesh's rank 0 encodes the prompts (the other ranks may
have no text encoders) and every rank receives the embeddings; rank 0 draws the initial latents
from the caller's generator and every rank starts from them; with true CFG on a mesh with a
``batch`` axis, the cond and uncond passes of each step run as one batch split over that axis.
The VAE decodes across every rank (row bands, ``parallel_vae``). Every rank gets the images
(saving them is the caller's choice, usually on rank 0).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import FluxPipeline

from models.flux.adapter import BOUNDARY_HOOK, CfgPair, pair_cfg_calls, parallelize_flux, unparallelize_flux
from models.offload import Offload, offload_components, resolve_offload
from parallel_vae import is_parallel_vae, parallelize_vae, unparallelize_vae
from xdit_core.hooks import get_hook
from xdit_core.mesh import ParallelMesh
from xdit_core.on_rank import compute_on_rank


class ParallelFluxPipeline:
    """A ``FluxPipeline`` whose transformer runs on ``mesh``; call it as the pipeline, on every rank."""

    def __init__(self, pipe: FluxPipeline, mesh: ParallelMesh) -> None:
        self.pipe = pipe
        self.mesh = mesh
        self.offload: Offload | None = None

    def enable_model_cpu_offload(self, device: str | torch.device | None = None) -> None:
        """Model-level offload, as ``FluxPipeline.enable_model_cpu_offload``: each component comes to ``device``
        (default: this process's CUDA device) when it runs, the previous one goes back; from pinned memory,
        with no copy back (:class:`models.offload.WholeOffload`, and why it is not accelerate's hook)."""
        self._offload_components(self._resolve("model", device=device, blocks_per_group=1, prefetch=None))

    def enable_group_offload(
        self, onload_device: str | torch.device, *, num_blocks_per_group: int = 1, use_stream: bool | None = None
    ) -> None:
        """Layerwise offload (diffusers' group offloading): ``num_blocks_per_group`` blocks of the transformer
        (and one layer of each text encoder) on ``onload_device`` at a time; ``use_stream`` (default: on
        CUDA with one block per group) copies the next block on a side stream while the current one
        computes. A parallel VAE is offloaded whole (:mod:`models.offload`)."""
        offload = self._resolve(
            "layerwise", device=onload_device, blocks_per_group=num_blocks_per_group, prefetch=use_stream
        )
        self._offload_components(offload)

    def enable_sequential_cpu_offload(self, device: str | torch.device | None = None) -> None:
        """Sequential offload (accelerate's ``cpu_offload``, as ``FluxPipeline.enable_sequential_cpu_offload``):
        one layer's weights on ``device`` at a time. A parallel VAE is offloaded whole (:mod:`models.offload`)."""
        self._offload_components(self._resolve("sequential", device=device, blocks_per_group=1, prefetch=None))

    def _resolve(self, mode: str, **kwargs: Any) -> Offload:
        what = f"ParallelFluxPipeline ({mode} offload)"
        return resolve_offload(mode, transformer=self.pipe.transformer, current=self.offload, what=what, **kwargs)

    def _offload_components(self, offload: Offload) -> None:
        pipe = self.pipe
        order = pipe.model_cpu_offload_seq.split("->")
        modules = [(name, c) for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)]
        modules.sort(key=lambda item: order.index(item[0]) if item[0] in order else len(order))
        offload_components(modules, offload, whole={"vae"} if is_parallel_vae(pipe.vae) else set())
        self.offload = offload

    @property
    def transformer(self) -> Any:
        """The pipeline's (parallel) transformer: where a step cache attaches (``models.caching``)."""
        return self.pipe.transformer

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        *,
        true_cfg_scale: float = 1.0,
        height: int | None = None,
        width: int | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        max_sequence_length: int = 512,
        **kwargs: Any,
    ) -> Any:
        """Generate as ``FluxPipeline.__call__`` does; takes its other keyword arguments as they are.

        ``prompt`` and ``generator`` matter on the mesh's rank 0 only (it encodes and draws the latents).
        """
        embed_names = (
            "prompt_embeds",
            "pooled_prompt_embeds",
            "negative_prompt_embeds",
            "negative_pooled_prompt_embeds",
        )
        for name in embed_names:
            if kwargs.get(name) is not None:
                raise ValueError(f"ParallelFluxPipeline encodes the prompts itself: pass prompts, not {name}")
        pipe, world = self.pipe, self.mesh.world_group
        device = pipe._execution_device
        height = height or pipe.default_sample_size * pipe.vae_scale_factor
        width = width or pipe.default_sample_size * pipe.vae_scale_factor
        true_cfg = true_cfg_scale > 1 and negative_prompt is not None
        if prompt is None:
            raise ValueError("ParallelFluxPipeline: pass the prompt (on every rank; rank 0 encodes it)")

        def encode_and_draw() -> dict[str, torch.Tensor | None]:
            return self._encode_and_draw(
                prompt, prompt_2, negative_prompt if true_cfg else None, negative_prompt_2, num_images_per_prompt,
                max_sequence_length, height, width, generator, latents,
            )  # fmt: skip

        what = "ParallelFluxPipeline: encoding the prompt and drawing the latents"
        got = compute_on_rank(encode_and_draw, world, src=0, device=device, what=what)
        call = dict(
            kwargs,
            height=height,
            width=width,
            latents=got["latents"],
            max_sequence_length=max_sequence_length,
            prompt_embeds=got["prompt_embeds"],
            pooled_prompt_embeds=got["pooled_prompt_embeds"],
        )
        if true_cfg:
            call.update(
                negative_prompt_embeds=got["negative_prompt_embeds"],
                negative_pooled_prompt_embeds=got["negative_pooled_prompt_embeds"],
                true_cfg_scale=true_cfg_scale,
            )
        pair = self.mesh.batch_size > 1 and true_cfg
        if pair:
            negative = (got["negative_prompt_embeds"], got["negative_pooled_prompt_embeds"], got["negative_text_ids"])
            pair_cfg_calls(pipe.transformer, CfgPair(*negative))
        failed = True
        try:
            out = pipe(**call)
            failed = False
            return out
        finally:
            if pair:
                pair_cfg_calls(pipe.transformer, None)
            boundary = get_hook(pipe.transformer, BOUNDARY_HOOK)
            if boundary is not None:
                boundary.end_pipeline_call(failed=failed)
            if self.offload is not None:
                self.offload.release()

    def _encode_and_draw(
        self,
        prompt: str | list[str],
        prompt_2: str | list[str] | None,
        negative_prompt: str | list[str] | None,
        negative_prompt_2: str | list[str] | None,
        num_images_per_prompt: int,
        max_sequence_length: int,
        height: int,
        width: int,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> dict[str, torch.Tensor | None]:
        """Rank 0's part, as a named record: the prompt's and the negative prompt's (or ``None``) embeddings,
        pooled embeddings and text ids, and the latents."""
        pipe = self.pipe
        device = pipe._execution_device
        encode = dict(
            device=device, num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length
        )
        embeds, pooled, text_ids = pipe.encode_prompt(prompt, prompt_2, **encode)
        negative = (None, None, None)
        if negative_prompt is not None:
            negative = pipe.encode_prompt(negative_prompt, negative_prompt_2, **encode)
        record: dict[str, torch.Tensor | None] = {
            "prompt_embeds": embeds,
            "pooled_prompt_embeds": pooled,
            "text_ids": text_ids,
            "negative_prompt_embeds": negative[0],
            "negative_pooled_prompt_embeds": negative[1],
            "negative_text_ids": negative[2],
        }
        channels = pipe.transformer.config.in_channels // 4
        record["latents"], _ = pipe.prepare_latents(
            embeds.shape[0], channels, height, width, embeds.dtype, device, generator, latents
        )
        return record


TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")


def load_flux_pipeline(path: str, mesh: ParallelMesh, **kwargs: Any) -> FluxPipeline:
    """``FluxPipeline.from_pretrained(path, **kwargs)`` on every rank of ``mesh``, the text encoders and
    tokenizers loaded only on the rank that encodes the prompts (the mesh's rank 0): on FLUX.1-dev in
    bf16 each other rank skips T5-XXL and CLIP-L (4.76 G + 0.12 G parameters, 9.8 GB).
    Then :func:`parallelize_flux_pipeline` the result as usual."""
    if not isinstance(mesh, ParallelMesh):
        raise ValueError(f"load_flux_pipeline needs a ParallelMesh, got {type(mesh).__name__}")
    if mesh.world_group.rank() != 0:
        clash = sorted(set(TEXT_COMPONENTS) & set(kwargs))
        if clash:
            raise ValueError(f"load_flux_pipeline: {clash} are not loaded on ranks that do not encode text")
        kwargs.update(dict.fromkeys(TEXT_COMPONENTS))
    return FluxPipeline.from_pretrained(path, **kwargs)


def parallelize_flux_pipeline(
    pipe: FluxPipeline,
    mesh: ParallelMesh,
    *,
    text: str = "shard",
    backend: str = "auto",
    cuda_graph: bool = False,
    vae: bool = True,
    vae_tile_rows: int | None = None,
) -> ParallelFluxPipeline:
    """Parallelize ``pipe.transformer`` on ``mesh`` (see :func:`~models.flux.parallelize_flux`) and wrap ``pipe``.

    ``vae``: also decode across every rank of the mesh (:func:`~parallel_vae.parallelize_vae`,
    row bands, exact; ``vae_tile_rows`` caps its slabs); ``False`` leaves the VAE as it is.
    """
    if not isinstance(pipe, FluxPipeline):
        raise ValueError(f"parallelize_flux_pipeline needs a diffusers FluxPipeline, got {type(pipe).__name__}")
    if vae:
        parallelize_vae(pipe.vae, mesh, tile_rows=vae_tile_rows)
    try:
        parallelize_flux(pipe.transformer, mesh, text=text, backend=backend, cuda_graph=cuda_graph)
    except Exception:
        if vae:
            unparallelize_vae(pipe.vae)
        raise
    return ParallelFluxPipeline(pipe, mesh)


def unparallelize_flux_pipeline(parallel: ParallelFluxPipeline) -> FluxPipeline:
    """The plain pipeline back, its transformer (and VAE, if it was parallelized) restored."""
    unparallelize_flux(parallel.pipe.transformer)
    if is_parallel_vae(parallel.pipe.vae):
        unparallelize_vae(parallel.pipe.vae)
    return parallel.pipe
