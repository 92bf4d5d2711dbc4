"""STDiT3 (Open-Sora 1.2): the model, its sequence-parallel adapter, the rectified-flow sampler, the video
VAE, T5 text conditioning and the end-to-end pipeline (tiny random ones for CPUs: ``models.testing``)."""

from models.stdit.config import STDiT3Config
from models.stdit.model import STDiT3
from models.stdit.parallel import parallelize_stdit, stdit_tp_degrees, unparallelize_stdit
from models.stdit.pipeline import (
    OpenSoraOutput,
    OpenSoraPipeline,
    image_size,
    parallelize_opensora,
    parse_num_frames,
    unparallelize_opensora,
)
from models.stdit.sampler import rflow_sample, rflow_timesteps
from models.stdit.temporal_vae import TemporalVAE, TemporalVAEConfig
from models.stdit.text import T5TextEncoder, encode_prompts_shared, prompt_for_t5
from models.stdit.video_io import video_to_uint8, write_mp4
from models.stdit.video_vae import OpenSoraVAE, OpenSoraVAEConfig

__all__ = [
    "OpenSoraOutput",
    "OpenSoraPipeline",
    "OpenSoraVAE",
    "OpenSoraVAEConfig",
    "STDiT3",
    "STDiT3Config",
    "T5TextEncoder",
    "TemporalVAE",
    "TemporalVAEConfig",
    "encode_prompts_shared",
    "image_size",
    "parallelize_opensora",
    "parallelize_stdit",
    "stdit_tp_degrees",
    "parse_num_frames",
    "prompt_for_t5",
    "rflow_sample",
    "rflow_timesteps",
    "unparallelize_opensora",
    "unparallelize_stdit",
    "video_to_uint8",
    "write_mp4",
]
