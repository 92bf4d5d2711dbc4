"""Model adapters: FLUX (diffusers) in parallel, transformer and pipeline."""

from models.flux import parallelize_flux, unparallelize_flux
from models.flux_pipeline import (
    ParallelFluxPipeline,
    parallelize_flux_pipeline,
    tiny_flux_pipeline,
    unparallelize_flux_pipeline,
)

__all__ = [
    "ParallelFluxPipeline",
    "parallelize_flux",
    "parallelize_flux_pipeline",
    "tiny_flux_pipeline",
    "unparallelize_flux",
    "unparallelize_flux_pipeline",
]
