"""Model adapters: FLUX (diffusers) in parallel, transformer and pipeline (``models.flux``); STDiT3 (Open-Sora 1.2)
and its adapter (``models.stdit``); tiny random models of both for CPUs (``models.testing``)."""

from models.flux import (
    ParallelFluxPipeline,
    load_flux_pipeline,
    parallelize_flux,
    parallelize_flux_displaced,
    parallelize_flux_pipeline,
    reset_flux_displaced,
    unparallelize_flux,
    unparallelize_flux_displaced,
    unparallelize_flux_pipeline,
)
from models.stdit import STDiT3, STDiT3Config, parallelize_stdit, rflow_sample, unparallelize_stdit
from models.testing import tiny_flux_pipeline, tiny_flux_transformer, tiny_opensora_pipeline, tiny_t5_text_encoder

__all__ = [
    "ParallelFluxPipeline",
    "STDiT3",
    "STDiT3Config",
    "load_flux_pipeline",
    "parallelize_flux",
    "parallelize_flux_displaced",
    "parallelize_flux_pipeline",
    "parallelize_stdit",
    "reset_flux_displaced",
    "rflow_sample",
    "tiny_flux_pipeline",
    "tiny_flux_transformer",
    "tiny_opensora_pipeline",
    "tiny_t5_text_encoder",
    "unparallelize_flux",
    "unparallelize_flux_displaced",
    "unparallelize_flux_pipeline",
    "unparallelize_stdit",
]
