"""STDiT3 (Open-Sora 1.2): the model, its sequence-parallel adapter and the rectified-flow sampler."""

from models.stdit.config import STDiT3Config
from models.stdit.model import STDiT3
from models.stdit.parallel import parallelize_stdit, unparallelize_stdit
from models.stdit.sampler import rflow_sample, rflow_timesteps

__all__ = ["STDiT3", "STDiT3Config", "parallelize_stdit", "rflow_sample", "rflow_timesteps", "unparallelize_stdit"]
