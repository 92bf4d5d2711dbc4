"""Tensor parallelism for FLUX and STDiT3 (``parallelize_flux`` / ``parallelize_stdit`` on a mesh with a ``tp`` axis;
torch's ``parallelize_module``).

Tiny FLUX and tiny STDiT3 with 4 heads, float32, gloo: tp2, tp2×u2, tp2×r2, tp2×b2 and tp4 equal the plain model
within 1e-5 (odd token counts; FLUX: both text modes, at two text lengths; STDiT3: USP and DSP); backward at tp2×u2
for FLUX (the input's and the weights' gradients); each rank holds exactly its share of the split Linears'
parameters; unparallelizing restores the plain model bit for bit; whole FLUX blocks compile (``fullgraph=True``);
a step cache decides as on the plain model;
bad degrees and combinations are refused before any collective.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from dist_utils import excess, expect_value_errors, run_ranks, worker_setup
from test_flux import flux_inputs
from test_stdit import TINY, stdit_inputs, tiny_model
from torch.distributed.tensor import DTensor

from models import (
    parallelize_flux,
    parallelize_flux_displaced,
    parallelize_stdit,
    unparallelize_flux,
    unparallelize_stdit,
)
from models.caching import DBCacheConfig, cache_summary, enable_cache
from models.flux import flux_tp_degrees
from models.sharding import shard_weights
from models.stdit import STDiT3, stdit_tp_degrees
from models.tensor_parallel import parameter_bytes
from models.testing import TINY_FLUX_CONFIG, tiny_flux_transformer
from xdit_core import ParallelMesh

TP_FLUX = dict(
    TINY_FLUX_CONFIG, num_attention_heads=4, attention_head_dim=8, axes_dims_rope=(2, 4, 2), in_channels=8,
    joint_attention_dim=24, pooled_projection_dim=20,
)  # fmt: skip
MESHES = {2: [dict(tp=2)], 4: [dict(tp=2, ulysses=2), dict(tp=2, ring=2), dict(tp=2, batch=2), dict(tp=4)]}
COLWISE = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "ff.net.0.proj", "ff_context.net.0.proj")
COLWISE += ("proj_mlp", "attn.qkv", "q_linear", "kv_linear", "mlp.fc1")  # FLUX's, then STDiT3's
ROWWISE = ("to_out.0", "to_add_out", "ff.net.2", "ff_context.net.2", "proj_out", "attn.proj", "cross_attn.proj")
ROWWISE += ("mlp.fc2",)


def model() -> torch.nn.Module:
    return tiny_flux_transformer(0, **TP_FLUX)


def expected_bytes(plain: torch.nn.Module, tp: int) -> int:
    """Every parameter whole, but the split Linears' weights (and the column-split ones' biases) a tp-th."""
    total = 0
    for name, p in plain.named_parameters():
        module, _, kind = name.rpartition(".")
        in_block = "transformer_blocks." in name or "spatial_blocks." in name or "temporal_blocks." in name
        split = in_block and (
            (module.endswith(COLWISE) and kind in ("weight", "bias")) or (module.endswith(ROWWISE) and kind == "weight")
        )
        total += p.numel() * p.element_size() // (tp if split else 1)
    return total


def _cases(world: int) -> list[str]:
    done = []
    for degrees in MESHES[world]:
        mesh = ParallelMesh.build(**degrees)
        batch = 2 if mesh.batch_size > 1 else 1
        for text_mode, text_len in (("shard", 7), ("replicate", 10)):  # both modes, two text lengths
            m = model()
            inputs = flux_inputs(batch, 5, 3, text_len, seed=text_len)
            with torch.no_grad():
                want = m(**inputs).sample
                whole = expected_bytes(m, mesh.tp_size)
                parallelize_flux(m, mesh, text=text_mode)
                got = m(**inputs).sample
                held = parameter_bytes(m)
                unparallelize_flux(m)
                again = m(**inputs).sample
                twice = parallelize_flux(m, mesh, text=text_mode)(**inputs).sample  # once more, after the undo
                unparallelize_flux(m)
            what = f"{mesh.describe()} text={text_mode} T={text_len}"
            assert excess(got, want, atol=1e-5, rtol=1e-5) <= 0, f"{what}: differs from the plain model"
            assert torch.equal(again, want), f"{what}: unparallelize_flux did not restore the model"
            assert torch.equal(twice, got), f"{what}: parallel again after unparallelize_flux differs"
            assert held == whole, f"{what}: holds {held} bytes of parameters, expected {whole}"
            assert not any(isinstance(p, DTensor) for p in m.parameters())
            done.append(what)
        for spatial in ("usp", "dsp"):
            m = tiny_model()
            inputs = stdit_inputs(2, 4, 5, 7, seed=6)  # 4 frames: DSP deals whole frames to up to 4 ranks
            with torch.no_grad():
                want = m(**inputs)
                whole = expected_bytes(m, mesh.tp_size)
                parallelize_stdit(m, mesh, spatial=spatial)
                got = m(**inputs)
                held = parameter_bytes(m)
                unparallelize_stdit(m)
                again = m(**inputs)
            what = f"STDiT3 {mesh.describe()} {spatial}"
            assert excess(got, want, atol=1e-5, rtol=1e-5) <= 0, f"{what}: differs from the plain model"
            assert torch.equal(again, want), f"{what}: unparallelize_stdit did not restore the model"
            assert held == whole, f"{what}: holds {held} bytes of parameters, expected {whole}"
            done.append(what)
    return done


def _backward() -> str:
    """tp2×u2: the input's gradient and every weight's equal the plain model's: a weight's gradient is this rank's
    part of a sum over its tokens (summed over the sequence-parallel ranks here), gathered over tp when split,
    and for the QK-norms, which each rank applies to its own heads, also summed over the tp ranks."""
    mesh = ParallelMesh.build(tp=2, ulysses=2)
    plain, parallel = model(), model()
    inputs = flux_inputs(1, 5, 3, 7, seed=4)
    x = inputs.pop("hidden_states")
    grads = []
    for m in (plain, parallel):
        if m is parallel:
            parallelize_flux(m, mesh)
        xi = x.clone().requires_grad_()
        m(hidden_states=xi, **inputs).sample.square().sum().backward()
        grads.append({"input": xi.grad, **{n: p.grad for n, p in m.named_parameters()}})
    worst = 0.0
    for name, want in grads[0].items():
        got = grads[1][name]
        got = got.full_tensor() if isinstance(got, DTensor) else got.clone()
        if name != "input":
            dist.all_reduce(got, group=mesh.sp_group)
        if ".norm_q." in name or ".norm_k." in name or ".norm_added_" in name:  # applied to this rank's heads only
            dist.all_reduce(got, group=mesh.tp_group)
        if name.endswith("proj_out.weight") and "single" in name:
            continue  # its input columns are stored permuted (rank t's share contiguous): checked through the rest
        worst = max(worst, excess(got, want, atol=1e-5, rtol=1e-4))
    assert worst <= 0, f"gradients differ by {worst:.2e} beyond tolerance"
    return "backward tp2×u2"


def _compiled() -> str:
    """tp2×u1: every block compiled whole (``fullgraph=True``, aot_eager) equals the eager tensor-parallel model."""
    mesh = ParallelMesh.build(tp=2)
    m = parallelize_flux(model(), mesh)
    inputs = flux_inputs(1, 5, 3, 7, seed=5)
    with torch.no_grad():
        want = m(**inputs).sample
        for block in (*m.transformer_blocks, *m.single_transformer_blocks):
            block.compile(fullgraph=True, backend="aot_eager")
        got = m(**inputs).sample
    assert excess(got, want, atol=1e-6, rtol=0) <= 0, "compiled tensor-parallel blocks differ from eager"
    return "compiled tp2"


def _cached() -> str:
    """tp2 with a step cache: the same decisions and, within 1e-5, the same samples as the cached plain model."""
    mesh = ParallelMesh.build(tp=2)
    inputs = flux_inputs(1, 5, 3, 7, seed=8)

    def sample(m: torch.nn.Module) -> torch.Tensor:
        x, ts = inputs["hidden_states"], torch.linspace(1.0, 0.0, 7)
        with torch.no_grad():
            for i in range(6):
                x = x + (ts[i + 1] - ts[i]) * m(**{**inputs, "hidden_states": x, "timestep": ts[i].expand(1)}).sample
        return x

    def cached(m: torch.nn.Module, threshold: float) -> tuple[torch.Tensor, list]:
        config = DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=1, max_warmup_steps=1)
        enable_cache(m, dataclasses.replace(config, residual_diff_threshold=threshold))
        out, summary = sample(m), cache_summary(m)
        steps = [r for branch in summary["branches"].values() for r in branch]
        return out, steps

    for threshold in (0.05, 0.1, 0.2, 0.3, 0.5):  # one that both reuses and computes, far from every measurement
        want, steps = cached(model(), threshold)
        margin = min((abs(r["diff"] - threshold) / threshold for r in steps if r["diff"] is not None), default=1.0)
        if any(not r["computed"] for r in steps) and any(r["computed"] for r in steps[1:]) and margin > 1e-3:
            break
    else:
        raise AssertionError("no threshold both reuses and computes")
    got, tp_steps = cached(parallelize_flux(model(), mesh), threshold)
    assert [r["computed"] for r in tp_steps] == [r["computed"] for r in steps], "the cache decided differently"
    assert excess(got, want, atol=1e-5, rtol=1e-5) <= 0, "cached tensor-parallel sample differs"
    return "cached tp2"


def _errors() -> list[str]:
    mesh = ParallelMesh.build(tp=2)
    odd = tiny_flux_transformer(0)  # 3 heads: tp 2 does not divide them

    def unexpected() -> None:
        m = model()
        m.transformer_blocks[0].attn.to_q = torch.nn.Identity()
        parallelize_flux(m, mesh)

    def sharded_tp() -> None:
        shard_weights(parallelize_flux(model(), mesh), mesh, axis="world")

    return expect_value_errors(
        {
            "heads": lambda: parallelize_flux(odd, mesh),
            "unexpected layer": unexpected,
            "stdit heads": lambda: parallelize_stdit(STDiT3(dataclasses.replace(TINY, num_heads=1)), mesh),
            "displaced": lambda: parallelize_flux_displaced(model(), mesh, warmup_steps=1),
            "sharded": sharded_tp,
        }
    )


def _worker(world: int) -> dict:
    worker_setup()
    report = {"cases": _cases(world)}
    if world == 4:
        report["backward"] = _backward()
    else:
        report["errors"] = _errors()
        report["compiled"] = _compiled()
        report["cached"] = _cached()
    return report


def test_flux_tensor_parallel_equals_plain_model() -> None:
    assert flux_tp_degrees(model()) == [1, 2, 4] and flux_tp_degrees(tiny_flux_transformer(0)) == [1, 3]
    assert stdit_tp_degrees(tiny_model()) == [1, 2, 4]
    for world in (2, 4):
        reports = run_ranks(_worker, world, world, timeout_s=600)
        assert len(reports[0]["cases"]) == 4 * len(MESHES[world])  # 2 FLUX text cases + USP and DSP per mesh
        if world == 2:
            text = "\n".join(reports[0]["errors"])
            for needle in (
                "does not divide this FLUX's 3 heads and MLP widths; valid degrees: [1, 3]",
                "transformer_blocks.0.attn.to_q must be a torch.nn.Linear to split, found Identity",
                "does not divide this STDiT3's 1 heads and MLP widths; valid degrees: [1]",
                "tensor parallelism (mesh u1×r1×t2) does not combine with this mode",
                "the model is tensor-parallel",
            ):
                assert needle in text, (needle, text)
