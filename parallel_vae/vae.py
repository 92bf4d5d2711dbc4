"""``parallelize_vae``: an unmodified diffusers ``AutoencoderKL`` whose ``decode`` runs across ranks.

Every rank calls ``vae.decode(z)`` with the same full latents ``z``. Each takes its row band of them
(plus one halo row on each side, which it already has), decodes the band with
:func:`~parallel_vae.decoder.decode_band`, and the image bands are gathered to every rank or to
one. Only this instance changes (an instance-level ``decode``); :func:`unparallelize_vae` restores it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL
from diffusers.models.autoencoders.vae import DecoderOutput

from parallel_vae.bands import ROWS, Band, check_tile_rows, row_slab
from parallel_vae.conv import conv_problems
from parallel_vae.decoder import decode_band, decoder_problems
from xdit_core.collectives import all_gather, gather_to
from xdit_core.mesh import ParallelMesh

Tensor = torch.Tensor
_STATE = "_xdit_vae_parallel"  # the instance attribute that marks a parallel VAE


@dataclass
class _VaeState:
    group: dist.ProcessGroup
    tile_rows: int | None
    gather_to: int | None
    backend: str
    previous_decode: Callable[..., Any] | None


def _group_of(mesh_or_group: ParallelMesh | dist.ProcessGroup) -> dist.ProcessGroup:
    if isinstance(mesh_or_group, ParallelMesh):
        return mesh_or_group.world_group
    if isinstance(mesh_or_group, dist.ProcessGroup):
        return mesh_or_group
    raise ValueError(f"parallelize_vae needs a ParallelMesh or a ProcessGroup, got {type(mesh_or_group).__name__}")


def parallelize_vae(
    vae: AutoencoderKL,
    mesh_or_group: ParallelMesh | dist.ProcessGroup,
    *,
    tile_rows: int | None = None,
    gather_to: int | None = None,
    backend: str = "auto",
) -> AutoencoderKL:
    """Make ``vae.decode`` decode across the ranks of ``mesh_or_group``; returns the same instance.

    A mesh contributes all its ranks. Each rank decodes one band of image rows (bands differ by at
    most one latent row; the latents need at least one row per rank). ``tile_rows``: every layer
    processes its band in slabs of at most this many output rows, capping activations' temporaries
    and convolution workspace (``None``: whole bands; fastest). ``gather_to``: ``None`` gives every
    rank the whole image; a group rank gives it to that rank only, and every other rank gets its own
    band ``[B, 3, rows, W]``. ``backend``: the kernel of the mid-block's ring attention. Exact: the
    same result as the single-device ``decode`` up to floating-point reordering. Inference only.
    """
    if not isinstance(vae, AutoencoderKL):
        raise ValueError(f"parallelize_vae needs a diffusers AutoencoderKL, got {type(vae).__name__}")
    if getattr(vae, _STATE, None) is not None:
        raise ValueError("parallelize_vae: this VAE is already parallel (unparallelize_vae it first)")
    group = _group_of(mesh_or_group)
    check_tile_rows(tile_rows, "parallelize_vae")
    if gather_to is not None and not (isinstance(gather_to, int) and 0 <= gather_to < group.size()):
        raise ValueError(f"parallelize_vae: gather_to must be None or a rank of the {group.size()}-rank group")
    problems = decoder_problems(vae.decoder)
    if vae.post_quant_conv is not None:
        problems += conv_problems("post_quant_conv", vae.post_quant_conv, kernel=1)
    if problems:
        raise ValueError("parallelize_vae cannot decode this VAE exactly:\n  " + "\n  ".join(problems))
    if vae.use_tiling:
        raise ValueError(
            "parallelize_vae: the VAE has diffusers tiling enabled (inexact: per-tile statistics and blended "
            "seams); call vae.disable_tiling() and pass tile_rows=... for exact tiling instead"
        )
    state = _VaeState(group, tile_rows, gather_to, backend, vae.__dict__.get("decode"))

    def decode(z: Tensor, return_dict: bool = True, generator: torch.Generator | None = None) -> Any:
        _check_latents(vae, z, state.group)  # before no_grad: it refuses latents that need gradients
        sample = _decode(vae, state, z)
        return DecoderOutput(sample=sample) if return_dict else (sample,)

    vae.decode = decode
    setattr(vae, _STATE, state)
    return vae


def is_parallel_vae(vae: AutoencoderKL) -> bool:
    """Whether :func:`parallelize_vae` made this instance parallel."""
    return getattr(vae, _STATE, None) is not None


def unparallelize_vae(vae: AutoencoderKL) -> AutoencoderKL:
    """Undo :func:`parallelize_vae`: the VAE's own ``decode`` again; returns the same instance."""
    state: _VaeState | None = getattr(vae, _STATE, None)
    if state is None:
        raise ValueError("unparallelize_vae: this VAE is not parallel")
    if state.previous_decode is None:
        del vae.decode
    else:
        vae.decode = state.previous_decode
    delattr(vae, _STATE)
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
    if z.requires_grad and torch.is_grad_enabled():
        raise ValueError("parallel VAE decode is inference only: the latents require grad (use torch.no_grad())")


@torch.no_grad()
def _decode(vae: AutoencoderKL, state: _VaeState, z: Tensor) -> Tensor:
    samples = z.split(1) if vae.use_slicing and z.shape[0] > 1 else (z,)
    return torch.cat([_decode_sample(vae, state, s) for s in samples])


def _decode_sample(vae: AutoencoderKL, state: _VaeState, z: Tensor) -> Tensor:
    band = Band.split(z.shape[ROWS], state.group, state.tile_rows)
    lo, hi = max(band.start - 1, 0), min(band.start + band.rows + 1, band.height)
    rows = row_slab(z, lo, hi)  # the band and its halo rows: every rank has all latents
    if vae.post_quant_conv is not None:
        rows = vae.post_quant_conv(rows)
    above = row_slab(rows, 0, 1) if not band.is_top else None
    below = row_slab(rows, rows.shape[ROWS] - 1, rows.shape[ROWS]) if not band.is_bottom else None
    own = row_slab(rows, band.start - lo, band.start - lo + band.rows)
    image = decode_band(vae.decoder, own, (above, below), band, backend=state.backend)
    scale = image.shape[ROWS] // band.rows
    sizes = [n * scale for n in band.sizes]
    if state.group.size() == 1:
        return image
    if state.gather_to is None:
        return all_gather(image, state.group, dim=ROWS % image.dim(), sizes=sizes)
    gathered = gather_to(image, state.group, dim=ROWS % image.dim(), sizes=sizes, dst=state.gather_to)
    return image if gathered is None else gathered
