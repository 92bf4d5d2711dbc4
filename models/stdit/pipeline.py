"""Open-Sora 1.2 text-to-video: T5 → rectified-flow sampling on STDiT3 → the video VAE, on one or N ranks.

``OpenSoraPipeline(transformer, vae, text_encoder)(prompt, height=..., width=..., num_frames=...)``
runs the reference's inference path: the prompt gets the aesthetic-score suffix and the caption
cleaning, T5 encodes it (300 tokens), the latent noise ``[1, 4, latent_frames(T), H/8, W/8]`` is
drawn from ``seed``, ``rflow_sample`` denoises it (30 steps, CFG 7, the resolution/length timestep
transform) and the VAE decodes it (``z·scale + shift``, temporal chunks, per-frame spatial decode).

:func:`parallelize_opensora` makes the same call run on a mesh: the transformer through
``parallelize_stdit`` (CFG pair on the ``batch`` axis, positions sharded over the rest), the VAE
through ``parallel_vae.parallelize_vae`` (chunks and frames dealt to every rank), and T5 once on
rank 0 with the embeddings broadcast (the other ranks need no text encoder). The noise is drawn on
the CPU from ``seed``, so every rank — and every device type — starts from the same latents.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from models.offload import Offload, offload_components, resolve_offload
from models.stdit.model import STDiT3
from models.stdit.parallel import parallelize_stdit, unparallelize_stdit
from models.stdit.sampler import rflow_sample
from models.stdit.text import T5TextEncoder, encode_prompts_shared, prompt_for_t5
from models.stdit.video_vae import OpenSoraVAE
from parallel_vae import parallelize_vae, unparallelize_vae
from xdit_core.mesh import ParallelMesh

Tensor = torch.Tensor

# Open-Sora 1.2's resolutions (pixels of the 9:16 size) and durations at 24 fps.
RESOLUTIONS = {
    "144p": 144 * 256,
    "240p": 240 * 426,
    "360p": 360 * 640,
    "480p": 480 * 854,
    "720p": 720 * 1280,
    "1080p": 1080 * 1920,
}
ASPECT_RATIOS = ("9:16", "16:9", "1:1", "3:4", "4:3", "2:3", "3:2", "1:2", "2:1")  # height : width
DURATIONS = {"image": 1, "2s": 51, "4s": 102, "8s": 204, "16s": 408}


def image_size(resolution: str, aspect_ratio: str = "9:16") -> tuple[int, int]:
    """``(height, width)`` in pixels, by Open-Sora's rule: the area of ``resolution``'s 9:16 size at
    ``aspect_ratio`` (height : width), each side rounded to an even number (720p 9:16 → 720×1280,
    1:1 → 960×960, 3:4 → 832×1110; 240p 9:16 → 240×426)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"unsupported resolution {resolution!r}: one of {list(RESOLUTIONS)}")
    if aspect_ratio not in ASPECT_RATIOS:
        raise ValueError(f"unsupported aspect ratio {aspect_ratio!r} (height:width): one of {list(ASPECT_RATIOS)}")
    num, den = (int(v) for v in aspect_ratio.split(":"))
    ratio = num / den

    def even(value: float) -> int:
        up = math.ceil(value + 1e-4)
        return up if up % 2 == 0 else math.floor(value + 1e-4)

    height = even(math.sqrt(RESOLUTIONS[resolution] * ratio))
    return height, even(height / ratio)


def parse_num_frames(value: str | int) -> int:
    """A frame count: a positive int, or a duration name (``image``, ``2s``, ``4s``, ``8s``, ``16s``)."""
    if isinstance(value, str) and value in DURATIONS:
        return DURATIONS[value]
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"unsupported frame count {value!r}: a positive int or one of {list(DURATIONS)}")
    return value


@dataclass
class OpenSoraOutput:
    """``video`` ``[B, 3, T, H, W]`` (nominal range [−1, 1]; ``None`` on ranks that did not receive it),
    the final ``latents``, and ``timings`` in seconds (``text``, ``denoise``, ``decode``, ``total``)."""

    video: Tensor | None
    latents: Tensor
    timings: dict[str, float]


@dataclass
class OpenSoraPipeline:
    """The three models; ``group``/``text_rank``: set by :func:`parallelize_opensora` (text encoded on
    that group rank and broadcast). ``text_encoder`` may be ``None`` where embeddings are passed in,
    or, in parallel, on every rank but ``text_rank``."""

    transformer: STDiT3
    vae: OpenSoraVAE
    text_encoder: T5TextEncoder | None = None
    group: dist.ProcessGroup | None = None
    text_rank: int = 0
    video_rank: int | None = None  # parallel: None gives every rank the video, else that group rank only
    offload: Offload | None = None  # set by enable_offload

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | Path,
        vae_path: str | Path,
        text_encoder_path: str | Path | None,
        *,
        dtype: torch.dtype = torch.bfloat16,
        text_dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> OpenSoraPipeline:
        """Local folders of the STDiT3, the video VAE and T5 (``None``: no text encoder in this
        process). The reference runs STDiT3 and the VAE in bf16 and T5 in float32."""
        transformer = STDiT3.from_pretrained(model_path, dtype=dtype, device=device)
        vae = OpenSoraVAE.from_pretrained(vae_path, dtype=dtype, device=device)
        text = None
        if text_encoder_path is not None:
            text = T5TextEncoder.from_pretrained(text_encoder_path, dtype=text_dtype, device=device)
        return cls(transformer, vae, text)

    def enable_offload(
        self,
        mode: str,
        *,
        device: str | torch.device | None = None,
        blocks_per_group: int = 1,
        prefetch: bool | None = None,
    ) -> OpenSoraPipeline:
        """CPU offload (:mod:`models.offload`): ``"model"`` (T5, STDiT3 and the VAE each on ``device`` while
        it runs), ``"layerwise"`` (``blocks_per_group`` blocks of STDiT3 and of T5 at a time, the next block
        copied on a side stream when ``prefetch``, default on CUDA with one block per group) or
        ``"sequential"`` (one layer at a time). The VAE is offloaded whole in every mode. Before or after
        :func:`parallelize_opensora`; returns the pipeline."""
        offload = resolve_offload(
            mode, device=device, blocks_per_group=blocks_per_group, prefetch=prefetch, transformer=self.transformer,
            current=self.offload, what="OpenSoraPipeline.enable_offload",
        )  # fmt: skip
        text = None if self.text_encoder is None else self.text_encoder.model
        components = [("text_encoder", text), ("transformer", self.transformer), ("vae", self.vae)]
        offload_components(components, offload, whole={"vae"})
        self.offload = offload
        return self

    def to(self, device: str | torch.device) -> OpenSoraPipeline:
        """Move the models (and the text encoder, if any) to ``device``; returns this pipeline."""
        if self.offload is not None:
            raise ValueError(f"OpenSoraPipeline.to: the pipeline is offloaded ({self.offload.mode!r}); load it again")
        self.transformer.to(device)
        self.vae.to(device)
        if self.text_encoder is not None:
            self.text_encoder.model.to(device)
        return self

    @property
    def device(self) -> torch.device:
        """Where the pipeline computes (the offload device when offloaded)."""
        return self.offload.device if self.offload is not None else next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.transformer.parameters()).dtype

    def encode_prompt(self, prompts: list[str], *, aes: float | None, clean: bool) -> tuple[Tensor, Tensor]:
        """``(y [n, 1, L, C], mask [n, L])`` on every rank: T5 once (on ``text_rank`` in parallel)."""
        texts = [prompt_for_t5(p, aes=aes, clean=clean) for p in prompts]
        if self.group is not None:
            return encode_prompts_shared(self.text_encoder, texts, self.group, src=self.text_rank, device=self.device)
        if self.text_encoder is None:
            raise ValueError("OpenSoraPipeline: no text encoder; pass prompt_embeds=(y, mask)")
        y, mask = self.text_encoder.encode(texts, device=self.device)
        return y.to(self.device), mask.to(self.device)

    def latent_shape(self, batch: int, height: int, width: int, num_frames: int) -> tuple[int, ...]:
        f = self.vae.spatial_factor
        return (batch, self.vae.latent_channels, self.vae.latent_frames(num_frames), height // f, width // f)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        *,
        height: int,
        width: int,
        num_frames: int,
        steps: int = 30,
        cfg_scale: float = 7.0,
        seed: int = 1024,
        fps: int = 24,  # videos; an image is conditioned on the model's image fps (120)
        aes: float | None = 6.5,
        clean_caption: bool = True,
        prompt_embeds: tuple[Tensor, Tensor] | None = None,
        progress: Callable[[Iterable[int]], Iterable[int]] | None = None,
    ) -> OpenSoraOutput:
        """Generate ``num_frames`` frames of ``height × width`` pixels (decoded size: floored to
        multiples of 8) for ``prompt`` (every rank passes the same arguments)."""
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("OpenSoraPipeline: pass either prompt or prompt_embeds=(y, mask)")
        num_frames = parse_num_frames(num_frames)
        f = self.vae.spatial_factor
        if height < f or width < f:
            raise ValueError(f"OpenSoraPipeline: the video must be at least {f}×{f} pixels, got {height}×{width}")
        timings, start = {}, self._now()
        try:
            if prompt_embeds is None:
                prompts = [prompt] if isinstance(prompt, str) else list(prompt)
                y, mask = self.encode_prompt(prompts, aes=aes, clean=clean_caption)
            else:
                y, mask = (t.to(self.device) for t in prompt_embeds)
            y = y.to(self.dtype)
            timings["text"] = (mark := self._now()) - start
            noise = torch.Generator().manual_seed(seed)  # CPU: the same latents on every rank and device type
            shape = self.latent_shape(y.shape[0], height, width, num_frames)
            z = torch.randn(shape, generator=noise).to(self.device, self.dtype)
            z = rflow_sample(
                self.transformer, z, y, mask, num_frames=num_frames, height=height, width=width, steps=steps,
                cfg_scale=cfg_scale, fps=fps if num_frames > 1 else None, progress=progress,
            )  # fmt: skip
            timings["denoise"] = (mark2 := self._now()) - mark
            vae_dtype = next(self.vae.parameters()).dtype
            if self.offload is not None:
                self.offload.onload("vae", self.vae)  # its entry point is decode, not forward
            video = self.vae.decode(z.to(vae_dtype), num_frames=num_frames)
            timings["decode"] = (end := self._now()) - mark2
        finally:
            if self.offload is not None:
                self.offload.release()  # the whole-offloaded components go back to the CPU
        timings["total"] = end - start
        received = self.group is None or self.video_rank is None or self.group.rank() == self.video_rank
        return OpenSoraOutput(video if received else None, z, timings)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def parallelize_opensora(
    pipe: OpenSoraPipeline,
    mesh: ParallelMesh,
    *,
    spatial: str = "usp",
    backend: str = "auto",
    vae_tile_rows: int | None = None,
    vae_ranks_per_frame: int | None = None,
    video_rank: int | None = None,
) -> OpenSoraPipeline:
    """The pipeline on ``mesh`` (every rank calls it): the transformer and the VAE made parallel in
    place; returns a pipeline that encodes the text on rank 0 and broadcasts it. ``video_rank``:
    ``None`` gives every rank the video, a rank gives it to that rank only."""
    group = mesh.world_group
    if video_rank is not None and not (isinstance(video_rank, int) and 0 <= video_rank < group.size()):
        raise ValueError(f"parallelize_opensora: video_rank must be None or a rank of the {group.size()} ranks")
    parallelize_stdit(pipe.transformer, mesh, spatial=spatial, backend=backend)
    parallelize_vae(
        pipe.vae, group, tile_rows=vae_tile_rows, gather_to=video_rank, backend=backend,
        ranks_per_frame=vae_ranks_per_frame,
    )  # fmt: skip
    return dataclasses.replace(pipe, group=group, text_rank=0, video_rank=video_rank)


def unparallelize_opensora(pipe: OpenSoraPipeline) -> OpenSoraPipeline:
    """Undo :func:`parallelize_opensora` (the models compute on one device again)."""
    unparallelize_stdit(pipe.transformer)
    unparallelize_vae(pipe.vae)
    return dataclasses.replace(pipe, group=None, video_rank=None)
