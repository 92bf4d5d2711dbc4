"""Ulysses, ring and USP attention against single-device attention: forward, backward, bad input.

Each world size runs in one spawn; hypothesis picks the shapes inside it (the same on every rank).
"""

from __future__ import annotations

import dataclasses
from functools import partial

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

from attention import ring as ring_module
from attention import ring_attention, ulysses_attention, usp_attention
from attention.backends import BACKENDS
from attention.ring import ring_attention_core
from xdit_core import ParallelMesh, all_gather, gather_sequence, shard_sequence

# world size -> meshes (ulysses, ring, batch) checked in that world
MESHES = {
    2: [(2, 1, 1), (1, 2, 1)],
    3: [(3, 1, 1), (1, 3, 1)],
    4: [(4, 1, 1), (1, 4, 1), (2, 2, 1), (2, 1, 2)],
    5: [(5, 1, 1), (1, 5, 1)],  # 24 FLUX heads, say, do not divide 5
    6: [(3, 2, 1), (2, 3, 1)],
}
EXAMPLES = 10


def _primitives(mesh: ParallelMesh):
    """(name, fn(q, k, v, seq_len, scale, joint=None)) for every primitive that applies to this mesh."""
    yield "usp", partial(usp_attention, mesh=mesh)
    if mesh.batch_size == 1 and mesh.ring_size == 1:
        yield "ulysses", partial(ulysses_attention, group=mesh.ulysses_group)
    if mesh.batch_size == 1 and mesh.ulysses_size == 1:
        yield "ring", partial(ring_attention, group=mesh.ring_group)


def _parity(mesh: ParallelMesh, fn, name: str) -> dict:
    stats = {"examples": 0, "max_err": 0.0, "uneven": 0, "masked": 0}

    @rank_settings(EXAMPLES)
    @example(batch=1, seq=mesh.sp_size * 3, heads=mesh.ulysses_size, head_dim=8, scale=None, masked=False, seed=0)
    @example(batch=2, seq=1, heads=1, head_dim=4, scale=None, masked=False, seed=1)  # one token, one head
    @example(batch=2, seq=mesh.sp_size + 1, heads=5, head_dim=8, scale=0.7, masked=True, seed=2)  # uneven, masked
    @given(
        batch=st.integers(1, 2),
        seq=st.integers(1, 4 * mesh.sp_size + 1),  # any length: primes, fewer tokens than ranks, ...
        heads=st.integers(1, 7),  # any head count, divisible by the ulysses degree or not
        head_dim=st.sampled_from([1, 4, 8, 16, 40]),
        scale=st.sampled_from([None, 0.05, 0.7]),
        masked=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(batch, seq, heads, head_dim, scale, masked, seed):
        g = torch.Generator().manual_seed(seed)
        shape = (batch * mesh.batch_size, seq, heads, head_dim)
        q, k, v, dout = (torch.randn(shape, generator=g) for _ in range(4))
        mask = random_key_mask(shape[0], seq, g) if masked else None
        ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = reference_attention(*ref_in, scale, mask)
        ref.backward(dout)

        # This rank's samples (batch axis), sequence shard by shard_sequence; gradients come back
        # through gather/shard autograd, so q.grad must equal the single-device gradient.
        rows = torch.tensor_split(torch.arange(shape[0]), mesh.batch_size)[mesh.batch_rank]
        key_mask = None if mask is None else mask[rows]
        full = [x[rows].clone().requires_grad_() for x in (q, k, v)]
        local = [shard_sequence(x, mesh, dim=1) for x in full]
        out = gather_sequence(fn(*local, seq_len=seq, key_mask=key_mask, scale=scale), mesh, dim=1, seq_len=seq)
        out.backward(dout[rows])
        errs = [excess(out, ref[rows])] + [excess(a.grad, r.grad[rows]) for a, r in zip(full, ref_in, strict=True)]
        with torch.no_grad():  # inference path, on plain (non-autograd) chunks
            chunk = torch.tensor_split(torch.arange(seq), mesh.sp_size)[mesh.sp_rank]
            plain = [x[rows][:, chunk] for x in (q, k, v)]
            errs.append(excess(fn(*plain, seq_len=seq, key_mask=key_mask, scale=scale), ref[rows][:, chunk]))
        worst = agreed_max(max(errs))
        stats["examples"] += 1
        stats["uneven"] += int(seq % mesh.sp_size != 0 or heads % mesh.ulysses_size != 0)
        stats["masked"] += int(masked)
        stats["max_err"] = max(stats["max_err"], (out - ref[rows]).abs().max().item())
        assert worst <= 0, f"{name} on {mesh.describe()}: shape {shape} scale {scale}: out/dq/dk/dv/no-grad {errs}"

    check()
    return stats


def _replicated_joint(mesh: ParallelMesh, fn, name: str) -> int:
    """Joint tokens replicated on every rank: keys counted once, outputs identical everywhere."""
    examples = 0

    @rank_settings(6)
    @example(joint_len=1, seq=1, heads=1, masked=False, seed=0)
    @example(joint_len=3, seq=2 * mesh.sp_size + 1, heads=2, masked=True, seed=1)
    @given(
        joint_len=st.integers(1, 2 * mesh.sp_size + 1),
        seq=st.integers(1, 3 * mesh.sp_size + 1),
        heads=st.integers(1, 5),
        masked=st.booleans(),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(joint_len, seq, heads, masked, seed):
        nonlocal examples
        g = torch.Generator().manual_seed(seed)
        b = mesh.batch_size
        # the full sequence is [joint; image]; the joint part is replicated, the image part sharded
        q, k, v, dout = (torch.randn(b, joint_len + seq, heads, 8, generator=g) for _ in range(4))
        mask = random_key_mask(b, joint_len + seq, g) if masked else None
        ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = reference_attention(*ref_in, None, mask)
        ref.backward(dout)
        rows = [mesh.batch_rank]
        joint = [x[rows][:, :joint_len].clone().requires_grad_() for x in (q, k, v)]
        image = [x[rows][:, joint_len:].clone().requires_grad_() for x in (q, k, v)]
        local = [shard_sequence(x, mesh, dim=1) for x in image]
        masks = {}
        if masked:
            masks = {"key_mask": mask[rows][:, joint_len:], "joint_key_mask": mask[rows][:, :joint_len]}
        out, joint_out = fn(*local, seq_len=seq, joint=tuple(joint), **masks)
        out = gather_sequence(out, mesh, dim=1, seq_len=seq)
        torch.autograd.backward((out, joint_out), (dout[rows][:, joint_len:], dout[rows][:, :joint_len]))
        r = ref[rows]
        errs = [excess(out, r[:, joint_len:]), excess(joint_out, r[:, :joint_len])]
        errs += [excess(x.grad, y.grad[rows][:, joint_len:]) for x, y in zip(image, ref_in, strict=True)]
        errs += [excess(x.grad, y.grad[rows][:, :joint_len]) for x, y in zip(joint, ref_in, strict=True)]
        # joint keys counted twice would give this instead; it must be told apart
        twice = reference_attention(
            q[rows],
            torch.cat((k[rows][:, :joint_len], k[rows]), 1),
            torch.cat((v[rows][:, :joint_len], v[rows]), 1),
            None,
        )
        errs.append(-excess(joint_out, twice[:, :joint_len], atol=1e-4, rtol=0))
        # bitwise identical joint outputs on every rank of the sequence-parallel group
        everyone = all_gather(joint_out.detach().contiguous(), mesh.sp_group, dim=0)
        errs.append(0.0 if all(torch.equal(c, joint_out) for c in everyone.split(joint_out.shape[0], 0)) else 1.0)
        assert agreed_max(max(errs)) <= 0, f"{name} joint on {mesh.describe()}: J={joint_len} L={seq}: {errs}"
        examples += 1

    check()
    return examples


def _padding_never_attended(world: int) -> None:
    """Blocks travel padded to the longest chunk; poisoning the padding must not change anything."""
    original = ring_module._pack_kv

    def poisoned(k, v, rows):
        kv = original(k, v, rows)
        kv[:, :, k.shape[1] :] = float("nan")
        return kv

    ring_module._pack_kv = poisoned
    try:
        g = torch.Generator().manual_seed(3)
        seq = 2 * world + 1  # uneven: the last ranks' blocks are padded
        q, k, v = (torch.randn(1, seq, 2, 8, generator=g) for _ in range(3))
        chunk = torch.tensor_split(torch.arange(seq), world)[dist.get_rank()]
        out = ring_attention(q[:, chunk], k[:, chunk], v[:, chunk], dist.group.WORLD, seq_len=seq)
        assert agreed_max(excess(out, reference_attention(q, k, v, None)[:, chunk])) <= 0
    finally:
        ring_module._pack_kv = original


def _sharded_joint(mesh: ParallelMesh) -> int:
    """FLUX's "sharded" joint design: text and image each split across ranks, concatenated locally.

    Each rank holds [its text chunk; its image chunk], a layout that is not one tensor_split of the
    joint sequence; passing every rank's length as ``seq_len`` must give the single-device result.
    """
    cases = 0
    for text, image, heads, seed in [(5, 9, 3, 0), (1, 2 * mesh.sp_size + 1, 2, 1), (7, 1, 5, 2)]:
        g = torch.Generator().manual_seed(seed)
        b = mesh.batch_size
        q, k, v, dout = (torch.randn(b, text + image, heads, 8, generator=g) for _ in range(4))
        ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
        ref = reference_attention(*ref_in, None)
        ref.backward(dout)
        rows = [mesh.batch_rank]
        t_idx = torch.tensor_split(torch.arange(text), mesh.sp_size)
        i_idx = torch.tensor_split(torch.arange(text, text + image), mesh.sp_size)
        mine = torch.cat((t_idx[mesh.sp_rank], i_idx[mesh.sp_rank]))  # this rank's tokens, in its order
        lengths = [len(t) + len(i) for t, i in zip(t_idx, i_idx, strict=True)]
        local = [x[rows][:, mine].clone().requires_grad_() for x in (q, k, v)]
        out = usp_attention(*local, mesh, seq_len=lengths)
        out.backward(dout[rows][:, mine])
        errs = [excess(out, ref[rows][:, mine])]
        errs += [excess(a.grad, r.grad[rows][:, mine]) for a, r in zip(local, ref_in, strict=True)]
        assert agreed_max(max(errs)) <= 0, f"sharded joint layout on {mesh.describe()}: {text}+{image}: {errs}"
        cases += 1
    return cases


def _bad_input_errors(mesh: ParallelMesh) -> list[str]:
    """Every bad call must raise ValueError on every rank before any collective."""
    x = torch.randn(1, 2, 2 * mesh.ulysses_size, 8)
    cases = {
        "dtype": lambda: usp_attention(x, x.double(), x, mesh),
        "rank3": lambda: usp_attention(x[0], x[0], x[0], mesh),
        "kv_shape": lambda: usp_attention(x, x[:, :1], x[:, :1], mesh),
        "backend_name": lambda: usp_attention(x, x, x, mesh, backend="nope"),
        "backend_cuda": lambda: usp_attention(x, x, x, mesh, backend="cudnn"),
        "scale": lambda: usp_attention(x, x, x, mesh, scale=float("nan")),
        # every rank holds 2 tokens, but these layouts give each rank a different count
        "seq_len": lambda: usp_attention(x, x, x, mesh, seq_len=1),
        "seq_len_list": lambda: usp_attention(x, x, x, mesh, seq_len=[2] * (mesh.sp_size + 1)),
        "seq_len_zero": lambda: ring_attention(x, x, x, mesh.ring_group, seq_len=0),
    }
    return expect_value_errors(cases)


def _corrupt_lse(kind: str):
    base = next(b for b in BACKENDS if b.name == "cpu_flash")

    def forward(q, k, v, scale):
        out, lse = base.forward(q, k, v, scale)
        return out, torch.zeros_like(lse) if kind == "zero" else lse.to(torch.bfloat16).float()

    return dataclasses.replace(base, name=f"cpu_flash_{kind}_lse", forward=forward)


def _corrupted_lse_is_caught(world: int) -> dict[str, float]:
    """A zero or bf16-rounded LSE must fail the fp32 ring parity check."""
    group = dist.group.WORLD
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 16 * world, 3, 32, generator=g) for _ in range(3))
    ref = reference_attention(q, k, v, None)
    rank = dist.get_rank()
    rows = torch.tensor_split(torch.arange(16 * world), world)[rank]
    found = {}
    for kind in ("zero", "bf16"):
        lengths = [16] * world
        out = ring_attention_core(q[:, rows], k[:, rows], v[:, rows], group, 32**-0.5, _corrupt_lse(kind), lengths)
        found[kind] = agreed_max(excess(out, ref[:, rows]))
        assert found[kind] > 0, f"a {kind} LSE passed the ring parity check"
    good = ring_attention(q[:, rows], k[:, rows], v[:, rows], group)
    assert agreed_max(excess(good, ref[:, rows])) <= 0
    return found


def _world_worker(world: int) -> dict:
    worker_setup()
    report: dict = {"parity": {}, "errors": {}, "replicated_joint": {}}
    for u, r, b in MESHES[world]:
        mesh = ParallelMesh.build(ulysses=u, ring=r, batch=b)
        for name, fn in _primitives(mesh):
            report["parity"][f"{name} {mesh.describe()}"] = _parity(mesh, fn, name)
        report["errors"][mesh.describe()] = _bad_input_errors(mesh)
        report["sharded_joint"] = report.get("sharded_joint", 0) + _sharded_joint(mesh)
        for name, fn in _primitives(mesh):
            report["replicated_joint"][f"{name} {mesh.describe()}"] = _replicated_joint(mesh, fn, name)
    report["corrupt"] = _corrupted_lse_is_caught(world)
    _padding_never_attended(world)
    return report


@pytest.mark.parametrize("world", sorted(MESHES))
def test_parallel_attention_matches_single_device(world):
    reports = run_ranks(_world_worker, world, world)
    report = reports[0]
    expected = {f"{n} {m}" for m in report["errors"] for n in ("usp",)}
    assert expected <= set(report["parity"])
    for key, stats in report["parity"].items():
        assert stats["examples"] >= EXAMPLES, key
        assert stats["uneven"] >= 1, key
        assert stats["masked"] >= 1, key
        assert stats["max_err"] < 1e-5, key
    for msgs in report["errors"].values():
        assert len(msgs) == 9, msgs

    # Every rank refused the same calls (identical decisions, so no rank waits in a collective);
    # messages may name the rank's own chunk.
    def refused(r):
        return {m: [msg.split(":")[0] for msg in msgs] for m, msgs in r["errors"].items()}

    assert all(refused(r) == refused(report) for r in reports)
    assert report["corrupt"]["zero"] > 1e-3 and report["corrupt"]["bf16"] > 0
    assert report["sharded_joint"] == 3 * len(MESHES[world])
    assert report["replicated_joint"].keys() == report["parity"].keys()
    assert all(n >= 6 for n in report["replicated_joint"].values())
