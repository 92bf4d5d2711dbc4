"""Distributed, exact VAE decoding: row bands, halo convolutions, global GroupNorm, ring attention."""

from parallel_vae.bands import Band, slab_ranges
from parallel_vae.halo import exchange_halos
from parallel_vae.norm import distributed_group_norm
from parallel_vae.vae import is_parallel_vae, parallelize_vae, unparallelize_vae

__all__ = [
    "Band",
    "distributed_group_norm",
    "exchange_halos",
    "is_parallel_vae",
    "parallelize_vae",
    "slab_ranges",
    "unparallelize_vae",
]
