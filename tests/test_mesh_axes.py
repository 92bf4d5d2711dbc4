"""Named mesh axes, meshes on a subset of the world's ranks, and meshes from a user's torch ``DeviceMesh``.

One spawn of 4 gloo ranks: ranks 1–2 run parallel FLUX on their own mesh (equal to the plain model,
with its CUDA-graph hook and a diffusers hook on top) while ranks 0 and 3 work in a group of their
own; ``from_device_mesh`` on user-built device meshes gives the groups and layout of ``build``; bad
layouts and rank lists raise the same error everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from diffusers.hooks import HookRegistry, ModelHook
from dist_utils import excess, expect_value_errors, run_ranks, worker_setup
from test_flux import flux_inputs, tiny_transformer
from torch.distributed.device_mesh import init_device_mesh

from models import parallelize_flux, unparallelize_flux
from xdit_core import ParallelMesh, gather_sequence, shard_sequence
from xdit_core.hooks import hook_names
from xdit_core.mesh import AXES


class _Double(ModelHook):
    def post_forward(self, module, output):
        output.sample = output.sample * 2
        return output


def _members(mesh: ParallelMesh) -> dict[str, list[int]]:
    return {name: dist.get_process_group_ranks(mesh.group(name)) for name in (*AXES, "sp", "world")}


def _named_axes(mesh: ParallelMesh) -> None:
    for axis, group in (("ulysses", mesh.ulysses_group), ("ring", mesh.ring_group), ("batch", mesh.batch_group)):
        assert mesh.group(axis) is group
        assert mesh.size(axis) == mesh.degrees[axis] == group.size()
        assert mesh.rank(axis) == mesh.coordinates[axis] == group.rank()
    assert mesh.group("sp") is mesh.sp_group and mesh.rank("sp") == mesh.sp_rank
    assert mesh.size("world") == mesh.world_size


def _subset_runs_flux(report: dict) -> None:
    """Ranks 1 and 2 run FLUX on a ulysses-2 mesh of their own; ranks 0 and 3 sum in their own group."""
    rank = dist.get_rank()
    mesh = ParallelMesh.build(ulysses=2, ranks=[1, 2])
    others = dist.new_group([0, 3])  # created by every rank, like every group
    if rank in (0, 3):
        assert mesh is None
        t = torch.tensor([float(rank)])
        dist.all_reduce(t, group=others)
        report["others"] = t.item()
        return
    _named_axes(mesh)
    report["subset groups"] = _members(mesh)
    model = tiny_transformer()
    inputs = flux_inputs(1, 5, 7, 11, seed=3)
    with torch.no_grad():
        plain = model(**inputs).sample
        parallelize_flux(model, mesh, cuda_graph=True)  # on CPU tensors the graph hook runs eagerly
        parallel = model(**inputs).sample
        # a diffusers hook on the parallel transformer keeps working, and outlives unparallelize_flux
        registry = HookRegistry.check_if_exists_or_initialize(model)
        registry.register_hook(_Double(), "double")
        doubled = model(**inputs).sample
        assert hook_names(model) == ["xdit.flux", "xdit.cuda_graph"]
        unparallelize_flux(model)
        assert hook_names(model) == []
        plain_doubled = model(**inputs).sample
        registry.remove_hook("double")
        again = model(**inputs).sample
    report["flux excess"] = max(
        excess(parallel, plain, atol=1e-5, rtol=1e-4),
        excess(doubled, 2 * plain, atol=2e-5, rtol=1e-4),
        excess(plain_doubled, 2 * plain, atol=0, rtol=0),
        excess(again, plain, atol=0, rtol=0),
    )


def _from_device_mesh(report: dict) -> None:
    built = ParallelMesh.build(ulysses=2, ring=2)
    user = ParallelMesh.from_device_mesh(init_device_mesh("cpu", (2, 2), mesh_dim_names=("ring", "ulysses")))
    _named_axes(user)
    report["same groups as build"] = _members(user) == _members(built)
    report["same layout"] = (user.sp_rank, user.describe()) == (built.sp_rank, built.describe())
    x = torch.arange(2 * 11 * 3, dtype=torch.float32).reshape(2, 11, 3)
    report["round trip"] = torch.equal(gather_sequence(shard_sequence(x, user), user, seq_len=11), x)
    only_ulysses = ParallelMesh.from_device_mesh(init_device_mesh("cpu", (4,), mesh_dim_names=("ulysses",)))
    report["ulysses only"] = (only_ulysses.describe(), only_ulysses.ring_group.size(), only_ulysses.batch_size)
    batch_ulysses = ParallelMesh.from_device_mesh(init_device_mesh("cpu", (2, 2), mesh_dim_names=("batch", "ulysses")))
    report["batch × ulysses"] = (batch_ulysses.describe(), batch_ulysses.batch_rank, batch_ulysses.sp_rank)


def _errors() -> list[str]:
    swapped = init_device_mesh("cpu", (2, 2), mesh_dim_names=("ulysses", "ring"))
    unnamed = init_device_mesh("cpu", (4,))
    return expect_value_errors(
        {
            "axes out of order": lambda: ParallelMesh.from_device_mesh(swapped),
            "unnamed dims": lambda: ParallelMesh.from_device_mesh(unnamed),
            "not a device mesh": lambda: ParallelMesh.from_device_mesh("cpu:0,1"),  # type: ignore[arg-type]
            "rank outside the world": lambda: ParallelMesh.build(ulysses=2, ranks=[3, 4]),
            "rank twice": lambda: ParallelMesh.build(ulysses=2, ranks=[1, 1]),
            "ranks decreasing": lambda: ParallelMesh.build(ulysses=2, ranks=[2, 1]),
            "degrees vs ranks": lambda: ParallelMesh.build(ulysses=3, ranks=[0, 1]),
            "unknown group": lambda: ParallelMesh.build(ulysses=4).group("pipeline"),
            "check_ranks not a bool": lambda: ParallelMesh.build(ulysses=4, check_ranks=1),  # type: ignore[arg-type]
        }
    )


def _worker() -> dict:
    worker_setup()
    report: dict = {}
    _subset_runs_flux(report)
    _from_device_mesh(report)
    report["errors"] = _errors()
    return report


def test_named_axes_subset_meshes_and_device_meshes():
    reports = run_ranks(_worker, 4)
    assert reports[0]["others"] == reports[3]["others"] == 3.0
    for r in (1, 2):
        assert reports[r]["flux excess"] <= 0, reports[r]["flux excess"]
        assert reports[r]["subset groups"]["ulysses"] == reports[r]["subset groups"]["sp"] == [1, 2]
        assert reports[r]["subset groups"]["world"] == [1, 2]
    for report in reports:
        assert report["same groups as build"] and report["same layout"] and report["round trip"]
        assert report["ulysses only"] == ("u4×r1", 1, 1)
    assert [r["batch × ulysses"] for r in reports] == [("b2×u2×r1", b, u) for b in (0, 1) for u in (0, 1)]
    errors = reports[0]["errors"]
    assert all(r["errors"] == errors for r in reports)
    for words, message in zip(
        ["in that order", "named from", "DeviceMesh", "world ranks", "twice", "must increase", "do not match",
         "no group 'pipeline'", "True or False"],
        errors,
        strict=True,
    ):  # fmt: skip
        assert words in message, message
