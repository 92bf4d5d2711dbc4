"""Multi-GPU parity of Ulysses / ring / USP (NCCL, bf16), forward and backward.

Run on the accelerator machines through torchrun; every rank runs the same tests::

    torchrun --nproc_per_node 4 -m pytest tests/test_gpu_parallel.py -q

Rule (reference/attention.md §4, the flash-attention rule): the relative error of the parallel bf16
result against a float32 single-device reference is at most twice that of plain single-device bf16
attention against the same reference; gradients likewise.
"""

from __future__ import annotations

import os
from functools import partial

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
from xdit_core import ParallelMesh, PeerExchange, all_to_all, init_distributed, split_sizes
from xdit_core.graphs import CudaGraphed

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


def _built_meshes(world: int):
    """Every ulysses × ring mesh, and again with a PeerExchange where there is a ulysses group."""
    for u, r in _meshes(world):
        for peer in (False, True) if u > 1 else (False,):
            yield f"u{u}r{r}{' peer' if peer else ''}", ParallelMesh.build(ulysses=u, ring=r, peer_exchange=peer)


def _variants(mesh: ParallelMesh, backend: str, seq: int):
    yield "usp", lambda q, k, v: usp_attention(q, k, v, mesh, seq_len=seq, backend=backend)
    if mesh.ring_size == 1:
        group = mesh.ulysses_transport
        yield "ulysses", lambda q, k, v: ulysses_attention(q, k, v, group, seq_len=seq, backend=backend)
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
    with torch.no_grad():  # inference takes other paths: forward-only kernels, views of a PeerExchange's buffer
        inference_err = _rel(attention_with_lse(q, k, v, backend=backend)[0], ref)

    rows = torch.tensor_split(torch.arange(full[1], device=device), world)[rank]
    for label, mesh in _built_meshes(world):
        for name, fn in _variants(mesh, backend, full[1]):
            with torch.no_grad():
                worst = _agreed(_rel(fn(*(x[:, rows] for x in (q, k, v))), ref[:, rows]), device)
            assert worst <= 2 * inference_err + 1e-6, f"{name} {label} {backend} {shape} no grad: {worst:.3e}"
            local = [x[:, rows].clone().requires_grad_() for x in (q, k, v)]
            out = fn(*local)
            out.backward(dout[:, rows])
            errs = [_rel(out, ref[:, rows])] + [
                _rel(a.grad, g.grad[:, rows]) for a, g in zip(local, ref_in, strict=True)
            ]
            for what, err, base in zip(("out", "dq", "dk", "dv"), errs, single_err, strict=True):
                worst = _agreed(err, device)
                assert worst <= 2 * base + 1e-6, f"{name} {label} {backend} {shape}: {what} {worst:.3e} vs {base:.3e}"


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


@pytest.mark.parametrize("masked", [False, True])
def test_bf16_joint_tokens_and_key_masks(ctx, masked):
    """FLUX-like [text; image] with replicated text and (optionally) per-sample key masks."""
    world, rank, device = ctx.world_size, ctx.rank, ctx.device
    b, joint_len, seq, h, d = 2, 77, 1009, 5, 64
    gen = torch.Generator(device).manual_seed(99)
    full = (b, joint_len + seq, h, d)
    q, k, v, dout = (torch.randn(full, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(4))
    mask = None
    if masked:
        mask = torch.rand(b, joint_len + seq, generator=gen, device=device) > 0.3
        mask[:, joint_len] = True  # every sample keeps a key

    ref_in = [x.float().requires_grad_() for x in (q, k, v)]
    ref = F.scaled_dot_product_attention(
        *(x.transpose(1, 2) for x in ref_in), attn_mask=None if mask is None else mask[:, None, None, :]
    ).transpose(1, 2)
    ref.backward(dout.float())
    single_in = [x.clone().requires_grad_() for x in (q, k, v)]
    single = attention_with_lse(*single_in, key_mask=mask)[0]
    single.backward(dout)
    base = [_rel(single, ref)] + [_rel(a.grad, r.grad) for a, r in zip(single_in, ref_in, strict=True)]

    rows = torch.tensor_split(torch.arange(seq, device=device), world)[rank] + joint_len
    masks = {} if mask is None else {"key_mask": mask[:, joint_len:], "joint_key_mask": mask[:, :joint_len]}
    for label, mesh in _built_meshes(world):
        joint = [x[:, :joint_len].clone().requires_grad_() for x in (q, k, v)]
        local = [x[:, rows].clone().requires_grad_() for x in (q, k, v)]
        out, joint_out = usp_attention(*local, mesh, seq_len=seq, joint=tuple(joint), **masks)
        torch.autograd.backward((out, joint_out), (dout[:, rows], dout[:, :joint_len]))
        errs = {
            "out": (_rel(out, ref[:, rows]), base[0]),
            "joint_out": (_rel(joint_out, ref[:, :joint_len]), base[0]),
        }
        for i, name in enumerate("qkv"):
            errs[f"d{name}"] = (_rel(local[i].grad, ref_in[i].grad[:, rows]), base[1 + i])
            errs[f"joint d{name}"] = (_rel(joint[i].grad, ref_in[i].grad[:, :joint_len]), base[1 + i])
        for what, (err, b_err) in errs.items():
            worst = _agreed(err, device)
            assert worst <= 2 * b_err + 1e-6, f"{label} masked={masked}: {what} {worst:.3e} vs {b_err:.3e}"


def test_peer_all_to_all_equals_nccl(ctx):
    """The PeerExchange moves exactly what NCCL's all-to-all moves: any dims, uneven sizes, several
    tensors; views of its buffer (transient) stay right when each is read before the next exchange,
    including after the buffer grows."""
    world, device = ctx.world_size, ctx.device
    group = dist.group.WORLD
    exchange = PeerExchange(group)
    gen = torch.Generator(device).manual_seed(7)
    cases = [  # (shape, scatter_dim, gather_dim, scatter_sizes or None, T)
        ((1, 64, 8 * world, 128), 2, 1, None, 3),
        ((2, 33, 5, 64), 2, 1, split_sizes(5, world), 3),
        ((2, 5 * world, 7, 72), 1, 2, None, 1),
        ((3, 1009, 3, 40), 1, 2, split_sizes(1009, world), 2),
        ((1, 4096, 24, 128), 2, 1, split_sizes(24, world), 3),  # grows the buffer
        ((1, 16, world, 2), 2, 0, None, 1),
    ]
    for shape, sd, gd, sizes, count in cases:
        local = list(shape)
        local[gd] += dist.get_rank() % 2  # every rank's gather extent differs
        gathered = [shape[gd] + p % 2 for p in range(world)]
        tensors = [torch.randn(local, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(count)]
        kw = {"scatter_dim": sd, "gather_dim": gd, "scatter_sizes": sizes, "gather_sizes": gathered}
        want = all_to_all(tensors, group, **kw)
        for transient in (False, True, True):  # alternate slots, then the same data again
            got = [x.clone() for x in all_to_all(tensors, exchange, transient=transient, **kw)]
            for a, b in zip(got, want, strict=True):
                assert a.shape == b.shape and torch.equal(a, b), (shape, sd, gd, sizes, count, transient)


def test_peer_ulysses_in_a_cuda_graph(ctx):
    """Captured once, replayed with new inputs: the same result as eager, bit for bit."""
    world, device = ctx.world_size, ctx.device
    exchange = PeerExchange(dist.group.WORLD)
    gen = torch.Generator(device).manual_seed(3)

    def call(q, k, v):
        return ulysses_attention(q, k, v, exchange)

    graphed = CudaGraphed(call)
    for _ in range(3):
        shape = (1, 512, 4 * world, 128)
        q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(3))
        assert torch.equal(graphed(q=q, k=k, v=v), call(q, k, v))
        assert torch.equal(call(q, k, v), ulysses_attention(q, k, v, dist.group.WORLD))


def _lse_ref(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(torch.einsum("bqhd,bkhd->bhqk", q.float(), k.float()) * q.shape[-1] ** -0.5, dim=-1)


@pytest.mark.parametrize("kv_layout", ["sharded", "replicated"])
def test_cross_attention_and_lse_flash_rule(ctx, kv_layout):
    """Queries and keys of different lengths (4:1 and uneven), with the lse, through NCCL and a PeerExchange."""
    world, rank, device = ctx.world_size, ctx.rank, ctx.device
    b, lq, lk, h, d = 2, 1009, 251, 6, 64
    gen = torch.Generator(device).manual_seed(99)
    q, dout = (torch.randn(b, lq, h, d, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(2))
    k, v = (torch.randn(b, lk, h, d, generator=gen, device=device, dtype=torch.bfloat16) for _ in range(2))
    dlse = torch.randn(b, h, lq, generator=gen, device=device)
    ref_in = [x.float().requires_grad_() for x in (q, k, v)]
    ref, ref_lse = _sdpa(*ref_in), _lse_ref(*ref_in[:2])
    ref_grads = torch.autograd.grad((ref * dout.float()).sum() + (ref_lse * dlse).sum(), ref_in)
    single_in = [x.clone().requires_grad_() for x in (q, k, v)]
    single, single_lse = attention_with_lse(*single_in)
    single_grads = torch.autograd.grad((single.float() * dout.float()).sum() + (single_lse * dlse).sum(), single_in)
    base = [_rel(single, ref)] + [_rel(a, r) for a, r in zip(single_grads, ref_grads, strict=True)]

    rows = torch.tensor_split(torch.arange(lq, device=device), world)[rank]
    kv_rows = torch.tensor_split(torch.arange(lk, device=device), world)[rank]
    layout = {"kv_replicated": True} if kv_layout == "replicated" else {"kv_seq_len": lk}
    for label, mesh in _built_meshes(world):
        calls = [("usp", partial(usp_attention, mesh=mesh, seq_len=lq, **layout))]
        if mesh.ring_size == 1:
            calls.append(("ulysses", partial(ulysses_attention, group=mesh.ulysses_transport, seq_len=lq, **layout)))
        if mesh.ulysses_size == 1:
            calls.append(("ring", partial(ring_attention, group=mesh.ring_group, seq_len=lq, **layout)))
        for name, fn in calls:
            kv_local = (k, v) if kv_layout == "replicated" else (k[:, kv_rows], v[:, kv_rows])
            with torch.no_grad():
                out, lse = fn(q[:, rows], *kv_local, return_lse=True)
            worst = _agreed(_rel(out, ref[:, rows]), device)
            assert worst <= 2 * base[0] + 1e-6, f"{name} {label} {kv_layout} no grad: {worst:.3e} vs {base[0]:.3e}"
            lse_err = _agreed((lse - ref_lse[:, :, rows]).abs().max().item(), device)
            assert lse_err <= 1e-2, f"{name} {label} {kv_layout}: lse error {lse_err:.3e}"
            local = [x.clone().requires_grad_() for x in (q[:, rows], *kv_local)]
            out, lse = fn(*local, return_lse=True)
            grads = torch.autograd.grad(
                (out.float() * dout[:, rows].float()).sum() + (lse * dlse[:, :, rows]).sum(), local
            )
            full_k = kv_layout == "replicated"
            errs = [_rel(out, ref[:, rows]), _rel(grads[0], ref_grads[0][:, rows])] + [
                _rel(g, r if full_k else r[:, kv_rows]) for g, r in zip(grads[1:], ref_grads[1:], strict=True)
            ]
            for what, err, limit in zip(("out", "dq", "dk", "dv"), errs, base, strict=True):
                worst = _agreed(err, device)
                assert worst <= 2 * limit + 1e-6, f"{name} {label} {kv_layout}: {what} {worst:.3e} vs {limit:.3e}"


def test_disagreeing_ranks_raise_on_nccl(ctx):
    """The rank-agreement check over NCCL (the digests travel as CUDA tensors): float16 vs bfloat16."""
    if ctx.world_size < 2:
        pytest.skip("needs 2 ranks")
    mesh = ParallelMesh.build(ulysses=ctx.world_size)
    dtype = torch.bfloat16 if ctx.rank == 1 else torch.float16
    q = torch.randn(1, 64, 8, 64, device=ctx.device, dtype=dtype)
    with pytest.raises(ValueError, match=r"dtype: .*rank 1 torch\.bfloat16"):
        ulysses_attention(q, q, q, mesh.ulysses_group)
    dist.barrier()
