"""Open-Sora 1.2's temporal VAE (``VAE_Temporal_SD``): causal 3-D convolutions at latent resolution.

It compresses time 4× (17 frames → 5 latent frames per chunk) and leaves space alone. Every
convolution is causal in time: zeros in front only (2 frames for kernel 3, 1 for kernel 3 stride
2), and zero padding of 1 on both sides in space. GroupNorms use eps 1e-5. Upsampling in time is a
convolution to twice the channels followed by a depth-to-time rearrange (channel pairs ``2c, 2c+1``
become consecutive frames). Module names and the ``encoder.conv_blocks.0`` / ``decoder.conv_blocks.0``
identities follow the published checkpoint key for key (``temporal_vae.*``, 267 tensors).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.stdit.checks import check_bool, check_int, check_ints, check_sequence

Tensor = torch.Tensor


@dataclass(frozen=True)
class TemporalVAEConfig:
    """Hyper-parameters of ``VAE_Temporal_SD`` (defaults: the published checkpoint)."""

    in_out_channels: int = 4
    latent_embed_dim: int = 4
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32

    def __post_init__(self) -> None:
        owner = "TemporalVAEConfig"
        for name in ("in_out_channels", "latent_embed_dim", "filters", "num_res_blocks", "num_groups"):
            check_int(owner, name, getattr(self, name))
        # frozen: lists (as JSON gives them) become tuples through object.__setattr__
        object.__setattr__(
            self, "channel_multipliers", check_ints(owner, "channel_multipliers", self.channel_multipliers)
        )
        downsample = check_sequence(owner, "temporal_downsample", self.temporal_downsample)
        for i, value in enumerate(downsample):
            check_bool(owner, f"temporal_downsample[{i}]", value)
        object.__setattr__(self, "temporal_downsample", downsample)
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise ValueError(
                f"TemporalVAEConfig: temporal_downsample needs {len(self.channel_multipliers) - 1} entries "
                f"(one per level but the last), got {len(self.temporal_downsample)}"
            )
        for m in self.channel_multipliers:
            if (self.filters * m) % self.num_groups:
                raise ValueError(
                    f"TemporalVAEConfig: {self.filters * m} channels do not split into {self.num_groups} groups"
                )

    @property
    def time_factor(self) -> int:
        """Frames per latent frame (4 for the published model)."""
        return 2 ** sum(self.temporal_downsample)


class CausalConv3d(nn.Module):
    """``nn.Conv3d`` (kept as ``.conv``) after zero padding: ``k_t − s_t`` frames in front, ``k//2``
    rows and columns on both sides."""

    def __init__(self, cin: int, cout: int, kernel: int, *, stride_t: int = 1, bias: bool = True) -> None:
        super().__init__()
        self.pad = (kernel // 2, kernel // 2, kernel // 2, kernel // 2, kernel - stride_t, 0)
        self.conv = nn.Conv3d(cin, cout, kernel, stride=(stride_t, 1, 1), bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, self.pad))


class ResBlock(nn.Module):
    """``conv1(SiLU(norm1(x)))`` → ``conv2(SiLU(norm2(·)))`` + ``x`` (through ``conv3`` when the width changes)."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = CausalConv3d(cin, cout, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = CausalConv3d(cout, cout, 3, bias=False)
        self.conv3 = CausalConv3d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv3(x) if self.conv3 is not None else x)


def _res_blocks(cin: int, cout: int, config: TemporalVAEConfig) -> nn.ModuleList:
    return nn.ModuleList(
        [ResBlock(cin if i == 0 else cout, cout, config.num_groups) for i in range(config.num_res_blocks)]
    )


class TemporalEncoder(nn.Module):
    """Frames ``[B, C, T, h, w]`` (T a multiple of the time factor) → moments ``[B, 2·latent, T/f, h, w]``."""

    def __init__(self, config: TemporalVAEConfig) -> None:
        super().__init__()
        widths = [config.filters * m for m in config.channel_multipliers]
        self.conv_in = CausalConv3d(config.in_out_channels, config.filters, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        cin = config.filters
        for level, width in enumerate(widths):
            self.block_res_blocks.append(_res_blocks(cin, width, config))
            if level < len(widths) - 1:
                down = config.temporal_downsample[level]
                self.conv_blocks.append(CausalConv3d(width, width, 3, stride_t=2) if down else nn.Identity())
            cin = width
        self.res_blocks = _res_blocks(cin, cin, config)
        self.norm1 = nn.GroupNorm(config.num_groups, cin, eps=1e-5)
        self.conv2 = CausalConv3d(cin, 2 * config.latent_embed_dim, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for level, blocks in enumerate(self.block_res_blocks):
            for block in blocks:
                x = block(x)
            if level < len(self.conv_blocks):
                x = self.conv_blocks[level](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


def depth_to_time(x: Tensor, factor: int = 2) -> Tensor:
    """``[B, f·C, T, h, w]`` → ``[B, C, f·T, h, w]`` with ``out[:, c, f·t + j] = x[:, f·c + j, t]`` (``f = factor``)."""
    b, c, t, h, w = x.shape
    return x.view(b, c // factor, factor, t, h, w).transpose(2, 3).reshape(b, c // factor, t * factor, h, w)


class TemporalDecoder(nn.Module):
    """Latents ``[B, latent, t, h, w]`` → frames ``[B, C, f·t, h, w]`` (before the front crop)."""

    def __init__(self, config: TemporalVAEConfig) -> None:
        super().__init__()
        widths = [config.filters * m for m in config.channel_multipliers]
        top = widths[-1]
        self.conv1 = CausalConv3d(config.latent_embed_dim, top, 3)
        self.res_blocks = _res_blocks(top, top, config)
        levels: list[nn.ModuleList] = []
        ups: list[nn.Module] = []
        cin = top
        for level in reversed(range(len(widths))):  # executed top level first; stored by level index
            levels.insert(0, _res_blocks(cin, widths[level], config))
            cin = widths[level]
            if level > 0:
                up = config.temporal_downsample[level - 1]
                ups.insert(0, CausalConv3d(cin, 2 * cin, 3) if up else nn.Identity())
        self.block_res_blocks = nn.ModuleList(levels)
        self.conv_blocks = nn.ModuleList(ups)
        self.norm1 = nn.GroupNorm(config.num_groups, cin, eps=1e-5)
        self.conv_out = CausalConv3d(cin, config.in_out_channels, 3)

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for level in reversed(range(len(self.block_res_blocks))):
            for block in self.block_res_blocks[level]:
                x = block(x)
            if level > 0:
                up = self.conv_blocks[level - 1]
                if not isinstance(up, nn.Identity):
                    x = depth_to_time(up(x))
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    """``VAE_Temporal_SD``: ``encode`` front-pads zero frames to a multiple of the time factor;
    ``decode`` drops the first ``(f − n mod f) mod f`` decoded frames so ``n`` frames remain."""

    def __init__(self, config: TemporalVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or TemporalVAEConfig()
        latent = self.config.latent_embed_dim
        self.encoder = TemporalEncoder(self.config)
        self.quant_conv = CausalConv3d(2 * latent, 2 * latent, 1)
        self.post_quant_conv = CausalConv3d(latent, latent, 1)
        self.decoder = TemporalDecoder(self.config)

    def front_pad(self, frames: int) -> int:
        """Frames the encoder pads in front of (and the decoder crops from) ``frames`` frames."""
        f = self.config.time_factor
        return (f - frames % f) % f

    def latent_frames(self, frames: int) -> int:
        """Latent frames of ``frames`` frames: ``ceil(frames / f)``."""
        return (frames + self.front_pad(frames)) // self.config.time_factor

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Frames ``[B, C, T, h, w]`` → the posterior's ``(mean, logvar)``, each ``[B, latent, ceil(T/f), h, w]``
        (logvar clamped to [−30, 20])."""
        x = F.pad(x, (0, 0, 0, 0, self.front_pad(x.shape[2]), 0))
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: Tensor, num_frames: int) -> Tensor:
        """Latents ``[B, latent, t, h, w]`` → ``[B, C, f·t − pad, h, w]`` where ``pad`` is ``front_pad(num_frames)``."""
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, self.front_pad(num_frames) :]
