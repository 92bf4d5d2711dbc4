"""Sequence-parallel cross-attention (queries and keys of different lengths) and the LSE of a parallel call.

Queries ``[B, L_q, H, D]`` sharded by ``shard_sequence``; keys/values ``[B, L_kv, H, D]`` either
sharded their own way (``kv_seq_len``) or replicated on every rank (``kv_replicated=True``).
Every primitive (Ulysses, ring, USP) on every mesh is compared with single-device attention on the
same full inputs: the output, the lse (``return_lse=True``) and the gradients of q, k and v through
a loss on both. ParaAttention's interface test (4096 queries over 1024 keys) is one example.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import (
    agreed_max,
    excess,
    expect_value_errors,
    random_key_mask,
    rank_settings,
    reference_attention,
    run_ranks,
    worker_setup,
)
from hypothesis import example, given
from hypothesis import strategies as st
from test_parallel_attention import MESHES, _primitives

from attention import merge_attention
from xdit_core import ParallelMesh, shard_sequence

EXAMPLES = 8
LSE_ATOL = 2e-5  # the lse is a float32 log of a sum of up to ~40 exponentials: a few ulps of ~5


def _reference(q, k, v, scale, mask):
    """``(out, lse)`` of single-device attention (lse by ``torch.logsumexp`` over the kept keys)."""
    out = reference_attention(q, k, v, scale, mask)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return out, torch.logsumexp(scores, dim=-1)


def _cross_parity(mesh: ParallelMesh, fn, name: str) -> int:
    examples = 0

    @rank_settings(EXAMPLES)
    @example(q_len=64, kv_len=16, heads=4, replicated=False, masked=False, seed=0)  # ParaAttention's 4:1 shape
    @example(q_len=3, kv_len=2 * mesh.sp_size + 1, heads=3, replicated=True, masked=True, seed=1)
    @example(q_len=mesh.sp_size + 1, kv_len=1, heads=1, replicated=False, masked=False, seed=2)  # ranks with no keys
    @given(
        q_len=st.integers(1, 3 * mesh.sp_size + 2),
        kv_len=st.integers(1, 3 * mesh.sp_size + 2),
        heads=st.integers(1, 5),
        replicated=st.booleans(),
        masked=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(q_len, kv_len, heads, replicated, masked, seed):
        nonlocal examples
        g = torch.Generator().manual_seed(seed)
        batch = 2 * mesh.batch_size
        q = torch.randn(batch, q_len, heads, 8, generator=g)
        k, v = (torch.randn(batch, kv_len, heads, 8, generator=g) for _ in range(2))
        mask = random_key_mask(batch, kv_len, g) if masked else None
        dout = torch.randn(q.shape, generator=g)
        dlse = torch.randn(batch, heads, q_len, generator=g)
        ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
        ref_out, ref_lse = _reference(*ref_in, 0.3, mask)
        ref_grads = torch.autograd.grad((ref_out * dout).sum() + (ref_lse * dlse).sum(), ref_in)

        samples = torch.tensor_split(torch.arange(batch), mesh.batch_size)[mesh.batch_rank]
        rows = torch.tensor_split(torch.arange(q_len), mesh.sp_size)[mesh.sp_rank]
        full = [x[samples].clone().requires_grad_() for x in (q, k, v)]
        q_local = shard_sequence(full[0], mesh)
        if replicated:
            kv, layout = full[1:], {"kv_replicated": True}
        else:
            kv, layout = [shard_sequence(x, mesh) for x in full[1:]], {"kv_seq_len": kv_len}
        key_mask = None if mask is None else mask[samples]
        out, lse = fn(q_local, *kv, seq_len=q_len, key_mask=key_mask, scale=0.3, return_lse=True, **layout)
        assert lse.shape == (len(samples), heads, len(rows)) and lse.dtype == torch.float32
        loss = (out * dout[samples][:, rows]).sum() + (lse * dlse[samples][:, :, rows]).sum()
        grads = torch.autograd.grad(loss, full)
        if mesh.batch_size > 1:  # gradients of the other samples live on the other batch ranks
            ref_part = [r[samples] for r in ref_grads]
        else:
            ref_part = list(ref_grads)
        errs = [excess(out, ref_out[samples][:, rows]), excess(lse, ref_lse[samples][:, :, rows], atol=LSE_ATOL)]
        errs += [excess(a, r) for a, r in zip(grads, ref_part, strict=True)]
        with torch.no_grad():  # the inference path
            plain_kv = [x[samples] if replicated else shard_sequence(x[samples], mesh) for x in (k, v)]
            plain = fn(q[samples][:, rows], *plain_kv, seq_len=q_len, key_mask=key_mask, scale=0.3, **layout)
            errs.append(excess(plain, ref_out[samples][:, rows]))
        worst = agreed_max(max(errs))
        assert worst <= 0, f"{name} {mesh.describe()} q {q_len} kv {kv_len} h {heads} {layout}: {errs}"
        examples += 1

    check()
    return examples


def _lse_with_joint_and_merge(mesh: ParallelMesh, fn, name: str) -> None:
    """``return_lse`` with joint tokens, and a parallel result merged with further keys by ``merge_attention``."""
    g = torch.Generator().manual_seed(11)
    batch, seq, joint_len, extra, heads = mesh.batch_size, 2 * mesh.sp_size + 1, 3, 5, 3
    q, k, v = (torch.randn(batch, joint_len + seq, heads, 8, generator=g) for _ in range(3))
    k_more, v_more = (torch.randn(batch, extra, heads, 8, generator=g) for _ in range(2))
    samples = torch.tensor_split(torch.arange(batch), mesh.batch_size)[mesh.batch_rank]
    rows = torch.tensor_split(torch.arange(seq), mesh.sp_size)[mesh.sp_rank]
    q, k, v, k_more, v_more = (x[samples] for x in (q, k, v, k_more, v_more))
    ref_out, ref_lse = _reference(q, k, v, None, None)
    local = [shard_sequence(x[:, joint_len:], mesh) for x in (q, k, v)]
    joint = tuple(x[:, :joint_len] for x in (q, k, v))
    out, joint_out, lse, joint_lse = fn(*local, seq_len=seq, joint=joint, return_lse=True)
    errs = [
        excess(out, ref_out[:, joint_len:][:, rows]),
        excess(joint_out, ref_out[:, :joint_len]),
        excess(lse, ref_lse[:, :, joint_len:][:, :, rows], atol=LSE_ATOL),
        excess(joint_lse, ref_lse[:, :, :joint_len], atol=LSE_ATOL),
    ]
    # this rank's queries over all keys, merged with 5 further keys = attention over the union
    more_out, more_lse = _reference(q[:, joint_len:][:, rows], k_more, v_more, None, None)
    merged, merged_lse = merge_attention(out, lse, more_out, more_lse)
    union_out, union_lse = _reference(
        q[:, joint_len:][:, rows], torch.cat((k, k_more), 1), torch.cat((v, v_more), 1), None, None
    )
    errs += [excess(merged, union_out), excess(merged_lse, union_lse, atol=LSE_ATOL)]
    assert agreed_max(max(errs)) <= 0, f"{name} {mesh.describe()}: {errs}"


def _cross_errors(mesh: ParallelMesh, fn) -> list[str]:
    q = torch.randn(1, 4, 2, 8)
    k = torch.randn(1, 3, 2, 8)
    j = tuple(torch.randn(1, 2, 2, 8) for _ in range(3))
    return expect_value_errors(
        {
            "kv length without kv_seq_len": lambda: fn(q, k, k, seq_len=4 * mesh.sp_size),
            "both layouts": lambda: fn(q, k, k, kv_seq_len=3 * mesh.sp_size, kv_replicated=True),
            "joint with cross": lambda: fn(q, k, k, kv_seq_len=3 * mesh.sp_size, joint=j),
            "return_lse not bool": lambda: fn(q, q, q, return_lse="yes"),
            "kv mask length": lambda: fn(q, k, k, kv_replicated=True, key_mask=torch.ones(1, 4, dtype=torch.bool)),
        }
    )


def _world_worker(world: int) -> dict:
    worker_setup()
    report: dict = {"examples": {}, "errors": {}}
    for u, r, b in MESHES[world]:
        mesh = ParallelMesh.build(ulysses=u, ring=r, batch=b)
        for name, fn in _primitives(mesh):
            key = f"{name} {mesh.describe()}"
            report["examples"][key] = _cross_parity(mesh, fn, name)
            _lse_with_joint_and_merge(mesh, fn, name)
            report["errors"][key] = _cross_errors(mesh, fn)
        dist.barrier()
    return report


@pytest.mark.parametrize("world", [2, 4])
def test_cross_attention_and_lse_match_single_device(world):
    reports = run_ranks(_world_worker, world, world)
    for key, n in reports[0]["examples"].items():
        assert n >= EXAMPLES, key
    for key, messages in reports[0]["errors"].items():
        assert len(messages) == 5, (key, messages)
        assert "kv_seq_len" in messages[0] and "not both" in messages[1] and "joint" in messages[2], messages
    assert all(r["errors"] == reports[0]["errors"] for r in reports), "every rank raised the same errors"
