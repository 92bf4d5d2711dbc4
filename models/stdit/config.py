"""``STDiT3Config``: the fields of Open-Sora 1.2's STDiT3, named as in its ``config.json``.

Defaults are those of the published ``hpcai-tech/OpenSora-STDiT-v3`` checkpoint (STDiT3-XL/2).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Keys a Hugging Face config.json carries besides the model's fields.
_METADATA = {"architectures", "model_type", "torch_dtype", "transformers_version", "_name_or_path", "auto_map"}


@dataclass
class STDiT3Config:
    """STDiT3's hyper-parameters. Training-only and kernel-choice fields are kept for round trips of
    the published ``config.json``; the forward pass ignores them."""

    input_size: tuple[int | None, int | None, int | None] = (None, None, None)
    input_sq_size: int = 512
    in_channels: int = 4
    patch_size: tuple[int, int, int] = (1, 2, 2)
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1
    pred_sigma: bool = True
    drop_path: float = 0.0
    caption_channels: int = 4096
    model_max_length: int = 300
    qk_norm: bool = True
    enable_flash_attn: bool = False
    enable_layernorm_kernel: bool = False
    enable_sequence_parallelism: bool = False
    only_train_temporal: bool = False
    freeze_y_embedder: bool = True
    skip_y_embedder: bool = False

    def __post_init__(self) -> None:
        self.input_size = tuple(self.input_size)  # type: ignore[assignment]
        self.patch_size = tuple(self.patch_size)  # type: ignore[assignment]
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"STDiT3Config: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError("STDiT3Config: the head dim must be even (rotary embedding pairs)")
        if self.hidden_size % 4:
            raise ValueError("STDiT3Config: hidden_size must be divisible by 4 (2-D sin-cos position embedding)")
        if len(self.patch_size) != 3 or self.patch_size[0] != 1:
            raise ValueError(f"STDiT3Config: patch_size must be (1, p_h, p_w), got {self.patch_size}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.pred_sigma else self.in_channels

    def to_dict(self) -> dict[str, Any]:
        return {"model_type": "STDiT3", "architectures": ["STDiT3"], **dataclasses.asdict(self)}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> STDiT3Config:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields - _METADATA)
        if unknown:
            raise ValueError(f"STDiT3Config: unknown fields {unknown}")
        return cls(**{k: v for k, v in values.items() if k in fields})

    @classmethod
    def from_json(cls, path: str | Path) -> STDiT3Config:
        return cls.from_dict(json.loads(Path(path).read_text()))
