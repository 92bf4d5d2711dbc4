"""Mesh arithmetic (pure) and ``ParallelMesh.build`` on real gloo worlds of 2, 3 and 4 ranks."""

from __future__ import annotations

import itertools
import re

import pytest
import torch
import torch.distributed as dist
from dist_utils import agreed_max, rank_settings, run_ranks, worker_setup
from hypothesis import given, settings
from hypothesis import strategies as st

from xdit_core import ParallelMesh, PeerExchange, gather_sequence, mesh_coordinates, shard_sequence, sp_index
from xdit_core.mesh import suggest_meshes

degrees = st.integers(1, 5)


def _layout_rank(batch_rank: int, ring_rank: int, ulysses_rank: int, *, ulysses: int, ring: int) -> int:
    """The documented layout: ``rank = (batch_rank * ring + ring_rank) * ulysses + ulysses_rank``."""
    return (batch_rank * ring + ring_rank) * ulysses + ulysses_rank


# ------------------------------------------------------------------------------------- pure
@settings(max_examples=30, deadline=None)
@given(ulysses=degrees, ring=degrees, batch=degrees)
def test_mesh_coordinates_is_a_bijection_matching_the_layout(ulysses: int, ring: int, batch: int):
    world = ulysses * ring * batch
    coords = [mesh_coordinates(r, ulysses=ulysses, ring=ring, batch=batch) for r in range(world)]
    assert sorted(coords) == list(itertools.product(range(batch), range(ring), range(ulysses)))
    for rank, (b, r, u) in enumerate(coords):
        assert _layout_rank(b, r, u, ulysses=ulysses, ring=ring) == rank


@settings(max_examples=30, deadline=None)
@given(ulysses=degrees, ring=degrees, batch=degrees)
def test_ulysses_groups_are_contiguous_runs(ulysses: int, ring: int, batch: int):
    groups: dict[tuple[int, int], list[int]] = {}
    for rank in range(ulysses * ring * batch):
        b, r, u = mesh_coordinates(rank, ulysses=ulysses, ring=ring, batch=batch)
        groups.setdefault((b, r), []).append(rank)
        assert groups[(b, r)].index(rank) == u  # ulysses rank = position in the run
    for members in groups.values():
        assert members == list(range(members[0], members[0] + ulysses))


@settings(max_examples=30, deadline=None)
@given(ulysses=degrees, ring=degrees, batch=degrees)
def test_sp_index_follows_rank_order_within_a_batch(ulysses: int, ring: int, batch: int):
    sp = ulysses * ring
    for rank in range(ulysses * ring * batch):
        b, r, u = mesh_coordinates(rank, ulysses=ulysses, ring=ring, batch=batch)
        assert sp_index(r, u, ulysses) == rank - b * sp
    # every chunk of a sequence is owned exactly once per batch index
    assert sorted(sp_index(r, u, ulysses) for r in range(ring) for u in range(ulysses)) == list(range(sp))


@settings(max_examples=30, deadline=None)
@given(ulysses=degrees, ring=degrees, batch=degrees, past=st.integers(0, 3))
def test_mesh_coordinates_rejects_ranks_outside_the_mesh(ulysses: int, ring: int, batch: int, past: int):
    world = ulysses * ring * batch
    for rank in (world + past, -1 - past):
        with pytest.raises(ValueError, match=f"rank {rank} is outside a mesh of {world} ranks"):
            mesh_coordinates(rank, ulysses=ulysses, ring=ring, batch=batch)


@pytest.mark.parametrize("axis", ["ulysses", "ring", "batch"])
@pytest.mark.parametrize("value", [0, -1, -4, True, False, 2.0, "2", None])
def test_degree_validation(axis: str, value: object):
    degrees_ = {"ulysses": 1, "ring": 1, "batch": 1, axis: value}
    with pytest.raises(ValueError, match=rf"mesh degree {axis}={re.escape(repr(value))} must be a positive integer"):
        mesh_coordinates(0, **degrees_)
    # build validates before it looks at the (here uninitialised) world
    with pytest.raises(ValueError, match=rf"mesh degree {axis}="):
        ParallelMesh.build(**degrees_)


def test_build_without_a_world_explains_how_to_start_one():
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="init_distributed"):
        ParallelMesh.build(ulysses=1)


@settings(max_examples=30, deadline=None)
@given(world=st.integers(1, 64))
def test_suggest_meshes_lists_every_split(world: int):
    suggestions = suggest_meshes(world)
    parsed = [tuple(int(n) for n in re.fullmatch(r"ulysses=(\d+), ring=(\d+)", s).groups()) for s in suggestions]
    assert parsed == [(u, world // u) for u in range(1, world + 1) if world % u == 0]
    assert all(u * r == world for u, r in parsed)


# ------------------------------------------------------------------------------- multi-rank
def _factorisations(world: int) -> list[tuple[int, int, int]]:
    return [
        (u, r, b)
        for u in range(1, world + 1)
        for r in range(1, world + 1)
        for b in range(1, world + 1)
        if u * r * b == world
    ]


def _expected_groups(rank: int, u: int, r: int, b: int) -> dict[str, list[int]]:
    """Members of each of ``rank``'s groups, in group-rank order, from the layout formula alone."""
    bi, ri, ui = mesh_coordinates(rank, ulysses=u, ring=r, batch=b)
    return {
        "ulysses": [_layout_rank(bi, ri, x, ulysses=u, ring=r) for x in range(u)],
        "ring": [_layout_rank(bi, x, ui, ulysses=u, ring=r) for x in range(r)],
        "batch": [_layout_rank(x, ri, ui, ulysses=u, ring=r) for x in range(b)],
        "sp": [_layout_rank(bi, y, x, ulysses=u, ring=r) for y in range(r) for x in range(u)],
    }


def _check_mesh(mesh: ParallelMesh, u: int, r: int, b: int) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    expected = _expected_groups(rank, u, r, b)
    groups = {"ulysses": mesh.ulysses_group, "ring": mesh.ring_group, "batch": mesh.batch_group, "sp": mesh.sp_group}
    for axis, group in groups.items():
        members = dist.get_process_group_ranks(group)
        assert members == expected[axis], f"{axis} group of rank {rank} in u{u}r{r}b{b}: {members}"
        assert dist.get_world_size(group) == len(expected[axis])
        assert dist.get_rank(group) == expected[axis].index(rank)
    bi, ri, ui = mesh_coordinates(rank, ulysses=u, ring=r, batch=b)
    assert (mesh.batch_rank, mesh.ring_rank, mesh.ulysses_rank) == (bi, ri, ui)
    assert (mesh.batch_size, mesh.ring_size, mesh.ulysses_size) == (b, r, u)
    assert mesh.sp_size == u * r and mesh.world_size == world
    assert mesh.sp_rank == dist.get_rank(mesh.sp_group) == sp_index(ri, ui, u)
    assert mesh.device_mesh.mesh.tolist() == torch.arange(world).reshape(b, r, u).tolist()
    assert mesh.describe() == (f"u{u}×r{r}" if b == 1 else f"b{b}×u{u}×r{r}")


def _check_shard_gather(mesh: ParallelMesh) -> int:
    """shard → gather is the identity; each rank holds ``tensor_split(x, sp_size, dim)[sp_rank]``."""
    examples = 0

    @rank_settings(8)
    @given(
        dim=st.sampled_from([1, 2, -2]),
        length=st.integers(1, 3),
        remainder=st.integers(0, mesh.sp_size - 1),
        other=st.integers(1, 3),
        seed=st.integers(0, 2**31 - 1),
    )
    def check(dim: int, length: int, remainder: int, other: int, seed: int) -> None:
        nonlocal examples
        # Different content per batch index: a gather that crossed batch groups would be caught.
        g = torch.Generator().manual_seed(seed + 1000 * mesh.batch_rank)
        shape = [2, other, other + 1, 3]
        shape[dim % 4] = length * mesh.sp_size + remainder
        x = torch.randn(shape, generator=g)
        local = shard_sequence(x, mesh, dim=dim)
        wrong = {"shard": not torch.equal(local, torch.tensor_split(x, mesh.sp_size, dim)[mesh.sp_rank])}
        if remainder == 0:  # gather needs equal chunks
            wrong["gather"] = not torch.equal(gather_sequence(local, mesh, dim=dim), x)
        examples += 1
        # Every rank fails together (a lone failing rank would leave the others in a collective).
        assert agreed_max(max(wrong.values())) == 0, f"{mesh.describe()} shape {shape} dim {dim}: {wrong}"

    check()
    return examples


def _mesh_worker(world: int) -> dict:
    worker_setup()
    report: dict = {"meshes": [], "examples": {}, "errors": []}
    for u, r, b in _factorisations(world):
        mesh = ParallelMesh.build(ulysses=u, ring=r, batch=b)
        _check_mesh(mesh, u, r, b)
        assert mesh.ulysses_exchange is None and mesh.ulysses_transport is mesh.ulysses_group
        report["meshes"].append(mesh.describe())
        report["examples"][mesh.describe()] = _check_shard_gather(mesh)
    bad = [(world + 1, 1, 1), (1, 2 * world, 1), (1, 1, world + 1), (2, 1, world)]
    if world == 4:
        bad += [(1, 1, 3), (2, 2, 2)]  # batch does not divide the world; batch 2 leaves 2 ranks per sequence
    for u, r, b in bad:
        try:
            ParallelMesh.build(ulysses=u, ring=r, batch=b)
        except ValueError as e:
            report["errors"].append(((u, r, b), str(e)))
        else:
            raise AssertionError(f"ParallelMesh.build(ulysses={u}, ring={r}, batch={b}) accepted a world of {world}")
    for make in (lambda: ParallelMesh.build(ulysses=world, peer_exchange=True), lambda: PeerExchange(dist.group.WORLD)):
        try:
            make()
        except ValueError as e:
            report["errors"].append(("peer", str(e)))
        else:
            raise AssertionError("a PeerExchange was built for gloo CPU processes")
    dist.barrier()  # still in step: no rank entered a collective while failing
    return report


@pytest.mark.parametrize("world", [2, 3, 4])
def test_parallel_mesh_groups_and_sequence_layout(world: int):
    reports = run_ranks(_mesh_worker, world, world, timeout_s=120)
    report = reports[0]
    assert len(report["meshes"]) == len(_factorisations(world)) == len(set(report["meshes"]))
    assert all(n == 8 for n in report["examples"].values()), report["examples"]
    assert all(r["errors"] == report["errors"] for r in reports)  # the same message on every rank
    peer = [message for key, message in report["errors"] if key == "peer"]
    assert len(peer) == 2 and "needs a CUDA mesh" in peer[0] and "needs CUDA devices" in peer[1], peer
    for (u, r, b), message in (e for e in report["errors"] if e[0] != "peer"):
        assert f"ulysses={u} × ring={r} × batch={b} = {u * r * b}" in message
        assert f"world size {world}" in message
        if world % b == 0:
            assert message.endswith(f"with batch={b} choose one of: " + "; ".join(suggest_meshes(world // b))), message
        else:
            assert f"batch={b} does not divide {world}" in message
