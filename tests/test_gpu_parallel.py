"""Multi-GPU parity of Ulysses / ring / USP (NCCL, bf16), forward and backward.

Run on the accelerator machines through torchrun; every rank runs the same tests::

    torchrun --nproc_per_node 4 -m pytest tests/test_gpu_parallel.py -q

Rule (reference/attention.md §4, the flash-attention rule): the relative error of the parallel bf16
result against a float32 single-device reference is at most twice that of plain single-device bf16
attention against the same reference; gradients likewise.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from attention import (
    AttentionCall,
    attention_with_lse,
    available_backends,
    ring_attention,
    ulysses_attention,
    usp_attention,
)
from xdit_core import ParallelMesh, init_distributed

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or "WORLD_SIZE" not in os.environ,
        reason="needs CUDA GPUs and a torchrun launch",
    ),
]


@pytest.fixture(scope="module")
def ctx():
    return init_distributed()


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).norm() / ref.float().norm()).item()


def _agreed(value: float, device: torch.device) -> float:
    t = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def _meshes(world: int):
    for u in range(world, 0, -1):
        if world % u == 0:
            yield u, world // u


def _variants(mesh: ParallelMesh, backend: str, seq: int):
    yield "usp", lambda q, k, v: usp_attention(q, k, v, mesh, seq_len=seq, backend=backend)
    if mesh.ring_size == 1:
        yield "ulysses", lambda q, k, v: ulysses_attention(q, k, v, mesh.ulysses_group, seq_len=seq, backend=backend)
    if mesh.ulysses_size == 1:
        yield "ring", lambda q, k, v: ring_attention(q, k, v, mesh.ring_group, seq_len=seq, backend=backend)


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# (B, tokens per rank or None, global tokens or None, H, D): divisible shapes, then a prime length
# with a head count no GPU count here divides (uneven chunks and heads).
SHAPES = [(1, 320, None, 24, 128), (2, 96, None, 8, 64), (1, None, 1009, 5, 64)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("backend", ["auto", "flash", "efficient"])
def test_bf16_forward_backward_flash_rule(ctx, shape, backend):
    world, rank, device = ctx.world_size, ctx.rank, ctx.device
    b, s_local, seq, h, d = shape
    full = (b, seq or s_local * world, h, d)
    gen = torch.Generator(device).manual_seed(1234)
    q, k, v, dout = (torch.randn(full, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(4))

    ref_in = [x.float().requires_grad_() for x in (q, k, v)]
    ref = _sdpa(*ref_in)
    ref.backward(dout.float())
    single_in = [x.clone().requires_grad_() for x in (q, k, v)]
    single = attention_with_lse(*single_in, backend=backend)[0]
    single.backward(dout)
    single_err = [_rel(single, ref)] + [_rel(a.grad, r.grad) for a, r in zip(single_in, ref_in, strict=True)]

    rows = torch.tensor_split(torch.arange(full[1], device=device), world)[rank]
    for u, r in _meshes(world):
        mesh = ParallelMesh.build(ulysses=u, ring=r)
        for name, fn in _variants(mesh, backend, full[1]):
            local = [x[:, rows].clone().requires_grad_() for x in (q, k, v)]
            out = fn(*local)
            out.backward(dout[:, rows])
            errs = [_rel(out, ref[:, rows])] + [
                _rel(a.grad, g.grad[:, rows]) for a, g in zip(local, ref_in, strict=True)
            ]
            for what, err, base in zip(("out", "dq", "dk", "dv"), errs, single_err, strict=True):
                worst = _agreed(err, device)
                assert worst <= 2 * base + 1e-6, f"{name} u{u}r{r} {backend} {shape}: {what} {worst:.3e} vs {base:.3e}"


def test_forward_only_backends_in_ring(ctx):
    """fa3/fa2 (forward only) serve inference; gradients then need another backend."""
    world, rank, device = ctx.world_size, ctx.rank, ctx.device
    call = AttentionCall(device, torch.bfloat16, 128, False)
    forward_only = [b for b in available_backends(call) if b in ("fa3", "fa2")]
    if not forward_only:
        pytest.skip("no forward-only flash-attn package importable here")
    gen = torch.Generator(device).manual_seed(5)
    q, k, v = (
        torch.randn(1, 256 * world, 24, 128, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(3)
    )
    ref = _sdpa(q.float(), k.float(), v.float())
    base = _rel(_sdpa(q, k, v), ref)
    rows = torch.tensor_split(torch.arange(q.shape[1], device=device), world)[rank]
    group = dist.group.WORLD
    for backend in forward_only:
        out = ring_attention(q[:, rows], k[:, rows], v[:, rows], group, backend=backend)
        assert _agreed(_rel(out, ref[:, rows]), device) <= 2 * base + 1e-6, backend
