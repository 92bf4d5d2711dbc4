"""CPU offload onto a CUDA device (the CPU tests onload to the CPU, where nothing moves): every mode of the
tiny FLUX and Open-Sora pipelines, built on the CPU and offloaded to this rank's GPU, equals the same
pipeline resident on the GPU. Run on GPUs (``benchmarks/gpu_offload.sh`` does):

    torchrun --nproc_per_node 1 -m pytest tests/test_gpu_offload.py -q
"""

from __future__ import annotations

import os

import pytest
import torch
from test_offload import FLUX_CALL, VIDEO_CALL

from models import parallelize_flux_pipeline, tiny_flux_pipeline, tiny_opensora_pipeline
from models.offload import MODES
from xdit_core import ParallelMesh, init_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or "WORLD_SIZE" not in os.environ,
        reason="needs a CUDA GPU and a torchrun launch",
    ),
]


@pytest.fixture(scope="module")
def ctx():
    return init_distributed()


def _flux(parallel) -> torch.Tensor:
    out = parallel(["a red cat"], generator=torch.Generator().manual_seed(7), output_type="pt", **FLUX_CALL)
    return out.images.cpu()


@pytest.mark.parametrize("mode", MODES)
def test_flux_offloaded_to_the_gpu_equals_resident(ctx, mode):
    mesh = ParallelMesh.build(ulysses=ctx.world_size)
    want = _flux(parallelize_flux_pipeline(tiny_flux_pipeline(seed=0).to(ctx.device), mesh))
    parallel = parallelize_flux_pipeline(tiny_flux_pipeline(seed=0), mesh)  # built on the CPU
    if mode == "model":
        parallel.enable_model_cpu_offload(ctx.device)
    elif mode == "layerwise":
        parallel.enable_group_offload(ctx.device)  # prefetch on a side stream
    else:
        parallel.enable_sequential_cpu_offload(ctx.device)
    torch.testing.assert_close(_flux(parallel), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", MODES)
def test_opensora_offloaded_to_the_gpu_equals_resident(ctx, mode):
    want = tiny_opensora_pipeline(seed=0).to(ctx.device)("A cat playing piano.", **VIDEO_CALL).video.cpu()
    pipe = tiny_opensora_pipeline(seed=0).enable_offload(mode, device=ctx.device)
    got = pipe("A cat playing piano.", **VIDEO_CALL).video
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
