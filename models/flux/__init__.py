"""FLUX (diffusers) in parallel: the adapter, its attention processor and the pipeline, side by side.

``adapter.py``: ``parallelize_flux`` / ``unparallelize_flux`` on one ``FluxTransformer2DModel``
instance. ``processor.py``: the sequence-parallel attention processor the adapter installs, and the
per-call token layout it reads. ``pipeline.py``: a stock ``FluxPipeline`` on a mesh. ``displaced.py``:
``parallelize_flux_displaced``, the opt-in inexact stale-KV mode.
"""

from models.flux.adapter import CfgPair, flux_tp_degrees, pair_cfg_calls, parallelize_flux, unparallelize_flux
from models.flux.displaced import parallelize_flux_displaced, reset_flux_displaced, unparallelize_flux_displaced
from models.flux.pipeline import (
    ParallelFluxPipeline,
    load_flux_pipeline,
    parallelize_flux_pipeline,
    unparallelize_flux_pipeline,
)
from models.flux.processor import FluxSequenceParallelProcessor, JointLayout

__all__ = [
    "CfgPair",
    "FluxSequenceParallelProcessor",
    "JointLayout",
    "ParallelFluxPipeline",
    "flux_tp_degrees",
    "load_flux_pipeline",
    "pair_cfg_calls",
    "parallelize_flux",
    "parallelize_flux_displaced",
    "parallelize_flux_pipeline",
    "reset_flux_displaced",
    "unparallelize_flux",
    "unparallelize_flux_displaced",
    "unparallelize_flux_pipeline",
]
