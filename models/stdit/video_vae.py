"""``OpenSoraVAE``: Open-Sora 1.2's video VAE (``hpcai-tech/OpenSora-VAE-v1.2``), state-dict compatible.

Two stages. Space: a diffusers ``AutoencoderKL`` (SDXL layout, kept as ``spatial_vae.module``) applied
frame by frame with the hard-coded factor 0.18215, in micro-batches of 4 frames. Time: the causal 3-D
:class:`~models.stdit.temporal_vae.TemporalVAE`, applied to chunks of 17 frames (5 latent frames)
independently: fresh causal padding and own GroupNorm statistics per chunk, the first
``(4 − n mod 4) mod 4`` decoded frames of a chunk of ``n`` frames dropped. Latents are normalised
with the ``scale`` / ``shift`` buffers (both in the checkpoint; cast with the model like the
reference). Decode: ``z·scale + shift`` → temporal decode per chunk → spatial decode per frame.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn

from models.stdit.checkpoint import checkpoint_files, load_checked, save_checkpoint
from models.stdit.checks import check_dict, check_float, check_int, check_ints, check_sequence, read_config
from models.stdit.temporal_vae import TemporalVAE, TemporalVAEConfig

Tensor = torch.Tensor
SPATIAL_SCALE = 0.18215  # the reference's hard-coded latent factor (not the config's scaling_factor)
SDXL_VAE: dict[str, Any] = {  # PixArt-Σ's SDXL VAE config (the published model's spatial stage)
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "norm_num_groups": 32,
    "act_fn": "silu",
    "sample_size": 512,
    "scaling_factor": 0.13025,
    "force_upcast": False,
}
_METADATA = {"architectures", "model_type", "torch_dtype", "transformers_version", "_name_or_path", "from_pretrained"}
_SPATIAL_METADATA = {"type", "from_pretrained", "subfolder", "local_files_only"}
_SPATIAL_INTS = {"in_channels", "out_channels", "latent_channels", "layers_per_block", "norm_num_groups", "sample_size"}


@dataclass
class OpenSoraVAEConfig:
    """The video VAE's settings; defaults are the published checkpoint's. Its ``config.json`` (the
    published ``VideoAutoencoderPipeline`` layout) names the spatial VAE by repository only, so the
    spatial and temporal hyper-parameters travel as extra keys (``vae_2d.config``, ``vae_temporal.*``);
    absent, they are the defaults."""

    micro_frame_size: int = 17
    micro_batch_size: int = 4
    scale: tuple[float, ...] = (3.85, 2.32, 2.33, 3.06)
    shift: tuple[float, ...] = (-0.1, 0.34, 0.27, 0.98)
    spatial: dict[str, Any] = field(default_factory=lambda: dict(SDXL_VAE))
    temporal: TemporalVAEConfig = field(default_factory=TemporalVAEConfig)
    spatial_source: str | None = "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers"

    def __post_init__(self) -> None:
        owner = "OpenSoraVAEConfig"
        for name in ("micro_frame_size", "micro_batch_size"):
            check_int(owner, name, getattr(self, name))
        for name in ("scale", "shift"):
            values = check_sequence(owner, name, getattr(self, name))
            for i, value in enumerate(values):
                check_float(owner, f"{name}[{i}]", value)
            setattr(self, name, tuple(float(v) for v in values))
        if 0.0 in self.scale:
            raise ValueError(f"{owner}: scale {self.scale} must have no zero entry (latents are divided by it)")
        self.spatial = dict(check_dict(owner, "spatial (vae_2d.config)", self.spatial))
        unknown = sorted(set(self.spatial) - set(inspect.signature(AutoencoderKL.__init__).parameters) - {"self"})
        if unknown:
            raise ValueError(f"{owner}: vae_2d.config has keys {unknown} that diffusers' AutoencoderKL does not take")
        for key in ("in_channels", "block_out_channels"):
            if key not in self.spatial:
                raise ValueError(f"{owner}: vae_2d.config needs {key!r}; it has {sorted(self.spatial)}")
        for key in _SPATIAL_INTS & set(self.spatial):
            check_int(owner, f"vae_2d.config.{key}", self.spatial[key])
        check_ints(owner, "vae_2d.config.block_out_channels", self.spatial["block_out_channels"])
        for key in ("scaling_factor", "shift_factor"):
            if self.spatial.get(key) is not None:
                check_float(owner, f"vae_2d.config.{key}", self.spatial[key])
        if not isinstance(self.temporal, TemporalVAEConfig):
            raise ValueError(f"{owner}: temporal must be a TemporalVAEConfig, got {type(self.temporal).__name__}")
        if self.spatial_source is not None and not isinstance(self.spatial_source, str):
            raise ValueError(
                f"{owner}: spatial_source (vae_2d.from_pretrained) must be a str or null, got {self.spatial_source!r}"
            )
        channels = self.spatial.get("latent_channels", 4)
        if not (len(self.scale) == len(self.shift) == channels == self.temporal.in_out_channels):
            raise ValueError(
                f"{owner}: scale ({len(self.scale)}), shift ({len(self.shift)}), the spatial latent "
                f"channels ({channels}) and the temporal channels ({self.temporal.in_out_channels}) must agree"
            )

    def to_dict(self) -> dict[str, Any]:
        temporal = {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self.temporal).items()}
        return {
            "architectures": ["VideoAutoencoderPipeline"],
            "model_type": "VideoAutoencoderPipeline",
            "cal_loss": False,
            "freeze_vae_2d": False,
            "from_pretrained": None,
            "micro_frame_size": self.micro_frame_size,
            "scale": list(self.scale),
            "shift": list(self.shift),
            "vae_2d": {
                "type": "VideoAutoencoderKL",
                "from_pretrained": self.spatial_source,
                "subfolder": "vae",
                "micro_batch_size": self.micro_batch_size,
                "local_files_only": False,
                "config": dict(self.spatial),
            },
            "vae_temporal": {"type": "VAE_Temporal_SD", "from_pretrained": None, **temporal},
        }

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> OpenSoraVAEConfig:
        check_dict("OpenSoraVAEConfig", "the config", values)
        known = {"cal_loss", "freeze_vae_2d", "micro_frame_size", "scale", "shift", "vae_2d", "vae_temporal"}
        unknown = sorted(set(values) - known - _METADATA)
        if unknown:
            raise ValueError(f"OpenSoraVAEConfig: unknown fields {unknown}")
        if values.get("cal_loss", False):
            raise ValueError("OpenSoraVAEConfig: cal_loss=True (the training-loss mode) is not supported")
        spatial = dict(check_dict("OpenSoraVAEConfig", "vae_2d", values.get("vae_2d") or {}))
        temporal = dict(check_dict("OpenSoraVAEConfig", "vae_temporal", values.get("vae_temporal") or {}))
        if spatial.get("type", "VideoAutoencoderKL") != "VideoAutoencoderKL":
            raise ValueError(f"OpenSoraVAEConfig: vae_2d type {spatial['type']!r} (need VideoAutoencoderKL)")
        if temporal.pop("type", "VAE_Temporal_SD") != "VAE_Temporal_SD":
            raise ValueError("OpenSoraVAEConfig: vae_temporal type must be VAE_Temporal_SD")
        if temporal.pop("from_pretrained", None) is not None:
            raise ValueError("OpenSoraVAEConfig: vae_temporal.from_pretrained (a separate checkpoint) is unsupported")
        extra = sorted(set(spatial) - _SPATIAL_METADATA - {"micro_batch_size", "config"})
        fields = {f.name for f in dataclasses.fields(TemporalVAEConfig)}
        extra += sorted(f"vae_temporal.{k}" for k in set(temporal) - fields)
        if extra:
            raise ValueError(f"OpenSoraVAEConfig: unknown fields {extra}")
        return cls(
            micro_frame_size=values.get("micro_frame_size", 17),
            micro_batch_size=spatial.get("micro_batch_size", 4),
            scale=values.get("scale", cls.scale),
            shift=values.get("shift", cls.shift),
            spatial=spatial.get("config") or dict(SDXL_VAE),
            temporal=TemporalVAEConfig(**temporal),
            spatial_source=spatial.get("from_pretrained"),
        )

    @classmethod
    def from_json(cls, path: str | Path) -> OpenSoraVAEConfig:
        """The config in file ``path``; every error names the file."""
        values = read_config(path, "OpenSoraVAEConfig")
        try:
            return cls.from_dict(values)
        except ValueError as e:
            raise ValueError(f"{e} (in {path})") from e


@dataclass(frozen=True)
class VideoChunk:
    """One temporal chunk: latent frames ``[latent_start, latent_start + latent_frames)`` decode to
    ``frames`` pixel frames (after the chunk's front crop)."""

    latent_start: int
    latent_frames: int
    frames: int


class SpatialVAE(nn.Module):
    """The reference's ``VideoAutoencoderKL`` wrapper: only its ``.module`` (the key prefix) matters."""

    def __init__(self, module: AutoencoderKL) -> None:
        super().__init__()
        self.module = module


class OpenSoraVAE(nn.Module):
    """Video ``[B, 3, T, H, W]`` in [−1, 1] ↔ normalised latents ``[B, 4, latent_frames(T), H/8, W/8]``."""

    def __init__(self, config: OpenSoraVAEConfig | None = None) -> None:
        super().__init__()
        self.config = config or OpenSoraVAEConfig()
        self.spatial_vae = SpatialVAE(AutoencoderKL(**self.config.spatial))
        self.temporal_vae = TemporalVAE(self.config.temporal)
        self.register_buffer("scale", torch.tensor(self.config.scale).view(1, -1, 1, 1, 1))
        self.register_buffer("shift", torch.tensor(self.config.shift).view(1, -1, 1, 1, 1))

    # ------------------------------------------------------------------ frame arithmetic
    @property
    def latent_channels(self) -> int:
        return len(self.config.scale)

    @property
    def micro_batch_size(self) -> int:
        return self.config.micro_batch_size

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.config.spatial["block_out_channels"]) - 1)

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a ``num_frames``-frame video: 5·(T // 17) + ceil((T mod 17) / 4) published."""
        _check_frames(num_frames)
        return sum(c.latent_frames for c in self.temporal_chunks(num_frames))

    def temporal_chunks(self, num_frames: int) -> list[VideoChunk]:
        """The chunks a ``num_frames``-frame video is encoded and decoded in (17 frames each but the last)."""
        _check_frames(num_frames)
        micro, out, start = self.config.micro_frame_size, [], 0
        for first in range(0, num_frames, micro):
            frames = min(micro, num_frames - first)
            out.append(VideoChunk(start, self.temporal_vae.latent_frames(frames), frames))
            start += out[-1].latent_frames
        return out

    def check_latents(self, z: Tensor, num_frames: int) -> None:
        """``ValueError`` unless ``z`` is ``[B, 4, latent_frames(num_frames), h, w]``."""
        _check_frames(num_frames)
        expected = self.latent_frames(num_frames)
        if not isinstance(z, Tensor) or z.dim() != 5 or z.shape[1] != self.latent_channels or z.shape[2] != expected:
            shape = list(z.shape) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError(
                f"OpenSoraVAE.decode: latents for {num_frames} frames must be [B, {self.latent_channels}, "
                f"{expected}, h, w], got {shape}"
            )
        if min(z.shape[0], z.shape[3], z.shape[4]) < 1:
            raise ValueError(f"OpenSoraVAE.decode: empty latents {list(z.shape)}")

    # ------------------------------------------------------------------ decode stages
    def denormalize(self, z: Tensor) -> Tensor:
        """``z·scale + shift`` in ``z``'s dtype (two ops, as the reference)."""
        return z * self.scale.to(z.dtype) + self.shift.to(z.dtype)

    def decode_chunk(self, z: Tensor, chunk: VideoChunk) -> Tensor:
        """Latents ``[B, 4, chunk.latent_frames, h, w]`` → spatial latents ``[B, 4, chunk.frames, h, w]``."""
        return self.temporal_vae.decode(z, chunk.frames)

    def spatial_input(self, x: Tensor) -> Tensor:
        """What the spatial VAE decodes: ``x / 0.18215`` (a Python-scalar division, as the reference)."""
        return x / SPATIAL_SCALE

    def decode_frames(self, x: Tensor) -> Tensor:
        """Spatial latents ``[F, 4, h, w]`` → frames ``[F, 3, 8h, 8w]``, in micro-batches."""
        module = self.spatial_vae.module
        return torch.cat([module.decode(self.spatial_input(xs)).sample for xs in x.split(self.micro_batch_size)])

    def decode(self, z: Tensor, num_frames: int) -> Tensor:
        """Normalised latents ``[B, 4, latent_frames(num_frames), h, w]`` → video ``[B, 3, num_frames, 8h, 8w]``
        (not clamped; nominal range [−1, 1])."""
        self.check_latents(z, num_frames)
        z = self.denormalize(z)
        chunks = self.temporal_chunks(num_frames)
        x = torch.cat([self.decode_chunk(z.narrow(2, c.latent_start, c.latent_frames), c) for c in chunks], dim=2)
        b, t = x.shape[0], x.shape[2]
        frames = self.decode_frames(x.transpose(1, 2).flatten(0, 1))
        return frames.unflatten(0, (b, t)).transpose(1, 2)

    # ------------------------------------------------------------------ encode
    def encode(self, x: Tensor, *, sample: bool = True, generator: torch.Generator | None = None) -> Tensor:
        """Video ``[B, 3, T, H, W]`` (H, W multiples of 8) → normalised latents ``[B, 4, latent_frames(T), H/8, W/8]``.

        ``sample``: draw from both posteriors as the reference does (``generator`` for both draws;
        the temporal draw is made on the generator's device, CPU by default, like the reference);
        ``False``: their means (deterministic)."""
        f = self.spatial_factor
        if not isinstance(x, Tensor) or x.dim() != 5 or x.shape[1] != self.config.spatial["in_channels"]:
            raise ValueError(f"OpenSoraVAE.encode: video must be [B, 3, T, H, W], got {getattr(x, 'shape', x)}")
        if x.shape[3] % f or x.shape[4] % f or min(x.shape) < 1:
            raise ValueError(
                f"OpenSoraVAE.encode: height and width must be positive multiples of {f}, got {list(x.shape)}"
            )
        module, (b, t) = self.spatial_vae.module, (x.shape[0], x.shape[2])
        latents = []
        for xs in x.transpose(1, 2).flatten(0, 1).split(self.config.micro_batch_size):
            dist = module.encode(xs).latent_dist
            latents.append((dist.sample(generator) if sample else dist.mode()) * SPATIAL_SCALE)
        z2d = torch.cat(latents).unflatten(0, (b, t)).transpose(1, 2)
        out = []
        for first in range(0, t, self.config.micro_frame_size):
            mean, logvar = self.temporal_vae.encode(z2d[:, :, first : first + self.config.micro_frame_size])
            if sample:
                device = generator.device if generator is not None else "cpu"
                noise = torch.randn(mean.shape, generator=generator, device=device).to(mean.device, mean.dtype)
                mean = mean + torch.exp(0.5 * logvar) * noise
            out.append(mean)
        z = torch.cat(out, dim=2)
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, path: str | Path) -> None:
        """``config.json`` + ``model.safetensors`` (the published layout) in folder ``path``."""
        save_checkpoint(self, self.config.to_dict(), path)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"
    ) -> OpenSoraVAE:
        """Load ``config.json`` + ``model.safetensors`` from folder ``path`` (the published folder
        works as it is); a ``ValueError`` names missing, unexpected or misshapen tensors. ``dtype``
        casts everything, the ``scale``/``shift`` buffers included (as the reference)."""
        config_file, weights = checkpoint_files(path, "OpenSoraVAE.from_pretrained")
        with torch.device("meta"):
            model = cls(OpenSoraVAEConfig.from_json(config_file))
        model.load_state_dict(load_checked(model, weights, "OpenSoraVAE.from_pretrained", device=device), assign=True)
        return model.to(dtype=dtype).eval() if dtype is not None else model.eval()


def _check_frames(num_frames: int) -> None:
    if not isinstance(num_frames, int) or isinstance(num_frames, bool) or num_frames < 1:
        raise ValueError(f"OpenSoraVAE: num_frames must be a positive int, got {num_frames!r}")
