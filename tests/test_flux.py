"""parallelize_flux against the plain diffusers FLUX transformer: every mesh, both text modes, odd shapes.

One spawn per world size; in it a tiny random FluxTransformer2DModel (float32, 3 heads) runs each
case first plain, then parallel, then plain again after unparallelize_flux.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from diffusers import FluxTransformer2DModel
from dist_utils import agreed_max, excess, expect_value_errors, run_ranks, worker_setup

from models import parallelize_flux, unparallelize_flux
from models.flux import CfgPair, pair_cfg_calls
from models.testing import TINY_FLUX_CONFIG, tiny_flux_transformer
from xdit_core import ParallelMesh

# odd channel counts, and 3 heads: they divide no ulysses degree above 1 but 3
TINY = dict(TINY_FLUX_CONFIG, in_channels=8, joint_attention_dim=24, pooled_projection_dim=20)

# world size -> meshes (ulysses, ring, batch)
MESHES = {
    2: [(2, 1, 1), (1, 2, 1), (1, 1, 2)],
    3: [(3, 1, 1), (1, 3, 1)],
    4: [(4, 1, 1), (2, 2, 1), (1, 4, 1), (2, 1, 2)],
}


def tiny_transformer(seed: int = 0) -> FluxTransformer2DModel:
    return tiny_flux_transformer(seed, **TINY)


def flux_inputs(batch: int, height: int, width: int, text: int, seed: int) -> dict[str, torch.Tensor]:
    """Inputs as FluxPipeline builds them, for a ``height × width`` grid of packed latents."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(height, width, 3)
    ids[..., 1] += torch.arange(height)[:, None]
    ids[..., 2] += torch.arange(width)[None, :]
    return dict(
        hidden_states=torch.randn(batch, height * width, TINY["in_channels"], generator=g),
        encoder_hidden_states=torch.randn(batch, text, TINY["joint_attention_dim"], generator=g),
        pooled_projections=torch.randn(batch, TINY["pooled_projection_dim"], generator=g),
        timestep=torch.rand(batch, generator=g),
        guidance=torch.full((batch,), 3.5),
        img_ids=ids.flatten(0, 1),
        txt_ids=torch.zeros(text, 3),
    )


# (batch, latent height, latent width, text tokens): odd grids, primes, text shorter than the mesh
SHAPES = [(1, 5, 7, 11), (2, 4, 4, 6), (1, 3, 3, 2), (3, 7, 3, 13)]


def _negative(neg: dict) -> dict:
    return {"encoder_hidden_states": neg["encoder_hidden_states"], "pooled_projections": neg["pooled_projections"]}


def _flux_worker(meshes: list[tuple[int, int, int]]) -> list[str]:
    worker_setup()
    model = tiny_transformer()
    report = []
    with torch.no_grad():
        for u, r, b in meshes:
            mesh = ParallelMesh.build(ulysses=u, ring=r, batch=b)
            for shape_index, (batch, h, w, t) in enumerate(SHAPES):
                if batch < b:
                    continue
                inputs = flux_inputs(batch, h, w, t, seed=shape_index)
                expected = model(**inputs, return_dict=False)[0]
                for text in ("shard", "replicate"):
                    parallelize_flux(model, mesh, text=text)
                    got = model(**inputs).sample
                    unparallelize_flux(model)
                    worst = agreed_max(excess(got, expected))
                    assert worst <= 0, f"mesh u{u}r{r}b{b} shape {(batch, h, w, t)} text={text}: excess {worst:.2e}"
                    report.append(f"u{u}r{r}b{b} {batch}x{h}x{w}+{t} {text}")
                again = model(**inputs, return_dict=False)[0]
                assert torch.equal(again, expected), "unparallelize_flux must restore the original outputs"
    return report


def _cfg_and_errors_worker() -> list[str]:
    """True-CFG pairing on the batch axis, gradients, and the errors (world 2)."""
    worker_setup()
    model = tiny_transformer()
    mesh = ParallelMesh.build(ulysses=1, ring=1, batch=2)
    cond = flux_inputs(1, 4, 5, 7, seed=1)
    neg = flux_inputs(1, 4, 5, 7, seed=2)
    with torch.no_grad():
        want_cond = model(**cond).sample
        want_uncond = model(
            **{
                **cond,
                "encoder_hidden_states": neg["encoder_hidden_states"],
                "pooled_projections": neg["pooled_projections"],
            }
        ).sample
        parallelize_flux(model, mesh)
        pair_cfg_calls(model, CfgPair(neg["encoder_hidden_states"], neg["pooled_projections"], neg["txt_ids"]))
        for _ in range(2):  # two denoising steps' worth of pairs
            got_cond = model(**cond).sample
            got_uncond = model(
                **{
                    **cond,
                    "encoder_hidden_states": neg["encoder_hidden_states"],
                    "pooled_projections": neg["pooled_projections"],
                }
            ).sample
            assert agreed_max(max(excess(got_cond, want_cond), excess(got_uncond, want_uncond))) <= 0
        # the uncond call may get a copy of the latents (paired by value, not by object identity) ...
        model(**cond)
        copied = {**cond, "hidden_states": cond["hidden_states"].clone(), **_negative(neg)}
        assert agreed_max(excess(model(**copied).sample, want_uncond)) <= 0
        # ... but not other latents
        model(**cond)
        other = {**cond, "hidden_states": cond["hidden_states"] + 1, **_negative(neg)}
        try:
            model(**other)
        except RuntimeError as e:
            assert "uncond call on the same latents" in str(e)
        else:
            raise AssertionError("true-CFG pairing accepted the uncond call on other latents")
        pair_cfg_calls(model, None)
        unparallelize_flux(model)

    # gradients through the parallel model equal the plain model's (ulysses 2 on the same world)
    mesh2 = ParallelMesh.build(ulysses=2)
    inputs = flux_inputs(1, 3, 5, 4, seed=3)
    inputs["hidden_states"].requires_grad_(True)
    model(**inputs).sample.square().sum().backward()
    want_grad = inputs["hidden_states"].grad.clone()
    want_w = model.transformer_blocks[0].attn.to_q.weight.grad.clone()
    model.zero_grad()
    inputs["hidden_states"].grad = None
    parallelize_flux(model, mesh2)
    model(**inputs).sample.square().sum().backward()
    # the gathered output's gradient reaches each rank as its own chunk: the input gradient comes back whole
    # on every rank (shard's backward gathers it), weight gradients are this rank's part of a sum over ranks
    w = model.transformer_blocks[0].attn.to_q.weight.grad.clone()
    dist.all_reduce(w)
    assert agreed_max(excess(inputs["hidden_states"].grad, want_grad, atol=1e-4, rtol=1e-4)) <= 0
    assert agreed_max(excess(w, want_w, atol=1e-4, rtol=1e-4)) <= 0

    with torch.no_grad():
        small = flux_inputs(1, 1, 1, 3, seed=4)
        single_attn = model.single_transformer_blocks[0].attn
        messages = expect_value_errors(
            {
                "twice": lambda: parallelize_flux(model, mesh2),
                "too few image tokens": lambda: model(**small),
                "batch smaller than the batch axis": lambda: _call_on(model, mesh, cond),
                "bad text mode": lambda: parallelize_flux(tiny_transformer(), mesh2, text="split"),
                "not flux": lambda: parallelize_flux(torch.nn.Linear(2, 2), mesh2),
                "ids mismatch": lambda: model(**{**cond, "img_ids": cond["img_ids"][:-1]}),
                "ip-adapter": lambda: model(
                    **cond, joint_attention_kwargs={"ip_adapter_image_embeds": [cond["txt_ids"]]}
                ),
                "attention on its own": lambda: single_attn(
                    hidden_states=torch.ones(1, 4, single_attn.to_q.in_features)
                ),
            }
        )
    unparallelize_flux(model)
    with pytest.raises(ValueError):
        unparallelize_flux(model)
    return messages


def _call_on(model: FluxTransformer2DModel, mesh: ParallelMesh, inputs: dict[str, torch.Tensor]) -> None:
    unparallelize_flux(model)
    parallelize_flux(model, mesh)
    try:
        model(**inputs)
    finally:
        unparallelize_flux(model)
        parallelize_flux(model, ParallelMesh.build(ulysses=2))


@pytest.mark.parametrize("world", sorted(MESHES))
def test_parallel_flux_matches_plain_model(world: int) -> None:
    reports = run_ranks(_flux_worker, world, MESHES[world], timeout_s=600)
    assert reports[0] and all(r == reports[0] for r in reports)


def test_flux_cfg_pairs_gradients_and_errors() -> None:
    messages = run_ranks(_cfg_and_errors_worker, 2)[0]
    text = "\n".join(messages)
    for needle in (
        "already parallel",
        "image tokens",
        "batch of 1",
        "text must be one of",
        "FluxTransformer2DModel",
        "img_ids has",
        "IP-Adapter inputs are not supported",
        "no parallel call in progress",
    ):
        assert needle in text, text
