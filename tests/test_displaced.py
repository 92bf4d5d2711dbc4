"""parallelize_flux_displaced (inexact, stale k/v) against its single-process simulation and against the exact mode.

The reference is :class:`DisplacedSimulation` (``benchmarks/quality/displaced.py``): the plain tiny FLUX run
patch by patch on one process, with an attention processor of its own (SDPA over the patch's fresh k/v and
the other patches' k/v of the previous call), nothing of the parallel code path. The parent runs it for
every case; one spawn per world size (2, 3, 4 gloo ranks) runs each case's whole Euler sampling run
(STEPS calls, odd token counts: 25 image tokens, 7 text tokens, uneven on every mesh) on the displaced
model and compares every step's output with the simulation's within 1e-5: ulysses, ring and ulysses × ring
meshes, both text modes, warm-up 1 and 2, true CFG as two named calls per step (a stale buffer per branch)
and as one pair on the mesh's ``batch`` axis, two samples on the ``batch`` axis. Against the exact
``parallelize_flux`` on the same mesh: the warm-up steps are bit-identical, the first displaced step is
not, and warm-up ≥ steps is the exact run bit for bit. A second run (the timestep goes up again) repeats
the first bit for bit; ``reset_flux_displaced`` starts a new run mid-way; the bad inputs raise a
``ValueError`` on every rank before any collective; ``unparallelize_flux_displaced`` restores the model.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from dist_utils import agreed_max, excess, expect_value_errors, reference_attention, run_ranks, worker_setup
from test_flux import flux_inputs, tiny_transformer

from attention.displaced import StaleExchange, displaced_attention
from models import parallelize_flux, tiny_flux_pipeline, unparallelize_flux
from models.caching import DBCacheConfig, enable_cache
from models.flux import (
    CfgPair,
    ParallelFluxPipeline,
    pair_cfg_calls,
    parallelize_flux_displaced,
    reset_flux_displaced,
    unparallelize_flux_displaced,
)
from models.flux.adapter import BOUNDARY_HOOK
from xdit_core import ParallelMesh
from xdit_core.graphs import apply_cuda_graph, remove_cuda_graph
from xdit_core.hooks import get_hook

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))
from displaced import DisplacedSimulation  # a script of the benchmarks (the reference)

STEPS = 4
CACHE = DBCacheConfig(Fn_compute_blocks=1, max_warmup_steps=1)
LATENT, TEXT = (5, 5), 7  # 25 image tokens, 7 text tokens
GUIDANCE = 3.0


@dataclass(frozen=True)
class Case:
    mesh: tuple[int, int, int]  # ulysses, ring, batch
    text: str
    warmup: int
    cfg: str | None = None  # None, "branches" (two named calls per step) or "paired" (pair_cfg_calls)
    batch: int = 1
    exact: bool = False  # also compare with parallelize_flux on the same mesh

    @property
    def patches(self) -> int:
        return self.mesh[0] * self.mesh[1]


CASES = {
    2: [
        Case((2, 1, 1), "replicate", 2, exact=True),
        Case((2, 1, 1), "shard", 1, exact=True),
        Case((1, 2, 1), "replicate", 1),
        Case((1, 2, 1), "shard", 2, exact=True),
        Case((2, 1, 1), "replicate", 1, cfg="branches", exact=True),
        Case((1, 2, 1), "replicate", STEPS, exact=True),  # warm-up ≥ steps: the exact run
    ],
    3: [
        Case((3, 1, 1), "replicate", 1, exact=True),
        Case((1, 3, 1), "shard", 2),
        Case((3, 1, 1), "shard", 1, cfg="branches"),
    ],
    4: [
        Case((4, 1, 1), "shard", 2),
        Case((2, 2, 1), "replicate", 1, exact=True),
        Case((2, 1, 2), "replicate", 2, cfg="paired", exact=True),
        Case((1, 2, 2), "shard", 1, batch=2),
    ],
}


def case_inputs(case: Case) -> tuple[dict, dict]:
    """The call's inputs (at t = 1) and the negative prompt's embeddings."""
    inputs = flux_inputs(case.batch, *LATENT, TEXT, seed=5)
    negative = flux_inputs(case.batch, *LATENT, TEXT, seed=6)
    return inputs, {k: negative[k] for k in ("encoder_hidden_states", "pooled_projections")}


def predict(model, inputs: dict, x: torch.Tensor, t: torch.Tensor, **override) -> torch.Tensor:
    call = {**inputs, **override, "hidden_states": x, "timestep": t.expand(x.shape[0])}
    return model(**call, return_dict=False)[0]


def euler(step, x: torch.Tensor) -> list[torch.Tensor]:
    """Every step's output along an Euler run from t = 1 to 0; ``step(x, t)`` returns (velocity, output)."""
    ts = torch.linspace(1.0, 0.0, STEPS + 1)
    outputs = []
    for i in range(STEPS):
        velocity, out = step(x, ts[i])
        outputs.append(out)
        x = x + (ts[i + 1] - ts[i]) * velocity
    return outputs


def guided(cond: torch.Tensor, uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return uncond + GUIDANCE * (cond - uncond), torch.cat((cond, uncond))


def sample(model, case: Case) -> list[torch.Tensor]:
    """The run on ``model`` (the parallel or exact transformer): true CFG as the case says."""
    inputs, negative = case_inputs(case)

    def step(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if case.cfg is None:
            v = predict(model, inputs, x, t)
            return v, v
        if case.cfg == "paired":  # the pairing hook computes both on the batch axis
            return guided(predict(model, inputs, x, t), predict(model, inputs, x, t, **negative))
        with model.cache_context("cond"):
            cond = predict(model, inputs, x, t)
        with model.cache_context("uncond"):
            uncond = predict(model, inputs, x, t, **negative)
        return guided(cond, uncond)

    return euler(step, inputs["hidden_states"])


def simulate(case: Case) -> list[torch.Tensor]:
    """The single-process reference: one simulation per branch, each on its own copy of the model."""
    inputs, negative = case_inputs(case)
    sims = [DisplacedSimulation(tiny_transformer(), case.patches, case.warmup, case.text) for _ in range(2)]
    with torch.no_grad():
        if case.cfg is None:
            return euler(lambda x, t: (predict(sims[0], inputs, x, t),) * 2, inputs["hidden_states"])
        return euler(
            lambda x, t: guided(predict(sims[0], inputs, x, t), predict(sims[1], inputs, x, t, **negative)),
            inputs["hidden_states"],
        )


def displaced(model, mesh: ParallelMesh, case: Case) -> None:
    parallelize_flux_displaced(model, mesh, warmup_steps=case.warmup, text=case.text)
    _pair(model, case)


def _pair(model, case: Case) -> None:
    if case.cfg == "paired":
        inputs, negative = case_inputs(case)
        pair_cfg_calls(
            model, CfgPair(negative["encoder_hidden_states"], negative["pooled_projections"], inputs["txt_ids"])
        )


def _exchange_check() -> None:
    """StaleExchange on uneven chunks: each rank receives exactly the other ranks' k/v, in rank order."""
    group, world, rank = dist.group.WORLD, dist.get_world_size(), dist.get_rank()
    lengths = [2 * p + 1 for p in range(world)]  # 1, 3, 5, ...

    def chunk(p: int, step: int) -> torch.Tensor:
        return torch.full((2, lengths[p], 3, 4), float(100 * step + p))

    exchange = StaleExchange(group)
    exchange.send(chunk(rank, 0), -chunk(rank, 0), lengths)
    assert exchange.in_flight
    k, v = exchange.receive()
    want = torch.cat([chunk(p, 0) for p in range(world) if p != rank], dim=1)
    assert torch.equal(k, want) and torch.equal(v, -want) and not exchange.in_flight


def _worker(cases: list[Case], expected: list[list[torch.Tensor]]) -> list[str]:
    worker_setup()
    _exchange_check()
    model = tiny_transformer()
    meshes: dict[tuple[int, int, int], ParallelMesh] = {}
    report = []
    with torch.no_grad():
        for case, want in zip(cases, expected, strict=True):
            u, r, b = case.mesh
            if case.mesh not in meshes:  # building a mesh is collective: once each
                meshes[case.mesh] = ParallelMesh.build(ulysses=u, ring=r, batch=b)
            mesh = meshes[case.mesh]
            what = f"u{u}r{r}b{b} text={case.text} warm-up {case.warmup} cfg={case.cfg}"
            displaced(model, mesh, case)
            got = sample(model, case)
            worst = agreed_max(max(excess(g, w) for g, w in zip(got, want, strict=True)))
            assert worst <= 0, f"{what}: displaced parallel vs simulation, excess {worst:.2e}"
            again = sample(model, case)  # a new run: the timestep went up
            assert all(torch.equal(a, g) for a, g in zip(again, got, strict=True)), f"{what}: second run differs"
            unparallelize_flux_displaced(model)
            if case.exact:
                parallelize_flux(model, mesh, text=case.text)
                _pair(model, case)
                exact = sample(model, case)
                unparallelize_flux(model)
                warm = min(case.warmup, STEPS)
                same = all(torch.equal(g, e) for g, e in zip(got[:warm], exact[:warm], strict=True))
                assert agreed_max(0.0 if same else 1.0) == 0, f"{what}: warm-up steps differ from parallelize_flux"
                if case.warmup < STEPS:  # the first displaced step sees the same input as the exact step
                    moved = agreed_max((got[warm] - exact[warm]).abs().max().item())
                    assert moved > 1e-4, f"{what}: the displaced step equals the exact one ({moved:.1e})"
            report.append(what)
    return report


def _reset_errors_and_restore_worker() -> list[str]:
    """World 2: reset_flux_displaced mid-run, the bad inputs, and the model restored bit for bit."""
    worker_setup()
    model = tiny_transformer()
    mesh = ParallelMesh.build(ulysses=2)
    case = Case((2, 1, 1), "replicate", 1)
    inputs, _ = case_inputs(case)
    ts = torch.linspace(1.0, 0.0, STEPS + 1)
    with torch.no_grad():
        plain = [predict(model, inputs, inputs["hidden_states"], t) for t in ts[:3]]
        parallelize_flux(model, mesh, text="replicate")
        exact = [predict(model, inputs, inputs["hidden_states"], t) for t in ts[:3]]
        unparallelize_flux(model)
        parallelize_flux_displaced(model, mesh, warmup_steps=1)
        x = inputs["hidden_states"]
        assert torch.equal(predict(model, inputs, x, ts[0]), exact[0])  # warm-up
        assert not torch.equal(predict(model, inputs, x, ts[1]), exact[1])  # displaced
        reset_flux_displaced(model)
        assert torch.equal(predict(model, inputs, x, ts[2]), exact[2]), "after a reset: warm-up again"

        plain_mesh = ParallelMesh.build(ulysses=1, ring=1, batch=2)
        messages = expect_value_errors(
            {
                "warm-up 0": lambda: parallelize_flux_displaced(tiny_transformer(), mesh, warmup_steps=0),
                "warm-up float": lambda: parallelize_flux_displaced(tiny_transformer(), mesh, warmup_steps=1.5),
                "warm-up bool": lambda: parallelize_flux_displaced(tiny_transformer(), mesh, warmup_steps=True),
                "no sp ranks": lambda: parallelize_flux_displaced(tiny_transformer(), plain_mesh, warmup_steps=1),
                "bad text mode": lambda: parallelize_flux_displaced(
                    tiny_transformer(), mesh, warmup_steps=1, text="split"
                ),
                "twice": lambda: parallelize_flux_displaced(model, mesh, warmup_steps=1),
                "exact on displaced": lambda: parallelize_flux(model, mesh),
                "cuda graph": lambda: _graphed_call(model, inputs),
                "unnamed cfg calls": lambda: [predict(model, inputs, x, t) for t in (ts[0], ts[0], ts[1], ts[1])],
                "graph first": lambda: parallelize_flux_displaced(
                    apply_cuda_graph(tiny_transformer()), mesh, warmup_steps=1
                ),
                "not displaced": lambda: unparallelize_flux_displaced(parallelize_flux(tiny_transformer(), mesh)),
                "plain": lambda: reset_flux_displaced(tiny_transformer()),
                "cached, then displaced": lambda: parallelize_flux_displaced(
                    enable_cache(tiny_transformer(), CACHE), mesh, warmup_steps=1
                ),
                "displaced, then cached": lambda: enable_cache(model, CACHE),
            }
        )
        unparallelize_flux_displaced(model)
        again = [predict(model, inputs, inputs["hidden_states"], t) for t in ts[:3]]
        assert all(torch.equal(a, p) for a, p in zip(again, plain, strict=True)), "not restored bit for bit"
    with pytest.raises(ValueError):
        unparallelize_flux_displaced(model)
    _pipeline_call_drops_stale(mesh)
    return messages


def _pipeline_call_drops_stale(mesh: ParallelMesh) -> None:
    """The stale k/v belong to one pipeline call: ParallelFluxPipeline drops them when it returns."""
    pipe = tiny_flux_pipeline(seed=0)
    parallelize_flux_displaced(pipe.transformer, mesh, warmup_steps=1)
    state = get_hook(pipe.transformer, BOUNDARY_HOOK).state
    call = dict(prompt="a fox", height=32, width=32, num_inference_steps=3, output_type="pt")
    seen = []
    original = state.step.entered

    def entered(step):  # what a step holds while it runs
        seen.append(len(step.run.exchanges))
        return original(step)

    state.step.entered = entered
    ParallelFluxPipeline(pipe, mesh)(**call, generator=torch.Generator().manual_seed(0))
    assert seen[-1] > 0, "the displaced steps held no exchanges"
    assert not state.runs, "stale k/v held after the pipeline call"


def _graphed_call(model, inputs: dict) -> None:
    apply_cuda_graph(model)
    try:
        predict(model, inputs, inputs["hidden_states"], torch.tensor(0.5))
    finally:
        remove_cuda_graph(model)


def test_displaced_attention_is_attention_over_both_key_sets() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 5, 3, 8, generator=g) for _ in range(3))
    stale = (torch.randn(2, 9, 3, 8, generator=g), torch.randn(2, 9, 3, 8, generator=g))
    got = displaced_attention(q, k, v, stale)
    want = reference_attention(q, torch.cat((k, stale[0]), 1), torch.cat((v, stale[1]), 1), None)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(displaced_attention(q, k, v, None), reference_attention(q, k, v, None))


@pytest.mark.parametrize("world", sorted(CASES))
def test_displaced_matches_simulation_and_exact_warmup(world: int) -> None:
    expected = [simulate(case) for case in CASES[world]]
    reports = run_ranks(_worker, world, CASES[world], expected, timeout_s=300)
    assert len(reports[0]) == len(CASES[world]) and all(r == reports[0] for r in reports)


def test_displaced_reset_errors_and_restore() -> None:
    text = "\n".join(run_ranks(_reset_errors_and_restore_worker, 2, timeout_s=300)[0])
    for needle in (
        "warmup_steps must be an int of at least 1",
        "no sequence-parallel ranks",
        "text must be one of",
        "already parallel",
        "a CUDA graph cannot replay this mode",
        "two calls in a row at timestep 0.75",
        "not displaced-parallel (parallelize_flux made it exact",
        "not displaced-parallel",
        "step caching does not combine with the displaced mode",
        "the transformer runs the displaced (stale-KV, inexact) mode",
    ):
        assert needle in text, text
    assert text.count("warmup_steps must be") == 3, text
