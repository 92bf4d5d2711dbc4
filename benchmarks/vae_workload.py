"""Sweep workload ``vae``: the VAE decode of one image, plain and row-banded across the ranks.

Rows per image size: on world 1 the plain diffusers ``AutoencoderKL.decode`` (where it fits:
``--vae-single-max``) and ours on one device with in-rank tiling; on larger worlds
``parallelize_vae`` with whole bands and with ``--vae-tile-rows`` slabs. Each row records the
median time of the slowest rank and its peak memory (``torch.cuda.max_memory_allocated`` over the
decode, weights and latents included). Outputs are checked against a float32 decode of the same
(bf16-valued) weights on one device, by the flash-attention rule (error at most twice the plain
bf16 decode's); sizes beyond ``--vae-ref-max`` have no single-device reference and are marked
unchecked (``ok`` is then only "finite"). Latents carry a brightness ramp over the rows, so bands
differ in mean (the case that breaks per-band GroupNorm statistics).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from checks import agreed_max, world_one_reference
from diffusers import AutoencoderKL

from parallel_vae import parallelize_vae, unparallelize_vae

FLUX_VAE = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
    latent_channels=16, norm_num_groups=32, scaling_factor=0.3611, shift_factor=0.1159,
    use_quant_conv=False, use_post_quant_conv=False,
)  # fmt: skip
TINY_VAE = dict(FLUX_VAE, block_out_channels=(16, 32, 32), down_block_types=("DownEncoderBlock2D",) * 3,
                up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=8)  # fmt: skip


def build_vae(config: dict, device: torch.device, dtype: torch.dtype) -> AutoencoderKL:
    """The VAE with random weights, the same on every rank."""
    torch.manual_seed(0)
    with torch.device(device):
        vae = AutoencoderKL(**config).eval()
    return vae.to(dtype).requires_grad_(False)


def vae_latents(config: dict, size: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Latents of a ``size × size`` image: noise plus a brightness ramp down the rows."""
    side = size // 2 ** (len(config["block_out_channels"]) - 1)
    gen = torch.Generator(device).manual_seed(size)
    z = torch.randn(1, config["latent_channels"], side, side, generator=gen, device=device)
    return (z + torch.linspace(-2.0, 2.0, side, device=device)[:, None]).to(dtype)


def _reference(vae: AutoencoderKL, z: torch.Tensor, cache: Path, world: int) -> tuple[torch.Tensor, float] | None:
    """(float32 decode, error of the plain bf16 decode) for ``z``: computed on world 1, cached in ``cache``."""

    def compute() -> dict:
        with torch.no_grad():
            plain = vae.decode(z).sample
            dtype = plain.dtype
            vae.float()
            try:
                with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # true float32 convolutions
                    fp32 = vae.decode(z.float()).sample
            finally:
                vae.to(dtype)
        return {"fp32": fp32, "ref_err": (plain.double() - fp32.double()).abs().max().item()}

    saved = world_one_reference(cache, world, compute)
    if z.is_cuda:
        torch.cuda.empty_cache()
    return None if saved is None else (saved["fp32"].to(z.device), saved["ref_err"])


def vae_workload(args: Any, timer: Any) -> Iterator[dict]:
    """Rows for every size in ``args.vae_sizes`` on this world (see the module docstring)."""
    world, device = dist.get_world_size(), timer.device
    gpu = device.type == "cuda"
    config = FLUX_VAE if args.vae_config == "flux" else TINY_VAE
    dtype = torch.bfloat16 if gpu else torch.float32
    timer = dataclasses.replace(timer, warmup=args.vae_warmup, iters=1, reps=args.vae_reps)
    vae = build_vae(config, device, dtype)
    group = dist.group.WORLD
    tile = args.vae_tile_rows

    def row(size: int, variant: str, z: torch.Tensor, ref: tuple[torch.Tensor, float] | None) -> dict:
        if gpu:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            out = vae.decode(z).sample  # the checked call is also the warm-up
            if ref is None:
                err, ref_err, ok = math.nan, math.nan, bool(torch.isfinite(out).all())
            else:
                err = (out.double() - ref[0].double()).abs().max().item()
                ref_err = ref[1]
                ok = err <= 2 * ref_err + (1e-5 if dtype == torch.float32 else 0.0)
            del out
            ms = timer(lambda: vae.decode(z))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else math.nan
        err, ok = agreed_max(err, device), agreed_max(0.0 if ok else 1.0, device) == 0.0
        return {
            "workload": "vae", "shape": f"{size}x{size} (latent {z.shape[-1]}²)", "world": world,
            "backend": "auto", "variant": variant, "mesh": f"rows{world}", "median_ms": ms, "graph_ms": None,
            "max_err": err, "ref_err": ref_err, "ok": ok, "checked": ref is not None,
            "peak_gib": agreed_max(peak, device) if gpu else None,
        }  # fmt: skip

    for size in args.vae_sizes:
        z = vae_latents(config, size, device, dtype)
        ref = None
        if size <= args.vae_ref_max:
            cache = Path(args.out) / f"vae_ref_{args.vae_config}_{size}.pt"
            ref = _reference(vae, z, cache, world)
        if world == 1 and size <= args.vae_single_max:
            yield row(size, "single", z, ref)
        variants = [("ours", None)] if world > 1 and args.vae_whole_bands else []
        variants += [(f"ours tile={tile}", tile)] if tile else []
        for name, rows in variants:
            parallelize_vae(vae, group, tile_rows=rows)
            try:
                yield row(size, name, z, ref)
            finally:
                unparallelize_vae(vae)
        del z, ref
