"""The row-banded decoder: diffusers' ``Decoder`` computed layer by layer on this rank's band.

The walk follows ``Decoder.forward`` with the module's own weights (nothing in the model changes):
``conv_in`` → mid-block (resnet, attention, resnet) → up-blocks (resnets, nearest ×2 upsample +
3×3 conv) → GroupNorm → activation → ``conv_out``. Convolutions exchange one halo row with each
neighbour (``band_conv``), GroupNorms reduce their statistics across ranks (``norm_prologue``), and
the mid-block attention over every latent pixel is ring attention over the bands. A part this walk
does not know is refused by :func:`decoder_problems` before anything runs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.autoencoders.vae import Decoder
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d_blocks import UNetMidBlock2D, UpDecoderBlock2D
from diffusers.models.upsampling import Upsample2D
from torch import nn

from attention.ring import ring_attention
from parallel_vae.bands import ROWS, Band, row_slab
from parallel_vae.conv import Halos, add_band_conv_, band_conv, conv_problems
from parallel_vae.norm import norm_prologue
from xdit_core.plan import Gather, Placement, Plan, Split, split

Tensor = torch.Tensor
ELEMENTWISE_ACTS = (nn.SiLU, nn.Mish, nn.GELU, nn.ReLU)
_PROCESSORS = (AttnProcessor, AttnProcessor2_0)  # the same math: plain softmax attention


def _norm_problems(path: str, norm: nn.Module) -> list[str]:
    return [] if type(norm) is nn.GroupNorm else [f"{path}: {type(norm).__name__} (need nn.GroupNorm)"]


def _act_problems(path: str, act: nn.Module) -> list[str]:
    ok = isinstance(act, ELEMENTWISE_ACTS)
    return [] if ok else [f"{path}: activation {type(act).__name__} (supported: SiLU, Mish, GELU, ReLU)"]


def _resnet_problems(path: str, block: nn.Module) -> list[str]:
    if type(block) is not ResnetBlock2D:
        return [f"{path}: {type(block).__name__} (need ResnetBlock2D)"]
    problems = [
        *_norm_problems(f"{path}.norm1", block.norm1),
        *_norm_problems(f"{path}.norm2", block.norm2),
        *_act_problems(f"{path}.nonlinearity", block.nonlinearity),
        *conv_problems(f"{path}.conv1", block.conv1, kernel=3),
        *conv_problems(f"{path}.conv2", block.conv2, kernel=3),
    ]
    if block.conv_shortcut is not None:
        problems += conv_problems(f"{path}.conv_shortcut", block.conv_shortcut, kernel=1)
    if block.upsample is not None or block.downsample is not None:
        problems.append(f"{path}: a resnet that resamples")
    if block.time_emb_proj is not None or block.time_embedding_norm not in ("default", "group"):
        problems.append(f"{path}: a time-conditioned resnet ({block.time_embedding_norm})")
    if block.training and block.dropout.p > 0:
        problems.append(f"{path}: dropout p={block.dropout.p} in training mode (call .eval())")
    return problems


def _attention_problems(path: str, attn: nn.Module) -> list[str]:
    if type(attn) is not Attention:
        return [f"{path}: {type(attn).__name__} (need diffusers Attention)"]
    problems = []
    if not isinstance(attn.processor, _PROCESSORS):
        problems.append(f"{path}: processor {type(attn.processor).__name__} (need AttnProcessor2_0 or AttnProcessor)")
    extras = ("spatial_norm", "norm_q", "norm_k", "norm_cross", "add_q_proj")
    for name in extras:
        if getattr(attn, name, None) not in (None, False):
            problems.append(f"{path}: {name} is set")
    if attn.is_cross_attention:
        problems.append(f"{path}: cross-attention")
    if attn.group_norm is not None:
        problems += _norm_problems(f"{path}.group_norm", attn.group_norm)
    return problems


def _upsampler_problems(path: str, up: nn.Module) -> list[str]:
    if type(up) is not Upsample2D:
        return [f"{path}: {type(up).__name__} (need Upsample2D)"]
    if up.use_conv_transpose or not up.use_conv or up.norm is not None or not up.interpolate:
        return [f"{path}: an upsampler other than nearest ×2 + convolution (transposed conv, norm or no conv)"]
    return conv_problems(f"{path}.conv", _upsample_conv(up))


def _upsample_conv(up: Upsample2D) -> nn.Module:
    return up.conv if up.name == "conv" else up.Conv2d_0


def decoder_problems(decoder: nn.Module) -> list[str]:
    """Every part of ``decoder`` the banded walk cannot compute exactly (empty: all supported)."""
    if type(decoder) is not Decoder:
        return [f"decoder: {type(decoder).__name__} (need diffusers' vae.Decoder)"]
    problems = [
        *conv_problems("decoder.conv_in", decoder.conv_in),
        *_norm_problems("decoder.conv_norm_out", decoder.conv_norm_out),
        *_act_problems("decoder.conv_act", decoder.conv_act),
        *conv_problems("decoder.conv_out", decoder.conv_out),
    ]
    mid = decoder.mid_block
    if type(mid) is not UNetMidBlock2D:
        problems.append(f"decoder.mid_block: {type(mid).__name__} (need UNetMidBlock2D)")
    else:
        for i, block in enumerate(mid.resnets):
            problems += _resnet_problems(f"decoder.mid_block.resnets.{i}", block)
        for i, attn in enumerate(mid.attentions):
            if attn is not None:
                problems += _attention_problems(f"decoder.mid_block.attentions.{i}", attn)
    for i, up in enumerate(decoder.up_blocks):
        path = f"decoder.up_blocks.{i}"
        if type(up) is not UpDecoderBlock2D:
            problems.append(f"{path}: {type(up).__name__} (need UpDecoderBlock2D)")
            continue
        for j, block in enumerate(up.resnets):
            problems += _resnet_problems(f"{path}.resnets.{j}", block)
        for j, sampler in enumerate(up.upsamplers or ()):
            problems += _upsampler_problems(f"{path}.upsamplers.{j}", sampler)
    return problems


def _resnet(x: Tensor, block: ResnetBlock2D, band: Band) -> Tensor:
    act = block.nonlinearity
    h = band_conv(x, block.conv1, band, prologue=norm_prologue(block.norm1, x, band, act))
    h = band_conv(h, block.conv2, band, prologue=norm_prologue(block.norm2, h, band, act))
    h = add_band_conv_(h, x, block.conv_shortcut, band)
    return h if block.output_scale_factor == 1 else h.div_(block.output_scale_factor)


def _attention(x: Tensor, attn: Attention, band: Band, backend: str) -> Tensor:
    """Self-attention over every pixel of the map; tokens in row-major order, so the bands are the
    ring's sequence chunks in rank order."""
    b, c, rows, w = x.shape
    y = x
    if attn.group_norm is not None:
        y = norm_prologue(attn.group_norm, x, band)(x)
    tokens = y.flatten(2).transpose(1, 2)  # [B, S_local, C]
    heads = attn.heads
    q, k, v = (proj(tokens).unflatten(-1, (heads, -1)) for proj in (attn.to_q, attn.to_k, attn.to_v))
    out = ring_attention(q, k, v, band.group, seq_len=[n * w for n in band.sizes], backend=backend)
    out = attn.to_out[1](attn.to_out[0](out.flatten(2)))
    out = out.transpose(1, 2).reshape(b, c, rows, w)
    if attn.residual_connection:
        out = out + x
    return out / attn.rescale_output_factor


def decode_band(decoder: Decoder, z: Tensor, halos: Halos, band: Band, *, backend: str = "auto") -> Tensor:
    """This rank's band of ``decoder(Z)``: ``z`` ``[B, C_lat, rows, w]`` is its band of the latents
    ``Z`` (after ``post_quant_conv``), ``halos`` the latent rows just above and below it."""
    x = band_conv(z, decoder.conv_in, band, halos=halos)
    mid = decoder.mid_block
    x = _resnet(x, mid.resnets[0], band)
    for attn, block in zip(mid.attentions, mid.resnets[1:], strict=True):
        if attn is not None:
            x = _attention(x, attn, band, backend)
        x = _resnet(x, block, band)
    for up in decoder.up_blocks:
        for block in up.resnets:
            x = _resnet(x, block, band)
        for sampler in up.upsamplers or ():
            x = band_conv(x, _upsample_conv(sampler), band, upsample=True)
            band = band.upsampled()
    prologue = norm_prologue(decoder.conv_norm_out, x, band, decoder.conv_act)
    return band_conv(x, decoder.conv_out, band, prologue=prologue)


def autoencoder_problems(vae: AutoencoderKL) -> list[str]:
    """Every reason ``vae``'s decode cannot run banded and exact (empty: it can)."""
    problems = decoder_problems(vae.decoder)
    if vae.post_quant_conv is not None:
        problems += conv_problems("post_quant_conv", vae.post_quant_conv, kernel=1)
    if vae.use_tiling:
        problems.append(
            "diffusers tiling is enabled (inexact: per-tile statistics and blended seams); call "
            "vae.disable_tiling() and pass tile_rows=... for exact tiling instead"
        )
    return problems


def row_plan(scale: int, to: int | None = None) -> Plan:
    """The banded decode's boundary: the latents' rows dealt over axis ``rows`` with one halo row on each
    side (``conv_in``'s 3×3 window; every rank has all latents, so the halo costs nothing), the image's
    rows (``scale`` per latent row) gathered back to every rank, or to group rank ``to``."""
    return Plan(
        "parallel VAE decode",
        inputs=(Split("latents", ROWS, "rows", halo=1),),
        outputs=(Gather("image", ROWS, "rows", like="latents", scale=scale, to=to),),
    )


def upsampling(vae: AutoencoderKL) -> int:
    """Image rows per latent row: 2 per upsampler of the decoder (each is nearest ×2, see :func:`decoder_problems`)."""
    return 2 ** sum(len(up.upsamplers or ()) for up in vae.decoder.up_blocks)


def decode_rows(
    vae: AutoencoderKL, z: Tensor, group: dist.ProcessGroup, *, tile_rows: int | None, backend: str
) -> tuple[Tensor, Placement]:
    """This rank's row band ``[B, 3, rows, W]`` of ``vae.decode(z)``, and the split's placement (gather
    the bands with :func:`row_plan`).

    ``z`` ``[B, C, h, w]``: the whole latents, the same on every rank of ``group`` (``h`` ≥ ranks).
    Collective over ``group``."""
    band = Band.split(z.shape[ROWS], group, tile_rows)  # refuses fewer rows than ranks
    local, placement = split(row_plan(upsampling(vae)), {"rows": group}, {"latents": z})
    rows = local["latents"]  # the band and its halo rows
    if vae.post_quant_conv is not None:
        rows = vae.post_quant_conv(rows)
    before, after = placement.halos.get(("latents", "rows"), (0, 0))
    above = row_slab(rows, 0, 1) if before else None
    below = row_slab(rows, rows.shape[ROWS] - 1, rows.shape[ROWS]) if after else None
    own = placement.own(rows, "latents", "rows", ROWS)
    return decode_band(vae.decoder, own, (above, below), band, backend=backend), placement
