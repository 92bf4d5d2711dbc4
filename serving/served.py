"""The model a server runs: a parallel pipeline on the mesh, what requests it accepts, and one batch's run.

Every rank holds a :class:`ServedFlux` or :class:`ServedOpenSora` and calls ``run`` with the same
requests in the same order (the engine makes sure of that); the pipeline's own collectives do the rest.

Batching. ``ServedFlux.run`` generates every image of every request in one pipeline call: the prompts
side by side and one generator per image (image ``i`` of a request from ``seed + i``), so each image is
the one the request gives alone. On a mesh with a ``batch`` axis the samples are split over it; a call
with fewer images than the axis (and no true-CFG pair to fill it) is padded with a copy of the last
image, whose result is dropped: the idle ranks compute a throwaway instead of the call being refused.
Open-Sora's sampler draws one noise tensor per call, so videos run one at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from models import load_flux_pipeline, parallelize_flux_pipeline, tiny_flux_pipeline
from models.flux.pipeline import ParallelFluxPipeline
from models.stdit.pipeline import OpenSoraPipeline, image_size, parallelize_opensora
from models.testing import tiny_opensora_pipeline
from serving.launch_checks import least_height
from serving.schema import ImageLimits, ImageRequest, VideoLimits, VideoRequest
from xdit_core import ParallelMesh

OnStep = Callable[[float], None]  # called on every rank at each denoising step's end: the fraction done


@dataclass
class ServedFlux:
    """A FLUX pipeline on the mesh, serving ``POST /v1/images/generations``."""

    pipe: ParallelFluxPipeline
    limits: ImageLimits
    max_sequence_length: int
    kind = "image"

    def run(self, requests: list[ImageRequest], on_step: OnStep | None = None) -> list[list[Any]]:
        """Every request's images (PIL), on every rank; one pipeline call for all of them."""
        first = requests[0]
        if any(r.batch_key() != first.batch_key() for r in requests):
            raise ValueError("ServedFlux.run: the requests of one batch must have equal batch keys")
        device = self.pipe.pipe._execution_device
        prompts = [r.prompt for r in requests for _ in range(r.n)]
        negatives = [r.negative_prompt for r in requests for _ in range(r.n)]
        seeds = [r.seed + i for r in requests for i in range(r.n)]
        true_cfg = first.true_cfg_scale > 1
        images = len(prompts)
        pad = 0 if true_cfg else max(0, self.pipe.mesh.batch_size - images)
        prompts, negatives, seeds = (
            prompts + prompts[-1:] * pad,
            negatives + negatives[-1:] * pad,
            seeds + seeds[-1:] * pad,
        )

        def step_end(pipe: Any, step: int, timestep: Any, values: dict[str, Any]) -> dict[str, Any]:
            if on_step is not None:
                on_step((step + 1) / first.steps)
            return values

        out = self.pipe(
            prompts,
            negative_prompt=negatives if true_cfg else None,
            true_cfg_scale=first.true_cfg_scale,
            height=first.height,
            width=first.width,
            num_inference_steps=first.steps,
            guidance_scale=first.guidance_scale,
            max_sequence_length=self.max_sequence_length,
            generator=[torch.Generator(device).manual_seed(s) for s in seeds],
            callback_on_step_end=step_end,
        ).images[:images]
        per_request, start = [], 0
        for r in requests:
            per_request.append(out[start : start + r.n])
            start += r.n
        return per_request


@dataclass
class ServedOpenSora:
    """An Open-Sora pipeline on the mesh, serving ``POST /v1/videos``; the video comes back on rank 0."""

    pipe: OpenSoraPipeline
    limits: VideoLimits
    clean_caption: bool = True
    kind = "video"

    def run(self, requests: list[VideoRequest], on_step: OnStep | None = None) -> list[torch.Tensor | None]:
        """The video ``[3, T, H, W]`` (CPU, range [−1, 1]) of each request on rank 0, ``None`` elsewhere."""
        videos = []
        for r in requests:

            def steps(values: Iterable[int], r: VideoRequest = r) -> Iterator[int]:
                for i in values:
                    yield i
                    if on_step is not None:
                        on_step((i + 1) / r.steps)

            out = self.pipe(
                r.prompt, height=r.height, width=r.width, num_frames=r.num_frames, steps=r.steps,
                cfg_scale=r.guidance_scale, seed=r.seed, fps=r.fps, clean_caption=self.clean_caption, progress=steps,
            )  # fmt: skip
            videos.append(None if out.video is None else out.video[0].float().cpu())
        return videos


Served = ServedFlux | ServedOpenSora


def build_flux(
    mesh: ParallelMesh,
    device: torch.device,
    *,
    model_path: str | None,
    multiple: int,
    max_batch_images: int,
    cuda_graph: bool = False,
    pipe: Any = None,
) -> ServedFlux:
    """FLUX on ``mesh``: the tiny random pipeline without ``model_path`` (float32 on CPU), else the local
    diffusers folder (bf16 on GPUs); ``pipe``: a ``FluxPipeline`` already built (benchmarks)."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tiny = model_path is None and pipe is None
    if pipe is None:
        pipe = (
            tiny_flux_pipeline(seed=0, dtype=dtype) if tiny else load_flux_pipeline(model_path, mesh, torch_dtype=dtype)
        )
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    parallel = parallelize_flux_pipeline(pipe, mesh, cuda_graph=cuda_graph)
    name = "flux-tiny" if tiny else "flux" if model_path is None else model_path.rstrip("/").split("/")[-1]
    limits = ImageLimits(
        model=name,
        default_size=(64, 64) if tiny else (1024, 1024),
        multiple=multiple,
        max_pixels=256 * 256 if tiny else 2048 * 2048,
        default_steps=4 if tiny else 28,
        max_steps=100,
        max_images=max_batch_images,
        min_height=least_height(mesh.world_size, multiple),  # one latent row per rank
    )
    return ServedFlux(parallel, limits, max_sequence_length=64 if tiny else 512)


def build_opensora(
    mesh: ParallelMesh,
    device: torch.device,
    *,
    paths: tuple[str, str, str] | None,
    rank: int,
) -> ServedOpenSora:
    """Open-Sora on ``mesh``: tiny random models without ``paths`` (STDiT3, VAE, T5 folders); T5 on rank 0 only."""
    if paths is None:
        pipe = tiny_opensora_pipeline(seed=0).to(device)
    else:
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        model, vae, text = paths
        pipe = OpenSoraPipeline.from_pretrained(model, vae, text if rank == 0 else None, dtype=dtype, device=device)
    pipe = parallelize_opensora(pipe, mesh, video_rank=0)
    height, width = image_size("144p" if paths is None else "720p", "9:16")
    limits = VideoLimits(
        model="opensora-tiny" if paths is None else "opensora",
        default_size=(width, height),
        multiple=16,
        max_pixels=256 * 256 if paths is None else 1280 * 720,
        default_frames=17 if paths is None else 102,
        max_frames=51 if paths is None else 408,
        default_steps=4 if paths is None else 30,
        max_steps=100,
    )
    return ServedOpenSora(pipe, limits, clean_caption=paths is not None)
