"""Model adapters: FLUX (diffusers) in parallel, transformer and pipeline; STDiT3 (Open-Sora 1.2) and its adapter."""

from models.flux import parallelize_flux, unparallelize_flux
from models.flux_pipeline import (
    ParallelFluxPipeline,
    parallelize_flux_pipeline,
    tiny_flux_pipeline,
    unparallelize_flux_pipeline,
)
from models.stdit import STDiT3, STDiT3Config, parallelize_stdit, rflow_sample, unparallelize_stdit

__all__ = [
    "ParallelFluxPipeline",
    "STDiT3",
    "STDiT3Config",
    "parallelize_flux",
    "parallelize_flux_pipeline",
    "parallelize_stdit",
    "rflow_sample",
    "tiny_flux_pipeline",
    "unparallelize_flux",
    "unparallelize_flux_pipeline",
    "unparallelize_stdit",
]
