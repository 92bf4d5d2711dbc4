"""Step caching (``models.caching``): a cached parallel run equals the cached single-process run.

For each policy (DBCache F1B1, first-block cache with a cap on consecutive reuse, TaylorSeer order 2,
a static step mask), the parent runs the single-process reference: the tiny FLUX pipeline with true
CFG (cond and uncond as two named calls) and the Open-Sora sampler on a tiny 4-pair STDiT3 (the CFG
pair as one batch of 2), each a whole multi-step run on odd token counts. For the policies with a
threshold it picks one that reuses some steps and computes others, with a margin to every measured
change. Then spawns of 2, 3 and 4 gloo ranks run the same with the model parallel on u2, r2, b2 (FLUX:
true CFG paired on the batch axis; STDiT3: the pair split there), u3, u2×r2 and b2×u2: the outputs
equal the reference within 1e-5 and every rank's sequence of decisions equals the reference's. The
ranks' own un-reduced measurements would have decided otherwise on some steps (so the reduction is
what makes it exact). ``disable_cache`` restores the bit-identical model; a second pipeline call
starts afresh.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.distributed as dist
from diffusers import FluxPipeline
from dist_utils import agreed_max, run_ranks, worker_setup
from test_stdit import TINY, tiny_model

from models import parallelize_flux_pipeline, unparallelize_flux_pipeline
from models.caching import (
    DBCacheConfig,
    cache_summary,
    disable_cache,
    enable_cache,
    first_block_cache,
    static_step_mask,
    steps_mask,
)
from models.stdit import STDiT3, parallelize_stdit, rflow_sample, unparallelize_stdit
from models.testing import tiny_flux_pipeline
from xdit_core import ParallelMesh

STEPS = 6
FLUX_CALL = dict(
    prompt=["a red cat"], negative_prompt=["blurry"], true_cfg_scale=4.0, height=48, width=112,  # 3×7 = 21 tokens
    num_inference_steps=STEPS, guidance_scale=3.5, max_sequence_length=24, output_type="latent",
)  # fmt: skip
STDIT_CONFIG = dataclasses.replace(TINY, depth=4)
STDIT_LATENT = (3, 6, 10)  # frames, rows, columns: 3×5 = 15 positions per frame
CANDIDATES = {"flux": (0.3, 0.25, 0.35, 0.2, 0.45), "stdit": (0.21, 0.19, 0.23, 0.17, 0.26)}  # tried in order
MESHES = {2: [(2, 1, 1), (1, 2, 1), (1, 1, 2)], 3: [(3, 1, 1)], 4: [(2, 2, 1), (2, 1, 2)]}


def policy(name: str, threshold: float) -> DBCacheConfig:
    if name == "dbcache":
        return DBCacheConfig(
            Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=1, residual_diff_threshold=threshold
        )
    if name == "fbcache":
        return first_block_cache(threshold, max_warmup_steps=1, max_continuous_cached_steps=2)
    if name == "taylorseer":
        return DBCacheConfig(
            Fn_compute_blocks=1, max_warmup_steps=1, enable_taylorseer=True, taylorseer_order=2,
            residual_diff_threshold=threshold,
        )  # fmt: skip
    return static_step_mask([1, 1, 0, 1, 0, 1])


POLICIES = ("dbcache", "fbcache", "taylorseer", "static")


def stdit_model() -> STDiT3:
    return tiny_model(5, STDIT_CONFIG)


def run_stdit(model: STDiT3) -> torch.Tensor:
    g = torch.Generator().manual_seed(11)
    frames, h, w = STDIT_LATENT
    z = torch.randn(1, STDIT_CONFIG.in_channels, frames, h, w, generator=g)
    y = torch.randn(1, 1, STDIT_CONFIG.model_max_length, STDIT_CONFIG.caption_channels, generator=g)
    mask = torch.ones(1, STDIT_CONFIG.model_max_length, dtype=torch.bool)
    with torch.no_grad():
        return rflow_sample(model, z, y, mask, num_frames=9, height=h * 8, width=w * 8, steps=STEPS, cfg_scale=5.0)


def run_flux(pipe) -> torch.Tensor:
    return pipe(**FLUX_CALL, generator=torch.Generator().manual_seed(7)).images


def decisions(summary: dict) -> list[tuple[str, int, int, bool]]:
    return [(b, r["run"], r["step"], r["computed"]) for b, steps in sorted(summary["branches"].items()) for r in steps]


def _reference(target, run, model: str, name: str) -> dict:
    """The single-process cached run of ``name``, with a threshold that both reuses and computes."""
    for threshold in CANDIDATES[model] if name != "static" else (0.0,):
        enable_cache(target, policy(name, threshold))
        out = run(target)
        summary = cache_summary(target)
        disable_cache(target)
        measured = [r for steps in summary["branches"].values() for r in steps if r["diff"] is not None]
        reused = [r for steps in summary["branches"].values() for r in steps if not r["computed"]]
        computed_later = [r for steps in summary["branches"].values() for r in steps[1:] if r["computed"]]
        margin = min((abs(r["diff"] - threshold) / threshold for r in measured), default=1.0)
        if reused and computed_later and margin > 1e-3 and (name == "static" or measured):
            return {"threshold": threshold, "out": out, "decisions": decisions(summary)}
    raise AssertionError(f"no threshold in {CANDIDATES[model]} both reuses and computes for {model} {name}")


def _worker(folder: str, meshes: list, references: dict) -> dict:
    worker_setup()
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    model = stdit_model()
    report = {"max_err": 0.0, "cases": 0, "disagreements": 0}
    for i, (u, r, b) in enumerate(meshes):
        mesh = ParallelMesh.build(ulysses=u, ring=r, batch=b)
        for j, name in enumerate(POLICIES):  # every policy on every mesh, on one model or the other
            before = (i + j) // 2 % 2 == 0  # the cache enabled before or after parallelizing
            if (i + j) % 2 == 0:
                config = policy(name, references["flux", name]["threshold"])
                enable_cache(pipe, config) if before else None
                parallel = parallelize_flux_pipeline(pipe, mesh)
                enable_cache(parallel, config) if not before else None
                out, summary = run_flux(parallel), cache_summary(parallel)
                report = _compare(report, f"FLUX u{u}r{r}b{b} {name}", out, summary, references["flux", name])
                disable_cache(parallel)
                unparallelize_flux_pipeline(parallel)
            else:
                config = policy(name, references["stdit", name]["threshold"])
                enable_cache(model, config) if before else None
                parallelize_stdit(model, mesh)
                enable_cache(model, config) if not before else None
                out, summary = run_stdit(model), cache_summary(model)
                report = _compare(report, f"STDiT3 u{u}r{r}b{b} {name}", out, summary, references["stdit", name])
                disable_cache(model)
                unparallelize_stdit(model)
    if dist.get_world_size() == 2:
        mesh = ParallelMesh.build(ulysses=2)
        parallel = parallelize_flux_pipeline(pipe, mesh)
        report["disagreements"] += _divergence(
            parallel, run_flux, FluxPipeline.from_pretrained(pipe.config._name_or_path)
        )
        unparallelize_flux_pipeline(parallel)
        reference = stdit_model()
        report["disagreements"] += _divergence(parallelize_stdit(model, mesh), run_stdit, reference)
        unparallelize_stdit(model)
    return report


def _divergence(parallel, run, single) -> int:
    """A threshold between the ranks' own measurements of the first measured step: un-reduced, the ranks
    would decide differently there (and the next collective would hang); reduced, they agree with one
    process. Returns how many (rank, step) decisions the ranks alone would have taken otherwise."""
    enable_cache(parallel, policy("dbcache", 1e-9))  # measures every step after warm-up, reuses none
    run(parallel)
    probe = cache_summary(parallel)["branches"]
    disable_cache(parallel)
    first = sorted(probe)[0]
    mine = probe[first][1]  # step 1: after the warm-up step, the same under any threshold
    views: list = [None] * dist.get_world_size()
    dist.all_gather_object(views, mine["local_diff"])
    low, high, reduced = min(views), max(views), mine["diff"]
    assert low < reduced < high, (views, reduced)  # the reduced change is the ranks' mediant
    threshold = (reduced + high) / 2 if high - reduced > reduced - low else (low + reduced) / 2
    enable_cache(parallel, policy("dbcache", threshold))
    got = run(parallel)
    summary = cache_summary(parallel)
    disable_cache(parallel)
    enable_cache(single, policy("dbcache", threshold))
    want = run(single)
    expected = decisions(cache_summary(single))
    disable_cache(single)
    assert agreed_max((got - want).abs().max().item()) <= 1e-5
    assert decisions(summary) == expected
    count = 0
    for steps in summary["branches"].values():
        for r in steps:
            if r["local_diff"] is not None and (r["local_diff"] < threshold) != (r["diff"] < threshold):
                count += 1
    return count


def _compare(report: dict, what: str, out: torch.Tensor, summary: dict, reference: dict) -> dict:
    err = agreed_max((out - reference["out"]).abs().max().item())
    assert err <= 1e-5, f"{what}: cached parallel vs cached single process {err:.2e}"
    got = decisions(summary)
    assert got == reference["decisions"], f"{what} on rank {dist.get_rank()}: {got} != {reference['decisions']}"
    report["max_err"] = max(report["max_err"], err)
    report["cases"] += 1
    return report


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> tuple[str, dict]:
    folder = str(tmp_path_factory.mktemp("tiny_flux"))
    tiny_flux_pipeline(seed=4).save_pretrained(folder, safe_serialization=True)
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    model = stdit_model()
    refs = {}
    for name in POLICIES:
        refs["flux", name] = _reference(pipe, run_flux, "flux", name)
        refs["stdit", name] = _reference(model, run_stdit, "stdit", name)
    return folder, refs


@pytest.mark.parametrize("world", sorted(MESHES))
def test_cached_parallel_equals_cached_single_process(references, world: int) -> None:
    folder, refs = references
    reports = run_ranks(_worker, world, folder, MESHES[world], refs, timeout_s=900)
    assert all(r["cases"] == len(POLICIES) * len(MESHES[world]) for r in reports)
    if world == 2:  # FLUX and STDiT3 on u2: some rank alone would have decided otherwise on some step
        assert sum(r["disagreements"] for r in reports) >= 2, reports


def test_reference_runs_reuse_and_compute(references) -> None:
    _, refs = references
    for (model, name), ref in refs.items():
        computed = [d[3] for d in ref["decisions"]]
        assert any(computed) and not all(computed), (model, name, ref["decisions"])
    branches = {d[0] for d in refs["flux", "dbcache"]["decisions"]}
    assert branches == {"cond", "uncond"}  # FluxPipeline names its true-CFG calls


def test_disable_restores_and_each_call_starts_afresh(references) -> None:
    folder, refs = references
    pipe = FluxPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    plain = run_flux(pipe)
    enable_cache(pipe, policy("dbcache", refs["flux", "dbcache"]["threshold"]))
    first, second = run_flux(pipe), run_flux(pipe)
    summary = cache_summary(pipe)
    assert torch.equal(first, second)  # the second call reused nothing of the first
    runs = {d[1] for d in decisions(summary)}
    assert runs == {0, 1}
    by_run = [[d[2:] for d in decisions(summary) if d[1] == run] for run in (0, 1)]
    assert by_run[0] == by_run[1]
    disable_cache(pipe)
    assert torch.equal(run_flux(pipe), plain)
    model = stdit_model()
    plain = run_stdit(model)
    enable_cache(model, policy("static", 0))
    assert not torch.equal(run_stdit(model), plain)
    disable_cache(model)
    assert torch.equal(run_stdit(model), plain)


def test_bad_settings_are_refused() -> None:
    cases = {
        "negative threshold": lambda: DBCacheConfig(residual_diff_threshold=-0.1),
        "order 0": lambda: DBCacheConfig(enable_taylorseer=True, taylorseer_order=0),
        "Fn negative": lambda: DBCacheConfig(Fn_compute_blocks=-1),
        "Fn 0 dynamic": lambda: DBCacheConfig(Fn_compute_blocks=0),
        "bad mask": lambda: DBCacheConfig(steps_computation_mask=(1, 2)),
        "bad policy": lambda: DBCacheConfig(steps_computation_policy="sometimes"),
        "max_cached_steps": lambda: DBCacheConfig(max_cached_steps=-2),
        "named mask": lambda: steps_mask("turbo"),
        "Fn + Bn too many": lambda: enable_cache(
            stdit_model(), DBCacheConfig(Fn_compute_blocks=3, Bn_compute_blocks=1)
        ),
        "not a model": lambda: enable_cache(torch.nn.Linear(2, 2), DBCacheConfig()),
        "not a config": lambda: enable_cache(stdit_model(), {"Fn_compute_blocks": 1}),
    }
    for name, case in cases.items():
        with pytest.raises(ValueError):
            case()
        print(name, "refused")
    with pytest.raises(TypeError, match="unexpected keyword"):
        DBCacheConfig(Fn_blocks=1)
    model = stdit_model()
    enable_cache(model, DBCacheConfig(Fn_compute_blocks=1))
    with pytest.raises(ValueError, match="already has a step cache"):
        enable_cache(model, DBCacheConfig(Fn_compute_blocks=1))
    disable_cache(model)
    with pytest.raises(ValueError, match="no step cache"):
        disable_cache(model)
    pipe = tiny_flux_pipeline(seed=0)
    enable_cache(pipe, DBCacheConfig(Fn_compute_blocks=1))
    samples = [torch.zeros(1, 60, 8)]
    with pytest.raises(ValueError, match="controlnet_block_samples is not supported"):
        pipe.transformer(
            hidden_states=torch.zeros(1, 60, 8), encoder_hidden_states=torch.zeros(1, 5, 24),
            pooled_projections=torch.zeros(1, 20), timestep=torch.ones(1), guidance=torch.ones(1),
            img_ids=torch.zeros(60, 3), txt_ids=torch.zeros(5, 3), controlnet_block_samples=samples,
        )  # fmt: skip


def test_named_masks() -> None:
    assert sum(steps_mask("medium", 28)) == 15 and sum(steps_mask("fast", 28)) == 11
    assert sum(steps_mask("slow", 28)) == 18 and sum(steps_mask("ultra", 28)) == 8
    for policy_name in ("slow", "medium", "fast", "ultra"):
        for n in (8, 20, 28, 50):
            mask = steps_mask(policy_name, n)
            assert len(mask) == n and mask[-1] == 1 and mask[0] == 1
    assert static_step_mask("fast").steps_computation_mask == tuple(steps_mask("fast", 28))
