"""``STDiT3Config``: the fields of Open-Sora 1.2's STDiT3, named as in its ``config.json``.

Defaults are those of the published ``hpcai-tech/OpenSora-STDiT-v3`` checkpoint (STDiT3-XL/2).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from models.stdit.checks import check_bool, check_dict, check_float, check_int, check_ints, read_config

# Keys a Hugging Face config.json carries besides the model's fields.
_METADATA = {"architectures", "model_type", "torch_dtype", "transformers_version", "_name_or_path", "auto_map"}
_INTS = ("input_sq_size", "in_channels", "hidden_size", "depth", "num_heads", "caption_channels", "model_max_length")
_BOOLS = (
    "pred_sigma",
    "qk_norm",
    "enable_flash_attn",
    "enable_layernorm_kernel",
    "enable_sequence_parallelism",
    "only_train_temporal",
    "freeze_y_embedder",
    "skip_y_embedder",
)


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
        owner = "STDiT3Config"
        self.input_size = check_ints(owner, "input_size", self.input_size, length=3, none=True)  # type: ignore[assignment]
        self.patch_size = check_ints(owner, "patch_size", self.patch_size, length=3)  # type: ignore[assignment]
        if self.patch_size[0] != 1:
            raise ValueError(f"{owner}: patch_size must be [1, p_h, p_w] (no temporal patches), got {self.patch_size}")
        for name in _INTS:
            check_int(owner, name, getattr(self, name))
        self.mlp_ratio = check_float(owner, "mlp_ratio", self.mlp_ratio, low=0.0)
        self.class_dropout_prob = check_float(owner, "class_dropout_prob", self.class_dropout_prob, low=0.0, high=1.0)
        self.drop_path = check_float(owner, "drop_path", self.drop_path, low=0.0, high=1.0, high_open=True)
        for name in _BOOLS:
            check_bool(owner, name, getattr(self, name))
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{owner}: hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if (self.hidden_size // self.num_heads) % 2:
            raise ValueError(
                f"{owner}: the head dim hidden_size / num_heads = {self.hidden_size // self.num_heads} must be even "
                "(rotary embedding pairs)"
            )
        if self.hidden_size % 4:
            raise ValueError(
                f"{owner}: hidden_size {self.hidden_size} must be divisible by 4 (2-D sin-cos position embedding)"
            )
        if int(self.hidden_size * self.mlp_ratio) < 1:
            raise ValueError(
                f"{owner}: mlp_ratio {self.mlp_ratio} gives an MLP of int({self.hidden_size} × {self.mlp_ratio}) = 0 "
                "channels; it needs at least 1"
            )

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
        check_dict("STDiT3Config", "the config", values)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - fields - _METADATA)
        if unknown:
            raise ValueError(f"STDiT3Config: unknown fields {unknown}")
        return cls(**{k: v for k, v in values.items() if k in fields})

    @classmethod
    def from_json(cls, path: str | Path) -> STDiT3Config:
        """The config in file ``path``; every error names the file."""
        values = read_config(path, "STDiT3Config")
        try:
            return cls.from_dict(values)
        except ValueError as e:
            raise ValueError(f"{e} (in {path})") from e
