"""Tensor parallelism on GPUs (the CPU tests cannot capture CUDA graphs): the tiny FLUX on a ``tp=2`` mesh
(Ulysses over the other GPUs), replayed from a CUDA graph (``parallelize_flux(..., cuda_graph=True)``), equals
the eager tensor-parallel model and the plain model. Run on 2 or more GPUs (``benchmarks/gpu_all.sh trust``):

    torchrun --nproc_per_node 2 -m pytest tests/test_gpu_tensor_parallel.py -q
"""

from __future__ import annotations

import os

import pytest
import torch
from test_flux import flux_inputs
from test_tensor_parallel import model

from models import parallelize_flux, unparallelize_flux
from xdit_core import ParallelMesh, init_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or int(os.environ.get("WORLD_SIZE", "1")) < 2,
        reason="needs 2 or more CUDA GPUs and a torchrun launch",
    ),
]


@pytest.fixture(scope="module")
def ctx():
    return init_distributed()


def test_tensor_parallel_flux_in_a_cuda_graph(ctx):
    mesh = ParallelMesh.build(tp=2, ulysses=ctx.world_size // 2)
    m = model().to(ctx.device)
    inputs = {k: v.to(ctx.device) for k, v in flux_inputs(1, 8, 6, 7, seed=2).items()}
    with torch.no_grad():
        plain = m(**inputs).sample.clone()
        eager = parallelize_flux(m, mesh)(**inputs).sample.clone()
        unparallelize_flux(m)
        parallelize_flux(m, mesh, cuda_graph=True)
        first = m(**inputs).sample.clone()  # captures
        replayed = m(**inputs).sample.clone()  # replays
        unparallelize_flux(m)
    torch.testing.assert_close(eager, plain, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    torch.testing.assert_close(replayed, eager, rtol=0, atol=0)
