"""parallel_vae against the unmodified diffusers decoder: world sizes 1–4, odd latent sizes, ramps.

One spawn per world size; in it tiny random ``AutoencoderKL``s (FLUX-like 16 latent channels with
the mid-block attention, and SD-like 4 channels with quant convs) decode latents that carry a
brightness ramp over the rows — so every band has a different mean, the input on which per-band
GroupNorm statistics fail — first plain, then parallel (whole bands and several slab sizes), then
plain again after ``unparallelize_vae``. Float32 on CPU: equal within 1e-4 (the issue's bound;
the observed error is about 1e-6).
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from diffusers import AutoencoderKL
from diffusers.models.upsampling import Upsample2D
from dist_utils import agreed_max, excess, expect_value_errors, run_ranks, worker_setup
from hypothesis import given
from hypothesis import strategies as st

from parallel_vae import Band, distributed_group_norm, exchange_halos, parallelize_vae, slab_ranges, unparallelize_vae
from parallel_vae.bands import ROWS
from parallel_vae.decoder import decoder_problems
from xdit_core import ParallelMesh

ATOL = RTOL = 1e-4

CONFIGS = {
    # FLUX's layout at toy size: 16 latent channels, no quant convs, mid-block attention (one head of 16)
    "flux16": dict(latent_channels=16, block_out_channels=(8, 16, 16), use_quant_conv=False, use_post_quant_conv=False),
    # SD/SDXL's layout: 4 latent channels, quant and post-quant 1×1 convs
    "sd4": dict(latent_channels=4, block_out_channels=(8, 16), use_quant_conv=True, use_post_quant_conv=True),
}


def tiny_vae(name: str, seed: int = 0, **overrides) -> AutoencoderKL:
    """A tiny random VAE; GroupNorm affines perturbed so they are not the identity."""
    torch.manual_seed(seed)
    n = len(CONFIGS[name]["block_out_channels"])
    config = dict(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=1, norm_num_groups=4,
    )  # fmt: skip
    vae = AutoencoderKL(**{**config, **CONFIGS[name], **overrides}).eval()
    with torch.no_grad():
        for module in vae.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.3)
    return vae


def ramp_latents(channels: int, batch: int, h: int, w: int, seed: int) -> torch.Tensor:
    """Noise plus a strong brightness ramp down the rows (and a per-sample offset)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, channels, h, w, generator=g)
    return z + torch.linspace(-4.0, 4.0, h)[:, None] + torch.arange(batch).view(batch, 1, 1, 1)


# (config, batch, latent height, latent width): odd sizes, one row per rank on 4 ranks, batch 2
CASES = [("flux16", 1, 7, 5), ("flux16", 2, 4, 9), ("sd4", 1, 9, 6), ("sd4", 2, 5, 3)]
TILES = (None, 1, 3)


def _decode_worker() -> list[str]:
    worker_setup()
    world = dist.get_world_size()
    group = dist.group.WORLD
    report = []
    with torch.no_grad():
        vaes = {name: tiny_vae(name) for name in CONFIGS}
        for index, (name, batch, h, w) in enumerate(CASES):
            if h < world:
                continue
            vae = vaes[name]
            z = ramp_latents(vae.config.latent_channels, batch, h, w, seed=index)
            expected = vae.decode(z).sample
            for tile in TILES:
                parallelize_vae(vae, group, tile_rows=tile)
                got = vae.decode(z).sample
                unparallelize_vae(vae)
                worst = agreed_max(excess(got, expected, ATOL, RTOL))
                assert worst <= 0, f"{name} {(batch, h, w)} tile_rows={tile}: excess {worst:.2e}"
                report.append(f"{name} {batch}x{h}x{w} tile={tile}")
            # gathered to one rank: the others keep their own band of the image
            dst = world - 1
            parallelize_vae(vae, ParallelMesh.build(ulysses=world) if index == 0 else group, gather_to=dst)
            got = vae.decode(z, return_dict=False)[0]
            unparallelize_vae(vae)
            if dist.get_rank() == dst:
                assert excess(got, expected, ATOL, RTOL) <= 0
            else:
                band = Band.split(h, group).upsampled(expected.shape[ROWS] // h)
                assert excess(got, band.take(expected), ATOL, RTOL) <= 0
            # diffusers' slicing (one sample at a time) is honoured
            vae.enable_slicing()
            parallelize_vae(vae, group, tile_rows=2)
            got = vae.decode(z).sample
            unparallelize_vae(vae)
            vae.disable_slicing()
            assert excess(got, expected, ATOL, RTOL) <= 0
            again = vae.decode(z).sample
            assert torch.equal(again, expected), "unparallelize_vae must restore the original decode"
    return report


def _group_norm_worker() -> list[str]:
    """distributed_group_norm against F.group_norm on ramps, bands of unequal height, 4-D and 5-D."""
    worker_setup()
    world, rank = dist.get_world_size(), dist.get_rank()
    group = dist.group.WORLD
    report = []
    for height in (world, 7, 10):
        for shape in ((2, 8, height, 5), (1, 6, 3, height, 4)):  # [B, C, H, W] and [B, C, T, H, W]
            g = torch.Generator().manual_seed(height)
            ramp = torch.linspace(-20.0, 20.0, height)[:, None]
            x = torch.randn(shape, generator=g) * 0.5 + ramp + 5.0
            norm = torch.nn.GroupNorm(2, shape[1], eps=1e-6)
            with torch.no_grad():
                norm.weight.normal_(generator=g)
                norm.bias.normal_(generator=g)
                expected = F.group_norm(x, 2, norm.weight, norm.bias, norm.eps)
                band = Band.split(height, group)
                got = distributed_group_norm(band.take(x), norm, group, height=height)
            worst = agreed_max(excess(got, band.take(expected), 1e-5, 1e-5))
            assert worst <= 0, f"group norm {shape}: excess {worst:.2e}"
            # the ramp is what makes this test bite: per-band variances, summed, miss the spread of the means
            if world > 1:
                per_band = band.take(x).unflatten(1, (2, -1)).flatten(2).var(-1, unbiased=False)
                dist.all_reduce(per_band, group=group)
                true = x.unflatten(1, (2, -1)).flatten(2).var(-1, unbiased=False)
                assert (per_band / world / true).max() < 0.5, "the ramp must separate the band means"
            report.append(f"{shape} bands {list(band.sizes)}")
    # the halo rows are the neighbours' boundary rows, None at the true edges
    x = torch.arange(2 * 3 * 9 * 4, dtype=torch.float32).view(2, 3, 9, 4)
    band = Band.split(9, group)
    above, below = exchange_halos(band.take(x).clone(), band)
    assert (above is None) == (rank == 0) and (below is None) == (rank == world - 1)
    if above is not None:
        assert torch.equal(above, x[:, :, band.start - 1 : band.start])
    if below is not None:
        assert torch.equal(below, x[:, :, band.start + band.rows : band.start + band.rows + 1])
    return report


def _errors_worker() -> list[str]:
    worker_setup()
    world = dist.get_world_size()
    group = dist.group.WORLD
    vae = tiny_vae("flux16")
    bad_up = tiny_vae("flux16")
    bad_up.decoder.up_blocks[0].upsamplers[0] = Upsample2D(16, use_conv_transpose=True, out_channels=16)
    attn_up = tiny_vae("flux16", up_block_types=("AttnUpDecoderBlock2D",) * 3)
    tiled = tiny_vae("flux16")
    tiled.enable_tiling()

    def decode(z: torch.Tensor) -> None:
        parallelize_vae(vae, group)
        try:
            vae.decode(z)
        finally:
            unparallelize_vae(vae)

    cases = {
        "more ranks than latent rows": lambda: decode(torch.randn(1, 16, world - 1, 4)),
        "wrong latent channels": lambda: decode(torch.randn(1, 4, 8, 4)),
        "3-D latents": lambda: decode(torch.randn(16, 8, 4)),
        "latents that need grad": lambda: decode(torch.randn(1, 16, 8, 4, requires_grad=True)),
        "transposed-conv upsampler": lambda: parallelize_vae(bad_up, group),
        "attention in the up blocks": lambda: parallelize_vae(attn_up, group),
        "diffusers tiling on": lambda: parallelize_vae(tiled, group),
        "tile_rows 0": lambda: parallelize_vae(vae, group, tile_rows=0),
        "gather_to outside the group": lambda: parallelize_vae(vae, group, gather_to=world),
        "not a group": lambda: parallelize_vae(vae, "world"),  # type: ignore[arg-type]
        "twice": lambda: parallelize_vae(parallelize_vae(vae, group), group),
    }
    messages = expect_value_errors(cases, group)
    unparallelize_vae(vae)  # left parallel by the "twice" case
    with pytest.raises(ValueError, match="not parallel"):
        unparallelize_vae(vae)
    return messages


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_parallel_decode_equals_single_device(world: int) -> None:
    report = run_ranks(_decode_worker, world, timeout_s=600)[0]
    assert len(report) == len([c for c in CASES if c[2] >= world]) * len(TILES)


def test_distributed_group_norm_and_halos() -> None:
    for world in (2, 3, 4):
        assert run_ranks(_group_norm_worker, world)[0]


def test_bad_input_raises_on_every_rank() -> None:
    messages = run_ranks(_errors_worker, 2)
    assert messages[0] == messages[1], "every rank must raise the same errors"
    text = "\n".join(messages[0])
    for fragment in (
        "cannot be split over 2 ranks",
        "latents must be [B, 16, h, w]",
        "inference only",
        "upsamplers.0: an upsampler other than nearest",
        "AttnUpDecoderBlock2D",
        "disable_tiling",
        "tile_rows",
        "gather_to",
        "ProcessGroup",
        "already parallel",
    ):
        assert fragment in text, f"{fragment!r} not in:\n{text}"


def test_decoder_problems_names_each_unsupported_part() -> None:
    assert decoder_problems(tiny_vae("flux16").decoder) == []
    assert decoder_problems(tiny_vae("sd4").decoder) == []
    vae = tiny_vae("flux16")
    vae.decoder.conv_act = torch.nn.Tanh()
    vae.decoder.up_blocks[1].upsamplers[0].conv = torch.nn.Conv2d(16, 16, 3, padding=1, stride=2)
    problems = "\n".join(decoder_problems(vae.decoder))
    assert "decoder.conv_act: activation Tanh" in problems
    assert "decoder.up_blocks.1.upsamplers.0.conv: Conv2d with stride (2, 2)" in problems


class _Group:
    """What Band needs of a process group: its size and this rank."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@given(rows=st.integers(1, 200), tile=st.one_of(st.none(), st.integers(1, 64)))
def test_slabs_cover_the_band_in_order(rows: int, tile: int | None) -> None:
    slabs = slab_ranges(rows, tile)
    assert slabs[0][0] == 0 and slabs[-1][1] == rows
    assert all(a[1] == b[0] for a, b in itertools.pairwise(slabs))
    assert all(0 < stop - start <= (tile or rows) for start, stop in slabs)


@given(height=st.integers(1, 300), size=st.integers(1, 8), factor=st.sampled_from([1, 2, 4, 8]))
def test_bands_are_tensor_split_and_stay_aligned_when_upsampled(height: int, size: int, factor: int) -> None:
    if height < size:
        with pytest.raises(ValueError, match="at least one row"):
            Band.split(height, _Group(size, 0))
        return
    x = torch.arange(height).view(height, 1)  # rows along dim -2, as in a feature map
    for rank in range(size):
        band = Band.split(height, _Group(size, rank))
        assert torch.equal(band.take(x), torch.tensor_split(x, size)[rank])
        up = band.upsampled(factor)
        big = x.repeat_interleave(factor, dim=0)
        assert torch.equal(up.take(big), band.take(x).repeat_interleave(factor, dim=0))
        assert up.is_top == (rank == 0) and up.is_bottom == (rank == size - 1)
