"""STDiT3 (Open-Sora 1.2): a spatial-temporal DiT whose ``state_dict`` is the published checkpoint's.

``depth`` pairs of blocks, ``spatial_blocks[i]`` then ``temporal_blocks[i]``; each block is
PixArt-style: ``x += gate₁·SelfAttn(mod(LN x))``, ``x += CrossAttn(x, text)``,
``x += gate₂·MLP(mod(LN x))``, with the six modulation vectors from one shared timestep MLP plus the
block's ``scale_shift_table``. Spatial blocks attend over the positions of each frame, temporal
blocks over the frames at each position (with the rotary embedding). The forward pass is split into
``prepare`` → ``run_blocks`` → ``final`` → ``unpatchify`` so a parallel adapter can shard the tokens
between the stages without changing the model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from torch import nn

from models.stdit.attention import CrossAttention, Rope, SelfAttention
from models.stdit.checkpoint import checkpoint_files, load_checked, save_checkpoint
from models.stdit.config import STDiT3Config
from models.stdit.layers import (
    CaptionEmbedder,
    Mlp,
    PatchEmbed3D,
    RotaryEmbedding,
    TimestepEmbedder,
    sincos_pos_embed_2d,
    t2i_modulate,
)

Tensor = torch.Tensor
IMAGE_FPS, VIDEO_FPS = 120, 24  # Open-Sora's fps conditioning for one-frame images and for videos
VAE_SCALE = 8  # pixels per latent pixel (the spatial VAE), for height/width left unspecified
OPTIONAL_KEYS = frozenset({"rope.freqs"})  # deterministic: a checkpoint may leave it out


@dataclass
class Conditioning:
    """Everything a block needs besides the tokens."""

    t: Tensor  # [B, C] timestep + fps embedding (the final layer's)
    t_mlp: Tensor  # [B, 6C] the blocks' modulation
    t0: Tensor | None  # the same for timestep 0 (frames with x_mask False)
    t0_mlp: Tensor | None
    x_mask: Tensor | None  # [B, T] bool
    y: Tensor  # [B, L, C] projected text
    y_mask: Tensor  # [B, L] bool, True = valid token
    frames: int


def _select_frames(x_mask: Tensor | None, keep: Tensor, zero: Tensor | None, frames: int) -> Tensor:
    """Per frame: ``keep`` where ``x_mask`` is True, ``zero`` (the timestep-0 variant) where False."""
    if x_mask is None:
        return keep
    shape = keep.shape
    keep, zero = (t.unflatten(1, (frames, -1)) for t in (keep, zero))  # type: ignore[union-attr]
    return torch.where(x_mask[:, :, None, None], keep, zero).reshape(shape)


class STDiT3Block(nn.Module):
    def __init__(self, hidden: int, num_heads: int, mlp_ratio: float, qk_norm: bool, temporal: bool) -> None:
        super().__init__()
        self.temporal = temporal
        self.norm1 = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.attn = SelfAttention(hidden, num_heads, qk_norm=qk_norm, axis="temporal" if temporal else "spatial")
        self.cross_attn = CrossAttention(hidden, num_heads)
        self.norm2 = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.mlp = Mlp(hidden, int(hidden * mlp_ratio), hidden)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden) / hidden**0.5)

    def _modulation(self, t_mlp: Tensor | None) -> tuple[Tensor, ...] | None:
        if t_mlp is None:
            return None
        return (self.scale_shift_table[None] + t_mlp.unflatten(1, (6, -1))).chunk(6, dim=1)

    def forward(self, x: Tensor, cond: Conditioning, rope: Rope) -> Tensor:
        """``x`` ``[B, T·S, C]`` in ``(t, s)`` order → the same shape."""
        mod, mod0 = self._modulation(cond.t_mlp), self._modulation(cond.t0_mlp)
        frames, x_mask = cond.frames, cond.x_mask

        def modulated(norm: nn.LayerNorm, shift: int, scale: int) -> Tensor:
            h = norm(x)
            zero = None if mod0 is None else t2i_modulate(h, mod0[shift], mod0[scale])
            return _select_frames(x_mask, t2i_modulate(h, mod[shift], mod[scale]), zero, frames)

        def add_gated(x: Tensor, h: Tensor, gate: int) -> Tensor:
            """``x + gate·h`` as one fused multiply-add; with ``x_mask`` the gate is chosen per frame."""
            if x_mask is None:
                return torch.addcmul(x, mod[gate], h)
            per_frame = torch.where(x_mask[:, :, None, None], mod[gate][:, None], mod0[gate][:, None])  # [B, T, 1, C]
            return torch.addcmul(x.unflatten(1, (frames, -1)), per_frame, h.unflatten(1, (frames, -1))).flatten(1, 2)

        h = self.attn(modulated(self.norm1, 0, 1), frames=frames, rope=rope if self.temporal else None)
        x = add_gated(x, h, 2)
        x = x + self.cross_attn(x, cond.y, cond.y_mask)
        return add_gated(x, self.mlp(modulated(self.norm2, 3, 4)), 5)


class FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch_volume: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden, eps=1e-6, elementwise_affine=False)
        self.linear = nn.Linear(hidden, patch_volume * out_channels)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden) / hidden**0.5)

    def forward(self, x: Tensor, cond: Conditioning) -> Tensor:
        h = self.norm_final(x)

        def modulate(t: Tensor) -> Tensor:
            shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
            return t2i_modulate(h, shift, scale)

        zero = None if cond.t0 is None else modulate(cond.t0)
        return self.linear(_select_frames(cond.x_mask, modulate(cond.t), zero, cond.frames))


@dataclass(frozen=True)
class Grid:
    """The latent size and the token grid it patches into."""

    latent: tuple[int, int, int]  # Tx, Hx, Wx
    tokens: tuple[int, int, int]  # T, H, W

    @property
    def positions(self) -> int:
        return self.tokens[1] * self.tokens[2]


class STDiT3(nn.Module):
    """``STDiT3(config)``; ``model(x, timestep, y, mask=None, x_mask=None, fps=None, height=None, width=None)``.

    ``x`` ``[B, in_channels, T, H, W]`` latents; ``timestep`` ``[B]`` on the 0–1000 scale; ``y``
    ``[B, 1, model_max_length, caption_channels]`` T5 features; ``mask`` ``[B, model_max_length]``
    (True/1 = valid token; ``None``: all valid); ``x_mask`` ``[B, T]`` bool (False: that frame is
    modulated with timestep 0); ``fps`` (default 24, or 120 for one-frame latents); ``height`` /
    ``width`` the pixel size (default 8× the latent's). Returns ``[B, out_channels, T, H, W]`` float32.
    """

    def __init__(self, config: STDiT3Config | None = None) -> None:
        super().__init__()
        self.config = config = config or STDiT3Config()
        hidden, heads = config.hidden_size, config.num_heads
        self.x_embedder = PatchEmbed3D(config.patch_size, config.in_channels, hidden)
        self.t_embedder = TimestepEmbedder(hidden)
        self.fps_embedder = TimestepEmbedder(hidden)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        self.y_embedder = CaptionEmbedder(config.caption_channels, hidden, config.model_max_length)
        self.rope = RotaryEmbedding(config.head_dim)

        def blocks(temporal: bool) -> nn.ModuleList:
            return nn.ModuleList(
                STDiT3Block(hidden, heads, config.mlp_ratio, config.qk_norm, temporal) for _ in range(config.depth)
            )

        self.spatial_blocks, self.temporal_blocks = blocks(False), blocks(True)
        self.final_layer = FinalLayer(hidden, math.prod(config.patch_size), config.out_channels)

    def compile_repeated_blocks(self, **kwargs: Any) -> STDiT3:
        """``torch.compile`` each spatial and temporal block (regional compilation; diffusers' name and
        behaviour): ``kwargs`` go to ``torch.compile``, with ``fullgraph=True`` unless given. Every block of
        a kind shares one compiled graph (the weights are its inputs), so two graphs are built, on the first
        call. The attention inside is one custom op (:mod:`attention.op`), so a block compiles whole,
        sequence-parallel or not. Returns the model."""
        kwargs.setdefault("fullgraph", True)
        for block in (*self.spatial_blocks, *self.temporal_blocks):
            block.compile(**kwargs)
        return self

    # ------------------------------------------------------------------------------ forward
    def forward(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        x_mask: Tensor | None = None,
        fps: Tensor | float | None = None,
        height: Tensor | float | None = None,
        width: Tensor | float | None = None,
    ) -> Tensor:
        tokens, cond, grid = self.prepare(x, timestep, y, mask, x_mask, fps, height, width)
        out = self.run_blocks(tokens.flatten(1, 2), cond)
        return self.unpatchify(self.final(out, cond), grid)

    def prepare(
        self,
        x: Tensor,
        timestep: Tensor,
        y: Tensor,
        mask: Tensor | None = None,
        x_mask: Tensor | None = None,
        fps: Tensor | float | None = None,
        height: Tensor | float | None = None,
        width: Tensor | float | None = None,
    ) -> tuple[Tensor, Conditioning, Grid]:
        """Checked inputs → tokens ``[B, T, S, C]`` (position embedding added), conditioning, grid."""
        self.check_inputs(x, timestep, y, mask, x_mask)
        batch = x.shape[0]
        grid = self.grid(x)
        frames, rows, cols = grid.tokens
        tokens = self.x_embedder(x).unflatten(1, (frames, rows * cols))
        height_px = _scalar(height, x.shape[3] * VAE_SCALE)
        width_px = _scalar(width, x.shape[4] * VAE_SCALE)
        scale = math.sqrt(height_px * width_px) / self.config.input_sq_size
        pos = sincos_pos_embed_2d(
            self.config.hidden_size, rows, cols, scale, round(math.sqrt(rows * cols)), x.device, tokens.dtype
        )
        tokens = tokens + pos[:, None]
        fps_value = torch.as_tensor(
            fps if fps is not None else (IMAGE_FPS if x.shape[2] == 1 else VIDEO_FPS), device=x.device
        ).reshape(-1)
        fps_emb = self.fps_embedder(fps_value.float(), batch)
        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep
        t = self.t_embedder(timestep, batch) + fps_emb
        t0 = t0_mlp = None
        if x_mask is not None:
            t0 = self.t_embedder(torch.zeros_like(timestep), batch) + fps_emb
            t0_mlp = self.t_block(t0)
        y_mask = torch.ones(y.shape[0], y.shape[2], dtype=torch.bool, device=y.device) if mask is None else mask.bool()
        cond = Conditioning(
            t=t, t_mlp=self.t_block(t), t0=t0, t0_mlp=t0_mlp, x_mask=None if x_mask is None else x_mask.bool(),
            y=self.y_embedder(y).squeeze(1), y_mask=y_mask, frames=frames,
        )  # fmt: skip
        return tokens, cond, grid

    def run_blocks(self, x: Tensor, cond: Conditioning) -> Tensor:
        """The ``depth`` (spatial, temporal) pairs on tokens ``[B, T·S, C]``.

        The blocks get the rotary embedding as its :class:`~models.stdit.layers.Rotation` over the frames
        (cos and sin computed once here, through the module's forward so offload hooks run, not in every
        block), not as the module: offload hooks move the modules passed to a block along with its inputs,
        and the rotary embedding belongs to the root."""
        rope = self.rope(cond.frames, x.device, x.dtype)
        for spatial, temporal in zip(self.spatial_blocks, self.temporal_blocks, strict=True):
            x = spatial(x, cond, rope)
            x = temporal(x, cond, rope)
        return x

    def final(self, x: Tensor, cond: Conditioning) -> Tensor:
        """Tokens ``[B, T·S, C]`` → per-token patches ``[B, T·S, prod(patch)·out_channels]``."""
        return self.final_layer(x, cond)

    def unpatchify(self, patches: Tensor, grid: Grid) -> Tensor:
        """Patches ``[B, T·H·W, …]`` (all tokens) → ``[B, out_channels, Tx, Hx, Wx]`` float32, cropped."""
        pt, ph, pw = self.config.patch_size
        frames, rows, cols = grid.tokens
        out = rearrange(
            patches, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)", t=frames, h=rows, w=cols, pt=pt, ph=ph, pw=pw
        )
        tx, hx, wx = grid.latent
        return out[:, :, :tx, :hx, :wx].float()

    # ----------------------------------------------------------------------------- checks
    def grid(self, x: Tensor) -> Grid:
        pt, ph, pw = self.config.patch_size
        tx, hx, wx = x.shape[2:]
        return Grid((tx, hx, wx), (-(-tx // pt), -(-hx // ph), -(-wx // pw)))

    def check_inputs(self, x: Tensor, timestep: Tensor, y: Tensor, mask: Tensor | None, x_mask: Tensor | None) -> None:
        """``ValueError`` naming what does not fit (shapes only: the same on every rank)."""
        c = self.config
        if not isinstance(x, Tensor) or x.dim() != 5 or x.shape[1] != c.in_channels or min(x.shape) < 1:
            raise ValueError(f"STDiT3: x must be [B, {c.in_channels}, T, H, W] latents, got {_shape(x)}")
        batch = x.shape[0]
        if not isinstance(timestep, Tensor) or timestep.numel() not in (1, batch):
            raise ValueError(f"STDiT3: timestep must have 1 or B={batch} values, got {_shape(timestep)}")
        expected = (batch, 1, c.model_max_length, c.caption_channels)
        if not isinstance(y, Tensor) or tuple(y.shape) != expected:
            raise ValueError(f"STDiT3: y must be {list(expected)} text embeddings, got {_shape(y)}")
        if mask is not None:
            if tuple(mask.shape) != (batch, c.model_max_length):
                raise ValueError(f"STDiT3: mask must be [{batch}, {c.model_max_length}], got {_shape(mask)}")
            if not bool(mask.bool().any(dim=1).all()):
                raise ValueError("STDiT3: every sample's mask needs at least one valid text token")
        if x_mask is not None and tuple(x_mask.shape) != (batch, x.shape[2]):
            raise ValueError(f"STDiT3: x_mask must be [{batch}, {x.shape[2]}] (per latent frame), got {_shape(x_mask)}")

    # ------------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | Path) -> None:
        """``config.json`` + ``model.safetensors`` (the published layout) in folder ``path``."""
        save_checkpoint(self, self.config.to_dict(), path)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> STDiT3:
        """Load ``config.json`` + ``model.safetensors`` from folder ``path``; a ``ValueError`` names
        missing, unexpected or misshapen tensors (``rope.freqs`` may be absent: it is recomputed)."""
        config_file, weights = checkpoint_files(path, "STDiT3.from_pretrained")
        config = STDiT3Config.from_json(config_file)
        with torch.device("meta"):
            model = cls(config)
        state = load_checked(model, weights, "STDiT3.from_pretrained", device=device, optional=OPTIONAL_KEYS)
        for key in OPTIONAL_KEYS - set(state):
            state[key] = RotaryEmbedding(config.head_dim).freqs.detach().to(device)
        model.load_state_dict(state, assign=True)
        model.rope.freqs.requires_grad_(False)
        return model.to(dtype=dtype).eval() if dtype is not None else model.eval()


def _scalar(value: Tensor | float | None, default: float) -> float:
    if value is None:
        return float(default)
    return float(value.reshape(-1)[0].item()) if isinstance(value, Tensor) else float(value)


def _shape(x: Any) -> str:
    return str(list(x.shape)) if isinstance(x, Tensor) else type(x).__name__
