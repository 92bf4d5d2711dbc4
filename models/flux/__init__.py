"""FLUX (diffusers) in parallel: the adapter, its attention processor and the pipeline, side by side.

``adapter.py``: ``parallelize_flux`` / ``unparallelize_flux`` on one ``FluxTransformer2DModel``
instance. ``processor.py``: the sequence-parallel attention processor the adapter installs, and the
per-call token layout it reads. ``pipeline.py``: a stock ``FluxPipeline`` on a mesh.
"""

from models.flux.adapter import CfgPair, pair_cfg_calls, parallelize_flux, unparallelize_flux
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
    "load_flux_pipeline",
    "pair_cfg_calls",
    "parallelize_flux",
    "parallelize_flux_pipeline",
    "unparallelize_flux",
    "unparallelize_flux_pipeline",
]
