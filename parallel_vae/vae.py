"""``parallelize_vae``: an unmodified VAE whose ``decode`` runs across ranks.

Image VAEs (diffusers ``AutoencoderKL``): every rank calls ``vae.decode(z)`` with the same full
latents ``z``. Each takes its row band of them (plus one halo row on each side, which it already
has), decodes the band with :func:`~parallel_vae.decoder.decode_band`, and the image bands are
gathered to every rank or to one. Video VAEs (:class:`~parallel_vae.video.VideoVAE`, e.g.
``models.stdit.OpenSoraVAE``): ``vae.decode(z, num_frames)`` deals temporal chunks, then frames, to
the ranks (:mod:`parallel_vae.video`). Only this instance changes (a hook on ``decode``, ``"xdit.vae"``);
:func:`unparallelize_vae` restores it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput

from parallel_vae.bands import ROWS, check_tile_rows
from parallel_vae.decoder import autoencoder_problems, decode_rows, row_plan, upsampling
from parallel_vae.video import VideoVAE, check_ranks_per_frame, decode_video, frame_groups, is_video_vae
from xdit_core.agreement import agreed, input_signature
from xdit_core.hooks import Hook, get_hook, install_hook, remove_hook
from xdit_core.mesh import ParallelMesh
from xdit_core.plan import gather

Tensor = torch.Tensor
HOOK = "xdit.vae"  # the hook on ``decode`` that makes a VAE parallel (its presence marks one)


@dataclass
class _VaeState:
    group: dist.ProcessGroup
    tile_rows: int | None
    gather_to: int | None
    backend: str
    ranks_per_frame: int | None = None  # video VAEs: the frame groups' size (None: chosen per call)
    frame_groups: dict[int, dist.ProcessGroup] | None = None  # video VAEs: this rank's group of each size


def _group_of(mesh_or_group: ParallelMesh | dist.ProcessGroup) -> dist.ProcessGroup:
    if isinstance(mesh_or_group, ParallelMesh):
        return mesh_or_group.world_group
    if isinstance(mesh_or_group, dist.ProcessGroup):
        return mesh_or_group
    raise ValueError(f"parallelize_vae needs a ParallelMesh or a ProcessGroup, got {type(mesh_or_group).__name__}")


def parallelize_vae(
    vae: AutoencoderKL | VideoVAE,
    mesh_or_group: ParallelMesh | dist.ProcessGroup,
    *,
    tile_rows: int | None = None,
    gather_to: int | None = None,
    backend: str = "auto",
    ranks_per_frame: int | None = None,
) -> AutoencoderKL | VideoVAE:
    """Make ``vae.decode`` decode across the ranks of ``mesh_or_group``; returns the same instance.

    A mesh contributes all its ranks. Each rank decodes one band of image rows (bands differ by at
    most one latent row; the latents need at least one row per rank). ``tile_rows``: every layer
    processes its band in slabs of at most this many output rows, capping activations' temporaries
    and convolution workspace (``None``: whole bands; fastest). ``gather_to``: ``None`` gives every
    rank the whole image; a group rank gives it to that rank only, and every other rank gets its own
    band ``[B, 3, rows, W]``. ``backend``: the kernel of the mid-block's ring attention. Exact: the
    same result as the single-device ``decode`` up to floating-point reordering. Inference only.

    A video VAE's ``decode(z, num_frames)`` deals its temporal chunks, then its frames, to the ranks
    (:mod:`parallel_vae.video`); ``ranks_per_frame`` (a divisor of the rank count) shards each
    frame's rows over that many ranks as well (``None``: 1 when there are at least as many frames as
    ranks, else the fewest that keep every rank busy). ``gather_to`` then gives one rank the video
    and every other rank its own frames ``[n, 3, H, W]``. Every rank must call this (it creates the
    frame groups' process groups).
    """
    video = is_video_vae(vae) and not isinstance(vae, AutoencoderKL)
    if not video and not isinstance(vae, AutoencoderKL):
        raise ValueError(
            f"parallelize_vae needs a diffusers AutoencoderKL or a video VAE (OpenSoraVAE), got {type(vae).__name__}"
        )
    if not video and ranks_per_frame is not None:
        raise ValueError("parallelize_vae: ranks_per_frame applies to video VAEs only")
    if is_parallel_vae(vae):
        raise ValueError("parallelize_vae: this VAE is already parallel (unparallelize_vae it first)")
    group = _group_of(mesh_or_group)
    check_tile_rows(tile_rows, "parallelize_vae")
    if gather_to is not None and not (isinstance(gather_to, int) and 0 <= gather_to < group.size()):
        raise ValueError(f"parallelize_vae: gather_to must be None or a rank of the {group.size()}-rank group")
    check_ranks_per_frame(ranks_per_frame, group.size())
    problems = autoencoder_problems(vae.spatial_vae.module if video else vae)
    if problems:
        raise ValueError("parallelize_vae cannot decode this VAE exactly:\n  " + "\n  ".join(problems))
    state = _VaeState(group, tile_rows, gather_to, backend, ranks_per_frame)
    if video:
        state.frame_groups = frame_groups(group)
        install_hook(vae, HOOK, _ParallelDecode(_video_decode(vae, state)), method="decode")
        return vae

    def decode(z: Tensor, return_dict: bool = True, generator: torch.Generator | None = None) -> Any:
        # before no_grad: it refuses latents that need gradients; every rank must pass the same shape
        agreed(
            state.group,
            "parallel VAE decode",
            True,
            lambda: _check_latents(vae, z, state.group),
            ("latents",),
            lambda _: (input_signature(z),),
        )
        sample = _decode(vae, state, z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    install_hook(vae, HOOK, _ParallelDecode(decode), method="decode")
    return vae


class _ParallelDecode(Hook):
    """Takes the place of ``decode``: the banded decode across the ranks (the VAE's own is not called).

    A VAE under model-level CPU offload (accelerate's hook, ``enable_model_cpu_offload``) is moved to
    its device first, as diffusers' ``apply_forward_hook`` does for the VAE's own ``decode``. Offload
    hooks on the VAE's submodules are not honoured: the banded decode reads some weights directly
    (slabs of convolutions, group norms from distributed statistics), so :mod:`models.offload` offloads
    a parallel VAE as a whole in every mode.
    """

    def __init__(self, decode: Callable[..., Any]) -> None:
        self.decode = decode

    def call(self, module: torch.nn.Module, inner: Callable[..., Any], args: tuple, kwargs: dict) -> Any:
        offload = module.__dict__.get("_hf_hook")
        if offload is not None:  # CPU offload of the whole VAE: onload it, as diffusers' own decode does first
            offload.pre_forward(module)
        return self.decode(*args, **kwargs)


def _video_decode(vae: VideoVAE, state: _VaeState) -> Callable[..., Tensor]:
    def decode(z: Tensor, num_frames: int) -> Tensor:
        def validate() -> None:
            vae.check_latents(z, num_frames)
            _refuse_grad(z)

        values = (input_signature(z), input_signature(num_frames))
        agreed(state.group, "parallel video VAE decode", True, validate, ("latents", "frames"), lambda _: values)
        return decode_video(
            vae,
            z,
            num_frames,
            group=state.group,
            groups=state.frame_groups,
            ranks_per_frame=state.ranks_per_frame,
            tile_rows=state.tile_rows,
            gather_to_rank=state.gather_to,
            backend=state.backend,
        )

    return decode


def is_parallel_vae(vae: AutoencoderKL | VideoVAE) -> bool:
    """Whether :func:`parallelize_vae` made this instance parallel."""
    return get_hook(vae, HOOK, method="decode") is not None


def unparallelize_vae(vae: AutoencoderKL | VideoVAE) -> AutoencoderKL | VideoVAE:
    """Undo :func:`parallelize_vae`: the VAE's own ``decode`` again; returns the same instance."""
    if not is_parallel_vae(vae):
        raise ValueError("unparallelize_vae: this VAE is not parallel")
    remove_hook(vae, HOOK, method="decode")
    return vae


def _check_latents(vae: AutoencoderKL, z: Tensor, group: dist.ProcessGroup) -> None:
    channels = vae.config.latent_channels
    if not isinstance(z, Tensor) or z.dim() != 4 or z.shape[1] != channels or z.shape[0] < 1 or z.shape[-1] < 1:
        shape = tuple(z.shape) if isinstance(z, Tensor) else type(z).__name__
        raise ValueError(f"parallel VAE decode: latents must be [B, {channels}, h, w], got {shape}")
    if z.shape[ROWS] < group.size():
        raise ValueError(
            f"parallel VAE decode: {z.shape[ROWS]} latent rows cannot be split over {group.size()} ranks "
            f"(each needs at least one row): decode on at most {z.shape[ROWS]} ranks"
        )
    _refuse_grad(z)


def _refuse_grad(z: Tensor) -> None:
    if z.requires_grad and torch.is_grad_enabled():
        raise ValueError("parallel VAE decode is inference only: the latents require grad (use torch.no_grad())")


@torch.no_grad()
def _decode(vae: AutoencoderKL, state: _VaeState, z: Tensor) -> Tensor:
    samples = z.split(1) if vae.use_slicing and z.shape[0] > 1 else (z,)
    return torch.cat([_decode_sample(vae, state, s) for s in samples])


def _decode_sample(vae: AutoencoderKL, state: _VaeState, z: Tensor) -> Tensor:
    image, placement = decode_rows(vae, z, state.group, tile_rows=state.tile_rows, backend=state.backend)
    plan = row_plan(upsampling(vae), to=state.gather_to)
    return gather(plan, {"rows": state.group}, {"image": image}, placement)["image"]
