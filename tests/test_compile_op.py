"""The attention as custom ops (``attention/op.py``): ``torch.compile(fullgraph=True)`` of every parallel FLUX block
and every parallel STDiT3 block (2 gloo ranks, Ulysses and ring, ``aot_eager``) equals eager within 1e-6, forward
and (FLUX) backward, without recompiling for a second call; ``torch.library.opcheck`` passes on both ops."""

from __future__ import annotations

import torch
from dist_utils import agreed_max, run_ranks, worker_setup
from test_flux import flux_inputs, tiny_transformer
from test_stdit import stdit_inputs, tiny_model
from torch._dynamo.testing import CompileCounterWithBackend

from attention import attention_with_lse
from attention.op import attention_op, usp_attention_op
from attention.usp import usp_attention
from models import parallelize_flux, parallelize_stdit
from xdit_core import ParallelMesh


def _opcheck(mesh: ParallelMesh) -> None:
    g = torch.Generator().manual_seed(1)
    lengths = [5, 3]  # uneven: rank 0 holds 5 tokens, rank 1 holds 3
    n = lengths[mesh.sp_rank]
    q, k, v = (torch.randn(2, n, 4, 8, generator=g, requires_grad=True) for _ in range(3))
    joint = tuple(torch.randn(2, 3, 4, 8, generator=g, requires_grad=True) for _ in range(3))
    groups = (mesh.sp_group.group_name, mesh.ulysses_group.group_name, mesh.ring_group.group_name)
    op = torch.ops.xdit.usp_attention.default
    for j in (None, joint):
        jq, jk, jv = (None, None, None) if j is None else j
        torch.library.opcheck(op, (q, k, v, jq, jk, jv, lengths, *groups, "auto", True))
        got = usp_attention_op(q, k, v, mesh, seq_len=lengths, joint=j)
        want = usp_attention(q, k, v, mesh, seq_len=lengths, joint=j)
        for a, b in zip(got if j else [got], want if j else [want], strict=True):
            assert torch.equal(a, b), "the op is not usp_attention"
    q, k, v = (torch.randn(2, n, 4, 8, generator=g, requires_grad=True) for n in (4, 5, 5))
    key_mask = torch.tensor([[True] * 4 + [False], [False, True, True, False, True]])
    torch.library.opcheck(torch.ops.xdit.attention.default, (q, k, v, key_mask, None, "auto"))
    got, want = attention_op(q, k, v, key_mask=key_mask), attention_with_lse(q, k, v, key_mask=key_mask)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True)), "the op is not attention_with_lse"


def _compiled_flux(mesh: ParallelMesh, text: str) -> None:
    inputs = flux_inputs(1, 5, 3, 7, seed=3)  # 15 image tokens, 7 text tokens: uneven on 2 ranks
    model = parallelize_flux(tiny_transformer(), mesh, text=text)
    x = inputs.pop("hidden_states").requires_grad_()
    want = model(hidden_states=x, **inputs).sample
    want_grads = torch.autograd.grad(want.square().sum(), [x, *model.parameters()])
    counter = CompileCounterWithBackend("aot_eager")
    for block in (*model.transformer_blocks, *model.single_transformer_blocks):
        block.compile(fullgraph=True, backend=counter)
    compiled = []
    for _ in range(2):  # the second call (a new layout object, the same lengths) must not recompile
        got = model(hidden_states=x, **inputs).sample
        got_grads = torch.autograd.grad(got.square().sum(), [x, *model.parameters()])
        compiled.append(counter.frame_count)
    assert compiled[0] == compiled[1] > 0, f"compilations after each call: {compiled}"
    pairs = [(got, want), *zip(got_grads, want_grads, strict=True)]
    err = max((a - b).abs().max().item() for a, b in pairs)
    assert agreed_max(err) <= 1e-6, f"FLUX text={text}: compiled differs from eager by {err:.1e}"


def _compiled_stdit(mesh: ParallelMesh) -> None:
    inputs = stdit_inputs(2, 3, 5, 7, seed=4)
    model = parallelize_stdit(tiny_model(), mesh, spatial="usp")
    with torch.no_grad():
        want = model(**inputs)
        counter = CompileCounterWithBackend("aot_eager")
        model.compile_repeated_blocks(backend=counter)  # fullgraph: USP + masked cross-attention; local temporal
        got = model(**inputs)
        compiled = counter.frame_count
        model(**inputs)
    # one graph per kind of block (spatial, temporal), shared by every block of that kind; none for a second call
    assert counter.frame_count == compiled == 2, f"compilations after each call: {compiled}, {counter.frame_count}"
    err = (got - want).abs().max().item()
    assert agreed_max(err) <= 1e-6, f"STDiT3: compiled differs from eager by {err:.1e}"


def _worker() -> list[str]:
    worker_setup()
    done = []
    for degrees in (dict(ulysses=2), dict(ring=2)):
        mesh = ParallelMesh.build(**degrees)
        _opcheck(mesh)
        for text in ("replicate", "shard"):
            torch._dynamo.reset()
            _compiled_flux(mesh, text)
        torch._dynamo.reset()
        _compiled_stdit(mesh)
        done.append(mesh.describe())
    return done


def test_parallel_blocks_compile_whole_and_equal_eager() -> None:
    reports = run_ranks(_worker, 2, timeout_s=600)
    assert reports[0] == ["u2×r1", "u1×r2"]
