"""Distributed, exact VAE decoding: row bands, halo convolutions, global GroupNorm, ring attention.

The model-agnostic parts (``bands``, ``halo``, ``norm``, ``conv``) need torch only, so ``import
parallel_vae`` does not import diffusers. The adapter for diffusers' ``AutoencoderKL`` and for video
VAEs (``parallelize_vae``, ``unparallelize_vae``, ``is_parallel_vae`` in ``parallel_vae.vae``, the
band decoder in ``parallel_vae.decoder``) imports diffusers; it is loaded on first use of those names.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from parallel_vae.bands import Band, slab_ranges
from parallel_vae.halo import exchange_halos
from parallel_vae.norm import distributed_group_norm

if TYPE_CHECKING:
    from parallel_vae.vae import is_parallel_vae, parallelize_vae, unparallelize_vae

_FROM_VAE = ("is_parallel_vae", "parallelize_vae", "unparallelize_vae")  # parallel_vae.vae imports diffusers

__all__ = [
    "Band",
    "distributed_group_norm",
    "exchange_halos",
    "is_parallel_vae",
    "parallelize_vae",
    "slab_ranges",
    "unparallelize_vae",
]


def __getattr__(name: str) -> Any:
    """The diffusers adapter's names, imported on first use (PEP 562)."""
    if name in _FROM_VAE:
        return getattr(importlib.import_module("parallel_vae.vae"), name)
    raise AttributeError(f"module 'parallel_vae' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
