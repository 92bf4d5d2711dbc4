"""Boundary plans (``xdit_core.plan``) and the per-call context (``xdit_core.context``).

The round trip runs in one spawn of 4 gloo ranks: hypothesis draws values of any shape, a mesh
layout, which dims of each value are split over which (independent) axes, per-sample splits against
shared values, replicated values, lists, halos, an upsampling scale and gathers to one rank. Every
rank checks that it holds exactly its ``tensor_split`` chunk (with its neighbours' halo entries,
clipped at the ends), and that gathering the chunks back gives the whole value.
"""

from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist
from dist_utils import agreed_max, rank_settings, run_ranks, worker_setup
from hypothesis import given
from hypothesis import strategies as st

from models.flux.adapter import FLUX_PLANS
from models.stdit.parallel import STDIT_PLAN
from parallel_vae.decoder import row_plan
from xdit_core import ParallelMesh, split_sizes
from xdit_core.context import CallContext
from xdit_core.plan import Gather, Plan, Replicate, Split, gather, split

EXAMPLES = 40
LAYOUTS = {
    "u4": (4, 1, 1),
    "r4": (1, 4, 1),
    "b4": (1, 1, 4),
    "b2×u2": (2, 1, 2),
    "b2×r2": (1, 2, 2),
    "u2×r2": (2, 2, 1),
}
# axes that split one value on different dims must be independent (no rank pair shares a chunk on both)
AXIS_SETS = [("batch", "sp"), ("batch", "ring", "ulysses")]


@st.composite
def cases(draw: st.DrawFn) -> dict:
    layout = draw(st.sampled_from(sorted(LAYOUTS)))
    batch = draw(st.integers(1, 5))
    values = []
    for i in range(draw(st.integers(1, 3))):
        ndim = draw(st.integers(1, 4))
        shape = [draw(st.integers(1, 7)) for _ in range(ndim)]
        if draw(st.booleans()):  # one entry per sample (else its leading dim may still equal the batch by chance)
            shape[0] = batch
        per_sample = draw(st.booleans())  # a per-sample split on the batch axis first
        axes = [a for a in draw(st.sampled_from(AXIS_SETS)) if not (per_sample and a == "batch")]
        dims = draw(st.permutations(range(ndim)))
        splits = []  # (dim, axis, halo), applied in order after the per-sample split
        for dim in dims[: draw(st.integers(0, min(ndim, len(axes))))]:
            axis = axes.pop(draw(st.integers(0, len(axes) - 1)))
            splits.append((dim if draw(st.booleans()) else dim - ndim, axis, draw(st.integers(0, 2))))
        values.append(
            {
                "name": f"v{i}",
                "shape": shape,
                "per_sample": per_sample,
                "splits": splits,
                "replicate": draw(st.booleans()),
                "list": draw(st.booleans()),
                "scale": draw(st.integers(1, 3)),
                "to": draw(st.sampled_from([None, 0, 1])),
            }
        )
    shared_shape = [draw(st.integers(1, 4)) for _ in range(draw(st.integers(0, 3)))]
    if shared_shape and shared_shape[0] == batch:  # shared by every sample: not batch-led
        shared_shape[0] += 1
    return {"layout": layout, "batch": batch, "values": values, "shared_shape": shared_shape}


def _splits(v: dict, batch: int) -> list[tuple[int, str, int]]:
    """Every split that really happens to value ``v``, in order (the per-sample one only on a batch-led value)."""
    lead = [(0, "batch", 0)] if v["per_sample"] and v["shape"][0] == batch else []
    return lead + list(v["splits"])


def _plan(case: dict) -> Plan:
    inputs: list[Split | Replicate] = [Split("batch_of", 0, "batch", per_sample=True)]
    outputs: list[Gather] = []
    for v in case["values"]:
        name, entries = v["name"], []
        if v["per_sample"]:
            entries.append(Split(name, 0, "batch", per_sample=True))
        entries += [Split(name, dim, axis, halo=halo) for dim, axis, halo in v["splits"]]
        if v["replicate"]:
            entries.append(Replicate(name, "sp"))
        inputs += entries
        gathers = [
            Gather(name, e.dim, e.axis, like=name, scale=v["scale"]) for e in reversed(entries) if isinstance(e, Split)
        ]
        if len(gathers) == 1 and v["to"] is not None:  # the only gather may go to one rank
            gathers = [Gather(name, gathers[0].dim, gathers[0].axis, like=name, scale=v["scale"], to=v["to"])]
        outputs += gathers
    inputs.append(Split("shared", 0, "batch", per_sample=True))
    return Plan("test", tuple(inputs), tuple(outputs), batch="batch_of")


def _expected_local(full: torch.Tensor, splits: list, mesh: ParallelMesh) -> tuple[torch.Tensor, torch.Tensor]:
    """``(with halos, own)``: this rank's part of ``full`` by successive tensor_split narrowing."""
    with_halo, own = full, full
    for dim, axis, halo in splits:
        n, size, rank = own.shape[dim], mesh.size(axis), mesh.rank(axis)
        sizes = split_sizes(n, size)
        start = sum(sizes[:rank])
        own = own.narrow(dim, start, sizes[rank])
        halo = halo if size > 1 else 0
        lo, hi = max(start - halo, 0), min(start + sizes[rank] + halo, n)
        with_halo = with_halo.narrow(dim, lo, hi - lo)
    return with_halo, own


def _upsampled(x: torch.Tensor, splits: list, scale: int) -> torch.Tensor:
    """What a decoder-like model returns: every split dim ``scale`` times longer."""
    for d in {dim % x.dim() for dim, _, _ in splits}:
        x = x.repeat_interleave(scale, dim=d)
    return x


def _round_trips(meshes: dict[str, ParallelMesh]) -> int:
    examples = 0

    @rank_settings(EXAMPLES)
    @given(case=cases(), seed=st.integers(0, 2**31 - 1))
    def check(case: dict, seed: int) -> None:
        nonlocal examples
        examples += 1
        mesh, batch = meshes[case["layout"]], case["batch"]
        g = torch.Generator().manual_seed(seed)
        values = {
            "batch_of": torch.randn(batch, 2, generator=g),
            "shared": torch.randn(case["shared_shape"], generator=g),
        }
        for v in case["values"]:
            x = torch.randn(v["shape"], generator=g)
            values[v["name"]] = [x, x + 1] if v["list"] else x
        plan = _plan(case)
        local, placement = split(plan, mesh.groups, values)
        wrong = {"shared": not torch.equal(local["shared"], values["shared"]), "chunk": False, "round trip": False}
        outputs, wants = {}, {}
        for v in case["values"]:
            name, splits = v["name"], _splits(v, batch)
            fulls = values[name] if v["list"] else [values[name]]
            mine = local[name] if v["list"] else [local[name]]
            for full, got in zip(fulls, mine, strict=True):
                with_halo, own = _expected_local(full, splits, mesh)
                wrong["chunk"] |= not torch.equal(got, with_halo)
                for dim, axis, _ in v["splits"]:
                    got = placement.own(got, name, axis, dim)
                wrong["chunk"] |= not torch.equal(got, own)
            outputs[name] = _upsampled(own, splits, v["scale"])  # the first part's own chunk (lists: the last)
            want = _upsampled(fulls[-1], splits, v["scale"])
            one_gather = len(splits) == 1 and int(v["per_sample"]) + len(v["splits"]) == 1
            if one_gather and v["to"] is not None and mesh.rank(splits[0][1]) != v["to"]:
                want = outputs[name]  # gathered to another rank: this one keeps its own chunk
            wants[name] = want
        back = gather(plan, mesh.groups, outputs, placement)
        wrong["round trip"] = any(not torch.equal(back[n], w) for n, w in wants.items())
        assert agreed_max(max(float(w) for w in wrong.values())) == 0, f"{wrong} on rank {dist.get_rank()}: {case}"

    check()
    return examples


def _plan_worker() -> dict:
    worker_setup()
    meshes = {name: ParallelMesh.build(ulysses=u, ring=r, batch=b) for name, (u, r, b) in LAYOUTS.items()}
    report = {"examples": _round_trips(meshes)}
    # a value whose parts differ in length along the split dim, and an axis the mesh lacks, are refused
    mesh = meshes["u4"]
    plan = Plan("test", (Split("a", 1, "sp"),), ())
    errors = []
    for bad in ({"a": [torch.zeros(1, 4), torch.zeros(1, 5)]}, {"a": 3}):
        try:
            split(plan, mesh.groups, bad)
        except ValueError as e:
            errors.append(str(e))
    try:
        split(Plan("test", (Split("a", 0, "pipeline"),), ()), mesh.groups, {"a": torch.zeros(4)})
    except ValueError as e:
        errors.append(str(e))
    try:
        x = torch.zeros(8, requires_grad=True)
        split(Plan("test", (Split("a", 0, "sp", halo=1),), ()), mesh.groups, {"a": x})
    except ValueError as e:
        errors.append(str(e))
    report["errors"] = errors
    return report


def test_split_gather_round_trip() -> None:
    reports = run_ranks(_plan_worker, 4, timeout_s=600)
    assert all(r == reports[0] for r in reports)
    assert reports[0]["examples"] >= EXAMPLES // 2
    text = "\n".join(reports[0]["errors"])
    for needle in ("differ in length", "must be a tensor", "axis 'pipeline'", "inference only"):
        assert needle in text, text


def test_plans_are_checked_and_readable() -> None:
    with pytest.raises(ValueError, match="not split"):
        Plan("bad", (Split("a", 0, "sp"),), (Gather("out", 0, "batch", like="a"),))
    with pytest.raises(ValueError, match=r"Plan\.batch"):
        Plan("bad", (Split("a", 0, "batch", per_sample=True),), ())
    with pytest.raises(ValueError, match="halo"):
        Split("a", 0, "sp", halo=-1)
    table = FLUX_PLANS["shard"].table()
    assert re.search(r"^hidden_states +split +1 +sp", table, re.M), table
    for needle in ("img_ids", "txt_ids", "per sample", "sizes of hidden_states"):
        assert needle in table, table
    assert "replicate" in FLUX_PLANS["replicate"].table()
    assert "tokens" in STDIT_PLAN.table() and "patches" in STDIT_PLAN.table()
    assert "halo 1" in row_plan(8, to=0).table() and "× 8, to rank 0" in row_plan(8, to=0).table()


def test_call_context() -> None:
    context = CallContext("model", tuple)
    with pytest.raises(ValueError, match="no parallel call in progress"):
        _ = context.layout
    with context.entered((1, 2)):
        assert context.layout == (1, 2)
        with pytest.raises(RuntimeError, match="already in a call"), context.entered((3,)):
            pass
        assert context.layout == (1, 2)
    with pytest.raises(ValueError):
        _ = context.layout
    with pytest.raises(TypeError, match="must be a tuple"), context.entered([1]):
        pass
    with pytest.raises(ZeroDivisionError), context.entered((1,)):
        _ = 1 / 0
    with pytest.raises(ValueError):  # emptied by the failure too
        _ = context.layout
