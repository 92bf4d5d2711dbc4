"""Sharded weights (``models.sharding.shard_weights``, torch FSDP2) composed with sequence parallelism and caching.

Spawns of 2 and 4 gloo ranks: tiny FLUX and tiny STDiT3 with their weights sharded over a mesh axis
(``sp``, ``batch``, ``world``) and made parallel (before or after sharding) equal the resident model
on one process within 1e-5; each rank holds its share of the weights only; a step cache on the sharded
parallel model decides and computes as on one process; bad calls raise.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from dist_utils import agreed_max, expect_value_errors, run_ranks, worker_setup
from test_flux import flux_inputs, tiny_transformer
from test_stdit import stdit_inputs, tiny_model

from models import parallelize_flux, parallelize_stdit
from models.caching import cache_summary, enable_cache, static_step_mask
from models.sharding import is_sharded, shard_weights
from xdit_core import ParallelMesh
from xdit_core.graphs import apply_cuda_graph

# world -> (ulysses, ring, batch, axis the weights are sharded over)
CASES = {2: [(2, 1, 1, "sp"), (1, 1, 2, "batch")], 4: [(2, 1, 2, "world"), (4, 1, 1, "sp")]}


def _share(model: torch.nn.Module) -> tuple[int, int]:
    """(parameters this rank holds, parameters of the whole model)."""
    local = sum(p.to_local().numel() for p in model.parameters())
    whole = sum(p.numel() for p in model.parameters())
    return local, whole


def _steps(model: torch.nn.Module, inputs: dict, steps: int = 4) -> torch.Tensor:
    x, outs = inputs["hidden_states"], []
    for i in range(steps):
        out = model(**{**inputs, "hidden_states": x, "timestep": torch.full((x.shape[0],), 1.0 - i / steps)}).sample
        x = x - 0.2 * out
        outs.append(out)
    return torch.stack(outs)


def _worker(cases: list) -> dict:
    worker_setup()
    report = {"max_err": 0.0, "shares": []}
    with torch.no_grad():
        for i, (u, r, b, axis) in enumerate(cases):
            mesh = ParallelMesh.build(ulysses=u, ring=r, batch=b)
            n = mesh.size(axis)
            for name, build, inputs in (
                ("FLUX", tiny_transformer, flux_inputs(2, 5, 3, 7, seed=i)),  # 15 image tokens
                ("STDiT3", tiny_model, stdit_inputs(2, 3, 5, 7, seed=i)),
            ):
                model = build()
                want = model(**inputs)
                want = want.sample if name == "FLUX" else want
                adapt = parallelize_flux if name == "FLUX" else parallelize_stdit
                if i % 2:  # parallel first, then sharded; or the other way round
                    shard_weights(adapt(model, mesh), mesh, axis=axis)
                else:
                    adapt(shard_weights(model, mesh, axis=axis), mesh)
                got = model(**inputs)
                got = got.sample if name == "FLUX" else got
                err = agreed_max((got - want).abs().max().item())
                assert err <= 1e-5, f"{name} u{u}r{r}b{b} sharded over {axis}: {err:.2e}"
                local, whole = _share(model)
                assert is_sharded(model) and local <= whole / n + 2048, (name, axis, local, whole)
                total = torch.tensor([local])
                dist.all_reduce(total, group=mesh.group(axis))
                assert total.item() == whole  # the shards cover every weight once
                report["max_err"] = max(report["max_err"], err)
                report["shares"].append((name, axis, local, whole))

        # a step cache on a sharded parallel FLUX: the single-process cached run's outputs
        config = static_step_mask([1, 0, 1, 0])
        inputs = flux_inputs(1, 5, 3, 7, seed=9)
        plain = tiny_transformer()
        enable_cache(plain, config)
        want = _steps(plain, inputs)
        mesh = ParallelMesh.build(ulysses=dist.get_world_size())
        model = tiny_transformer()
        enable_cache(parallelize_flux(shard_weights(model, mesh), mesh), config)
        got = _steps(model, inputs)
        assert agreed_max((got - want).abs().max().item()) <= 1e-5
        assert [s["computed"] for s in cache_summary(model)["branches"]["default"]] == [True, False, True, False]

        report["errors"] = expect_value_errors(
            {
                "twice": lambda: shard_weights(model, mesh),
                "unknown axis": lambda: shard_weights(tiny_transformer(), mesh, axis="pipeline"),
                "not a model": lambda: shard_weights(torch.nn.Linear(2, 2), mesh),
                "no mesh": lambda: shard_weights(tiny_transformer(), None),
                "graph on a sharded model": lambda: apply_cuda_graph(model),
                "sharding a graphed model": lambda: shard_weights(apply_cuda_graph(tiny_transformer()), mesh),
            }
        )
    return report


def test_sharded_weights_equal_resident_model() -> None:
    for world, cases in CASES.items():
        reports = run_ranks(_worker, world, cases, timeout_s=600)
        assert all(r["max_err"] <= 1e-5 for r in reports)
        text = "\n".join(reports[0]["errors"])
        needles = ("sharded already", "has no group 'pipeline'", "cannot address", "needs a ParallelMesh")
        for needle in (*needles, "a CUDA graph cannot follow", "cannot follow FSDP2's weight gathers"):
            assert needle in text, text
