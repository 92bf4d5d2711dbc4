"""all_to_all, all_gather, RingExchange and shard/gather autograd on gloo worlds of 2, 3 and 4 ranks.

Every rank builds the same full tensors (same seed) and checks its own part of the collective's
result against slices of them. Each world size runs in one spawn.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from dist_utils import agreed_max, expect_value_errors, rank_settings, run_ranks, worker_setup
from hypothesis import assume, example, given
from hypothesis import strategies as st

from xdit_core import ParallelMesh, RingExchange, all_gather, all_to_all, gather_sequence, shard_sequence

EXAMPLES = 8
# (scatter_dim, gather_dim) pairs that always run, besides the randomly drawn ones
DIM_PAIRS = [(2, 1), (1, 2), (0, 3), (3, 0), (-2, -3)]


def _fail_together(wrong: dict[str, bool | float], what: str) -> None:
    """Assert on every rank at once, so no rank is left waiting in a collective."""
    assert agreed_max(max(float(w) for w in wrong.values())) == 0, f"{what}: {wrong} on rank {dist.get_rank()}"


def _groups(world: int) -> list[tuple[str, dist.ProcessGroup]]:
    """The whole world, plus (at 4 ranks) the strided ring groups {0, 2}, {1, 3} of a 2×2 mesh."""
    groups = [("world", dist.group.WORLD)]
    if world == 4:
        mesh = ParallelMesh.build(ulysses=2, ring=2)
        groups += [("u2r2.ulysses", mesh.ulysses_group), ("u2r2.ring", mesh.ring_group)]
    return groups


# ----------------------------------------------------------------------------------- all_to_all
def _check_all_to_all(name: str, group: dist.ProcessGroup) -> int:
    size, me = dist.get_world_size(group), dist.get_rank(group)
    examples = 0

    def with_pairs(test):  # every pair in DIM_PAIRS runs as an explicit example, with three tensors
        for i, pair in enumerate(DIM_PAIRS):
            test = example(pair=pair, sizes=[2, 1, 3, 2], n_tensors=3, seed=i)(test)
        return test

    @rank_settings(EXAMPLES)
    @with_pairs
    @given(
        pair=st.tuples(st.integers(-4, 3), st.integers(-4, 3)),
        sizes=st.lists(st.integers(1, 3), min_size=4, max_size=4),
        n_tensors=st.integers(1, 3),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(pair: tuple[int, int], sizes: list[int], n_tensors: int, seed: int) -> None:
        nonlocal examples
        scatter, gather = pair
        assume(scatter % 4 != gather % 4)
        shape = list(sizes)
        shape[scatter % 4] *= size  # the full tensor splits evenly on both dims
        shape[gather % 4] *= size
        g = torch.Generator().manual_seed(seed)
        full = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n_tensors)]
        weights = [torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(n_tensors)]

        # Rank p holds chunk p of the gather dim; afterwards it must hold chunk p of the scatter dim.
        local = [torch.tensor_split(f, size, gather)[me].clone().requires_grad_() for f in full]
        out = all_to_all(local, group, scatter_dim=scatter, gather_dim=gather)
        wrong: dict[str, bool | float] = {"count": len(out) != n_tensors}
        wrong["values"] = any(
            not torch.equal(o, torch.tensor_split(f, size, scatter)[me]) for o, f in zip(out, full, strict=True)
        )
        back = all_to_all([o.detach() for o in out], group, scatter_dim=gather, gather_dim=scatter)
        wrong["inverse"] = any(not torch.equal(b, x) for b, x in zip(back, local, strict=True))

        # Autograd: L = Σ_ranks Σ_t <out_t², W_t> (only tensors 0 and 2 used) vs the same loss on full tensors.
        used = [t for t in range(n_tensors) if t != 1]
        loss = sum((out[t] ** 2 * torch.tensor_split(weights[t], size, scatter)[me]).sum() for t in used)
        loss.backward()
        ref_leaves = [f.clone().requires_grad_() for f in full]
        sum((ref_leaves[t] ** 2 * weights[t]).sum() for t in used).backward()
        for t in range(n_tensors):
            expected = torch.zeros(shape, dtype=torch.float64) if t not in used else ref_leaves[t].grad
            expected = torch.tensor_split(expected, size, gather)[me]
            got = local[t].grad if local[t].grad is not None else torch.zeros_like(local[t])
            wrong[f"grad{t}"] = (got - expected).abs().max().item() > 1e-12
        examples += 1
        _fail_together(wrong, f"all_to_all over {name}: shape {shape} scatter {scatter} gather {gather}")

    check()
    return examples


def _check_all_to_all_errors(group: dist.ProcessGroup) -> list[str]:
    size = dist.get_world_size(group)
    x = torch.randn(2, size + 1, size, 3)
    cases = {
        "not_divisible": lambda: all_to_all([x, x], group, scatter_dim=1, gather_dim=2),
        "same_dims": lambda: all_to_all([x], group, scatter_dim=2, gather_dim=-2),
        "shape_mismatch": lambda: all_to_all([x[:, :size], x[:, :size, :1]], group, scatter_dim=2, gather_dim=1),
        "dtype_mismatch": lambda: all_to_all([x, x.double()], group, scatter_dim=2, gather_dim=1),
        "empty": lambda: all_to_all([], group, scatter_dim=2, gather_dim=1),
    }
    return expect_value_errors(cases, group)


# ------------------------------------------------------------------------------------ all_gather
def _check_all_gather(name: str, group: dist.ProcessGroup) -> None:
    size, me = dist.get_world_size(group), dist.get_rank(group)
    g = torch.Generator().manual_seed(5)
    for dim in (0, 1, 2, -1):
        full = torch.randn(2 * size, 3 * size, size, generator=g)  # the same on every rank
        local = torch.tensor_split(full, size, dim)[me]
        _fail_together({"value": not torch.equal(all_gather(local, group, dim=dim), full)}, f"all_gather {name} {dim}")


# --------------------------------------------------------------------------------- RingExchange
def _check_ring_exchange(name: str, group: dist.ProcessGroup) -> None:
    size, me = dist.get_world_size(group), dist.get_rank(group)

    def block_of(group_rank: int, dtype: torch.dtype) -> torch.Tensor:
        """A block that names its origin (global rank) in every element."""
        origin = dist.get_global_rank(group, group_rank)
        return (100 * origin + torch.arange(6).view(3, 2)).to(dtype)

    ring = RingExchange(group)
    wrong: dict[str, bool | float] = {}
    for dtype in (torch.float32, torch.int64):
        held = block_of(me, dtype)
        for step in range(1, size + 1):  # a full turn brings every block home
            ring.start(held)
            held = ring.wait()
            wrong[f"{dtype} step{step}"] = not torch.equal(held, block_of((me - step) % size, dtype))
    _fail_together(wrong, f"RingExchange over {name}")

    # Misuse is caught locally; the transfer that was posted still completes on every rank.
    errors = []
    ring.start(block_of(me, torch.float32))
    try:
        ring.start(block_of(me, torch.float32))
    except RuntimeError as e:
        errors.append(str(e))
    received = ring.wait()
    try:
        ring.wait()
    except RuntimeError as e:
        errors.append(str(e))
    wrong = {
        "errors": len(errors) != 2,
        "received": not torch.equal(received, block_of((me - 1) % size, torch.float32)),
    }
    _fail_together(wrong, f"RingExchange misuse over {name}: {errors}")


# ------------------------------------------------------------------------- shard/gather autograd
def _check_shard_gather_grad(mesh: ParallelMesh) -> int:
    examples = 0

    @rank_settings(EXAMPLES)
    @given(
        dim=st.sampled_from([1, 2, -1]),
        length=st.integers(1, 3 * mesh.sp_size + 1),  # any length: uneven chunks, fewer tokens than ranks
        seed=st.integers(0, 2**31 - 1),
    )
    def check(dim: int, length: int, seed: int) -> None:
        nonlocal examples
        g = torch.Generator().manual_seed(seed + 7919 * mesh.batch_rank)  # replicated within a batch group
        shape = [2, 3, 2, 2]
        shape[dim % 4] = length
        x0, w = torch.randn(shape, generator=g, dtype=torch.float64), torch.randn(shape, generator=g)

        def op(t: torch.Tensor) -> torch.Tensor:  # elementwise, so it commutes with sharding
            return torch.sin(t) * t

        x = x0.clone().requires_grad_()
        y = gather_sequence(op(shard_sequence(x, mesh, dim=dim)), mesh, dim=dim, seq_len=length)
        (y * w).sum().backward()
        ref = x0.clone().requires_grad_()
        ref_y = op(ref)
        (ref_y * w).sum().backward()
        wrong = {
            "value": (y - ref_y).abs().max().item() > 1e-12,
            "grad": (x.grad - ref.grad).abs().max().item() > 1e-12,
        }
        examples += 1
        _fail_together(wrong, f"shard/gather grad on {mesh.describe()}: shape {shape} dim {dim}")

    check()
    return examples


def _collectives_worker(world: int) -> dict:
    worker_setup()
    report: dict = {"all_to_all": {}, "errors": {}, "shard_gather": {}}
    for name, group in _groups(world):
        report["all_to_all"][name] = _check_all_to_all(name, group)
        report["errors"][name] = (dist.get_world_size(group), _check_all_to_all_errors(group))
        _check_all_gather(name, group)
        _check_ring_exchange(name, group)
    meshes = [(world, 1, 1), (1, world, 1)] + ([(2, 1, 2), (1, 2, 2)] if world == 4 else [])
    for u, r, b in meshes:
        mesh = ParallelMesh.build(ulysses=u, ring=r, batch=b)
        report["shard_gather"][mesh.describe()] = _check_shard_gather_grad(mesh)
    return report


@pytest.mark.parametrize("world", [2, 3, 4])
def test_collectives(world: int):
    reports = run_ranks(_collectives_worker, world, world, timeout_s=120)
    report = reports[0]
    assert all(r == report for r in reports)
    # hypothesis may reject examples with equal dims, but most must have run
    assert set(report["all_to_all"]) == ({"world", "u2r2.ulysses", "u2r2.ring"} if world == 4 else {"world"})
    assert all(n == EXAMPLES + len(DIM_PAIRS) for n in report["all_to_all"].values()), report["all_to_all"]
    assert len(report["shard_gather"]) == (4 if world == 4 else 2)
    assert all(n == EXAMPLES for n in report["shard_gather"].values()), report["shard_gather"]
    for size, messages in report["errors"].values():
        assert [m.split(":")[0] for m in messages] == [
            "not_divisible",
            "same_dims",
            "shape_mismatch",
            "dtype_mismatch",
            "empty",
        ]
        assert f"dim 1 of size {size + 1} does not split into {size} equal chunks" in messages[0]
