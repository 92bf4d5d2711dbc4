"""A small FLUX-architecture text-to-image model: diffusers' ``FluxTransformer2DModel`` and a text encoder of ours.

Images are packed as FLUX packs its latents: [B, C, H, W] → 2×2 patches → [B, (H/2)(W/2), 4C] tokens, with
``img_ids`` [(H/2)(W/2), 3] holding (0, row, column) and ``txt_ids`` [L, 3] zeros. The text encoder embeds the
caption's tokens (with learned positions and one transformer layer) into ``encoder_hidden_states`` [B, L, D]
and a pooled vector [B, P] (the masked mean through a linear layer).

Saved as ``transformer/`` (``save_pretrained``, safetensors), ``text_encoder.safetensors`` and
``text_encoder.json`` (its settings) in one folder.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from data import TOKEN_LENGTH, VOCAB  # beside this file (its folder is on sys.path)
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file, save_file
from torch import nn

Tensor = torch.Tensor

SMALL_FLUX: dict[str, Any] = dict(
    patch_size=1,
    in_channels=12,
    num_layers=2,
    num_single_layers=4,
    attention_head_dim=32,
    num_attention_heads=4,
    joint_attention_dim=128,
    pooled_projection_dim=128,
    guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    length: int = TOKEN_LENGTH
    dim: int = 128  # = the transformer's joint_attention_dim
    pooled_dim: int = 128  # = the transformer's pooled_projection_dim
    layers: int = 1
    heads: int = 4


class TextEncoder(nn.Module):
    """Token ids [B, L] and mask [B, L] → (hidden states [B, L, dim], pooled [B, pooled_dim])."""

    def __init__(self, config: TextConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.position = nn.Parameter(torch.randn(config.length, config.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            config.dim, config.heads, 4 * config.dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.layers = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)
        self.pool = nn.Linear(config.dim, config.pooled_dim)

    def forward(self, tokens: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        h = self.embed(tokens) + self.position[: tokens.shape[1]]
        if self.config.layers:
            h = self.layers(h, src_key_padding_mask=~mask)
        h = self.norm(h)
        weights = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * weights).sum(1) / weights.sum(1).clamp(min=1)
        return h, self.pool(pooled)


@dataclass
class TextCondition:
    """What the transformer reads of a caption: hidden [B, L, D], pooled [B, P], txt_ids [L, 3]."""

    hidden: Tensor
    pooled: Tensor
    txt_ids: Tensor

    def __getitem__(self, index: slice) -> TextCondition:
        return TextCondition(self.hidden[index], self.pooled[index], self.txt_ids)


@dataclass
class SmallFlux:
    """The transformer and the text encoder of one model, and the image size it was trained at."""

    transformer: FluxTransformer2DModel
    text_encoder: TextEncoder
    size: int = 32
    meta: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> SmallFlux:
        cast = {} if dtype is None else {"dtype": dtype}  # diffusers warns of any dtype passed to .to()
        self.transformer.to(device=device, **cast)
        self.text_encoder.to(device=device, **cast)
        return self

    def train(self, mode: bool = True) -> SmallFlux:
        self.transformer.train(mode)
        self.text_encoder.train(mode)
        return self

    def eval(self) -> SmallFlux:
        return self.train(False)

    def parameters(self) -> list[nn.Parameter]:
        return [*self.transformer.parameters(), *self.text_encoder.parameters()]

    def encode(self, tokens: Tensor, mask: Tensor) -> TextCondition:
        """The text condition of token ids [B, L] and mask [B, L]."""
        hidden, pooled = self.text_encoder(tokens, mask)
        return TextCondition(hidden, pooled, text_ids(tokens.shape[1], tokens.device))

    def velocity(self, packed: Tensor, t: Tensor, text: TextCondition) -> Tensor:
        """The predicted v = ε − x0 [B, S, 4C] at packed x_t [B, S, 4C], t [B] (see :func:`velocity`)."""
        return velocity(self.transformer, packed, t, text)


def velocity(transformer: nn.Module, packed: Tensor, t: Tensor, text: TextCondition) -> Tensor:
    """One transformer call: v = ε − x0 [B, S, 4C] at packed x_t [B, S, 4C] of a square image, t [B] in [0, 1]."""
    side = math.isqrt(packed.shape[1]) * 2
    if (side // 2) ** 2 != packed.shape[1]:
        raise ValueError(f"velocity: {packed.shape[1]} tokens are not the patches of a square image")
    return transformer(
        hidden_states=packed,
        encoder_hidden_states=text.hidden,
        pooled_projections=text.pooled,
        timestep=t,
        img_ids=image_ids(side, side, packed.device),
        txt_ids=text.txt_ids,
        return_dict=False,
    )[0]


def build(size: int = 32, vocab_size: int = len(VOCAB), length: int = TOKEN_LENGTH, **overrides: Any) -> SmallFlux:
    """A freshly initialised model for ``size``² images (``overrides``: transformer settings, e.g. num_layers)."""
    config = {**SMALL_FLUX, **overrides}
    transformer = FluxTransformer2DModel(**config)
    text = TextEncoder(TextConfig(vocab_size, length, config["joint_attention_dim"], config["pooled_projection_dim"]))
    return SmallFlux(transformer, text, size)


def pack(images: Tensor) -> Tensor:
    """[B, C, H, W] → [B, (H/2)(W/2), 4C]: 2×2 patches, channel-major within a patch (as FLUX packs latents)."""
    b, c, h, w = images.shape
    if h % 2 or w % 2:
        raise ValueError(f"pack: height and width must be even, got {h}×{w}")
    x = images.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: Tensor, height: int, width: int) -> Tensor:
    """[B, (H/2)(W/2), 4C] → [B, C, H, W] (the inverse of :func:`pack`)."""
    b, s, d = tokens.shape
    if s != (height // 2) * (width // 2) or d % 4:
        raise ValueError(f"unpack: {s} tokens of {d} channels are not a {height}×{width} image")
    x = tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """[(H/2)(W/2), 3]: 0, the patch's row, its column (FLUX's image position ids)."""
    ids = torch.zeros(height // 2, width // 2, 3, device=device)
    ids[..., 1] = torch.arange(height // 2, device=device)[:, None]
    ids[..., 2] = torch.arange(width // 2, device=device)[None, :]
    return ids.reshape(-1, 3)


def text_ids(length: int, device: torch.device | str = "cpu") -> Tensor:
    """[L, 3] zeros (FLUX's text position ids)."""
    return torch.zeros(length, 3, device=device)


def save(model: SmallFlux, folder: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write ``model`` to ``folder`` (created); ``meta`` (JSON) goes into ``text_encoder.json`` beside it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.transformer.save_pretrained(folder / "transformer", safe_serialization=True)
    state = {k: v.detach().float().cpu().contiguous() for k, v in model.text_encoder.state_dict().items()}
    save_file(state, folder / "text_encoder.safetensors")
    info = {"text": asdict(model.text_encoder.config), "size": model.size, "meta": {**model.meta, **(meta or {})}}
    (folder / "text_encoder.json").write_text(json.dumps(info, indent=2) + "\n")
    return folder


def load(folder: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> SmallFlux:
    """The model :func:`save` wrote to ``folder``, on ``device`` in ``dtype``, in eval mode."""
    folder = Path(folder)
    info_path = folder / "text_encoder.json"
    if not info_path.exists():
        raise FileNotFoundError(f"load: {info_path} not found (train a model into {folder} first)")
    info = json.loads(info_path.read_text())
    transformer = FluxTransformer2DModel.from_pretrained(folder / "transformer", torch_dtype=dtype)
    text = TextEncoder(TextConfig(**info["text"]))
    text.load_state_dict(load_file(folder / "text_encoder.safetensors"))
    text.to(device=device, dtype=dtype)
    return SmallFlux(transformer.to(device), text, int(info["size"]), info.get("meta", {})).eval()
