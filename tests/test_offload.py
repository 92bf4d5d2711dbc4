"""CPU offload (``models.offload``) on the parallel FLUX and Open-Sora pipelines, on 2 and 4 gloo ranks.

Each mode (model, layerwise, sequential; onload device = the CPU here, so ``sequential``, whose
weights wait on the meta device, is the one that would fail loudly if a layer computed without its
weights) on u2, b2 and b2×u2 meshes, offloaded before or after parallelizing, gives the outputs of
the same parallel pipeline kept resident (within 1e-5; ranks > 0 hold no text encoders). With a step
cache as well, the hooks nest as they must: accelerate's offload outermost, then the parallel
boundary, then the cache. Bad combinations raise before anything moves.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.distributed as dist
from dist_utils import agreed_max, expect_value_errors, run_ranks, worker_setup
from test_flux import flux_inputs, tiny_transformer
from test_sharding import _steps

from models import parallelize_flux, parallelize_flux_pipeline
from models.caching import cache_summary, enable_cache, static_step_mask
from models.flux.pipeline import TEXT_COMPONENTS
from models.offload import MODES, Offload, has_block_list, offload_components
from models.sharding import shard_weights
from models.stdit.pipeline import parallelize_opensora
from models.testing import tiny_flux_pipeline, tiny_opensora_pipeline
from xdit_core import ParallelMesh
from xdit_core.graphs import apply_cuda_graph
from xdit_core.hooks import Hook, hook_names, install_hook


class Count(Hook):
    """Counts the calls that reach the seam's chain on the transformer (the parallel boundary's chain)."""

    def __init__(self) -> None:
        self.calls = 0

    def pre(self, module, args, kwargs):
        self.calls += 1
        return args, kwargs


MESHES = {2: [(2, 1), (1, 2)], 4: [(2, 2)]}  # (ulysses, batch)
FLUX_CALL = dict(height=40, width=24, num_inference_steps=3, guidance_scale=3.5, max_sequence_length=24)
VIDEO_CALL = dict(height=64, width=96, num_frames=20, steps=3)


def _flux_pipe():
    pipe = tiny_flux_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    if dist.get_rank() != 0:  # only rank 0 encodes text
        for name in TEXT_COMPONENTS:
            setattr(pipe, name, None)
    return pipe


def _flux_images(parallel, cfg: bool) -> np.ndarray:
    extra = dict(negative_prompt=["blurry"], true_cfg_scale=4.0) if cfg else {}
    out = parallel(["a red cat"], generator=torch.Generator().manual_seed(7), output_type="np", **FLUX_CALL, **extra)
    return out.images


def _offload_flux(parallel, mode: str) -> None:
    if mode == "model":
        parallel.enable_model_cpu_offload(device="cpu")
    elif mode == "layerwise":
        parallel.enable_group_offload("cpu", num_blocks_per_group=1)
    else:
        parallel.enable_sequential_cpu_offload(device="cpu")


def _opensora_pipe():
    pipe = tiny_opensora_pipeline(seed=0)
    return pipe if dist.get_rank() == 0 else dataclasses.replace(pipe, text_encoder=None)


def _pipeline_cases(world: int) -> list[str]:
    done = []
    for u, b in MESHES[world]:
        mesh = ParallelMesh.build(ulysses=u, batch=b)
        cfg = b > 1
        want = _flux_images(parallelize_flux_pipeline(_flux_pipe(), mesh), cfg)
        want_video = parallelize_opensora(_opensora_pipe(), mesh)("A cat playing piano.", **VIDEO_CALL)
        for i, (mode, first) in enumerate(
            [("model", "offload"), ("model", "parallel"), *((m, "parallel") for m in MODES[1:])]
        ):
            if first == "offload":  # diffusers' own method on the stock pipeline, then parallelized
                pipe = _flux_pipe()
                pipe.enable_model_cpu_offload(device="cpu")
                parallel = parallelize_flux_pipeline(pipe, mesh)
            else:
                parallel = parallelize_flux_pipeline(_flux_pipe(), mesh)
                _offload_flux(parallel, mode)
            if i % 2:  # Open-Sora: offloaded, then parallelized; or the other way round
                video_pipe = parallelize_opensora(_opensora_pipe().enable_offload(mode, device="cpu"), mesh)
            else:
                video_pipe = parallelize_opensora(_opensora_pipe(), mesh).enable_offload(mode, device="cpu")
            count = Count()
            install_hook(parallel.transformer, "test.count", count)
            for call in range(2):  # the second call runs on the hooks as the first call left them
                count.calls = 0
                err = agreed_max(float(np.abs(_flux_images(parallel, cfg) - want).max()))
                assert err <= 1e-5, f"FLUX {mode} u{u}b{b} call {call}: {err:.2e}"
                assert count.calls == FLUX_CALL["num_inference_steps"] * (1 if b > 1 or not cfg else 2), count.calls
            out = video_pipe("A cat playing piano.", **VIDEO_CALL)
            err = agreed_max(
                max(
                    (a - w).abs().max().item()
                    for a, w in ((out.latents, want_video.latents), (out.video, want_video.video))
                )
            )
            assert err <= 1e-5, f"Open-Sora {mode} u{u}b{b}: {err:.2e}"
            done.append(f"{mode} ({first} first) u{u}b{b}")
    return done


def _composition_and_errors() -> list[str]:
    """Offload + parallel + step cache on FLUX's transformer: nesting and outputs; then the refusals."""
    mesh = ParallelMesh.build(ulysses=dist.get_world_size())
    config = static_step_mask([1, 0, 1, 0])
    inputs = flux_inputs(1, 5, 3, 7, seed=9)
    resident = enable_cache(parallelize_flux(tiny_transformer(), mesh), config)
    with torch.no_grad():
        want = _steps(resident, inputs)
    from accelerate import cpu_offload_with_hook

    model = tiny_transformer()
    cpu_offload_with_hook(model, "cpu")  # what enable_model_cpu_offload puts on the transformer, installed first
    enable_cache(parallelize_flux(model, mesh), config)
    chain = model.__dict__["_xdit_hook_chains"]["forward"]
    assert model.__dict__["_old_forward"] is chain.wrapper  # accelerate's hook calls our chain ...
    assert hook_names(model)[0] == "xdit.flux" and len(hook_names(model)) == 2  # ... boundary, then the cache
    with torch.no_grad():
        got = _steps(model, inputs)
    assert agreed_max((got - want).abs().max().item()) <= 1e-5
    assert [s["computed"] for s in cache_summary(model)["branches"]["default"]] == [True, False, True, False]

    def offloaded_video(mode: str = "model", **kwargs):
        return tiny_opensora_pipeline(seed=0).enable_offload(mode, device="cpu", **kwargs)

    def graphed_then_offloaded():
        parallelize_flux_pipeline(_flux_pipe(), mesh, cuda_graph=True).enable_model_cpu_offload(device="cpu")

    def sharded_then_offloaded():
        pipe = tiny_opensora_pipeline(seed=0)
        shard_weights(pipe, mesh)
        pipe.enable_offload("layerwise", device="cpu")

    return expect_value_errors(
        {
            "unknown mode": lambda: offloaded_video("disk"),
            "blocks per group": lambda: offloaded_video("layerwise", blocks_per_group=0),
            "prefetch on the CPU": lambda: offloaded_video("layerwise", prefetch=True),
            "prefetch with groups of 2": lambda: offloaded_video("layerwise", prefetch=True, blocks_per_group=2),
            "meta": lambda: tiny_opensora_pipeline(seed=0).enable_offload("model", device="meta"),
            "twice": lambda: offloaded_video().enable_offload("sequential", device="cpu"),
            "moved while offloaded": lambda: offloaded_video().to("cpu"),
            "graph, then offload": graphed_then_offloaded,
            "offload, then graph": lambda: apply_cuda_graph(offloaded_video().transformer),
            "sharded, then offloaded": sharded_then_offloaded,
            "offloaded, then sharded": lambda: shard_weights(offloaded_video(), mesh),
        }
    )  # fmt: skip


def _worker(world: int) -> dict:
    worker_setup()
    report = {"cases": _pipeline_cases(world)}
    if world == 2:
        report["errors"] = _composition_and_errors()
    return report


def test_offload_modes_equal_resident_on_every_mesh() -> None:
    for world in MESHES:
        reports = run_ranks(_worker, world, world, timeout_s=600)
        assert len(reports[0]["cases"]) == (len(MODES) + 1) * len(MESHES[world])
        if world == 2:
            text = "\n".join(reports[0]["errors"])
            needles = (
                "unknown offload mode", "blocks_per_group must be a positive int", "prefetch (a side CUDA stream)",
                "cannot compute on the meta device", "offloaded already", "the pipeline is offloaded",
                "replays CUDA graphs", "a CUDA graph replays the addresses", "sharded with FSDP2",
                "CPU-offloaded", "blocks_per_group must be 1 with it",
            )  # fmt: skip
            for needle in needles:
                assert needle in text, (needle, text)


def test_layerwise_granularity_per_component():
    """Layerwise offload goes by blocks where a component lists them among its children (FLUX's
    transformer) and layer by layer where they are nested (transformers' T5 and CLIP)."""
    pipe = tiny_flux_pipeline(seed=0)
    assert has_block_list(pipe.transformer)
    assert not has_block_list(pipe.text_encoder) and not has_block_list(pipe.text_encoder_2)


def test_whole_offload_keeps_one_component_on_the_device():
    """The model mode: calling a component makes it the one on the device (the previous one goes back),
    outputs unchanged; ``release`` leaves none there."""
    torch.manual_seed(0)
    first, second = torch.nn.Linear(4, 4), torch.nn.Linear(4, 3)
    x = torch.randn(2, 4)
    want = first(x), second(first(x))
    offload = Offload("model", torch.device("cpu"))
    offload_components([("first", first), ("second", second), ("absent", None)], offload)
    assert sorted(offload.hooks) == ["first", "second"]
    current = offload.hooks["first"].on_device
    assert current.current is None
    torch.testing.assert_close(first(x), want[0], rtol=0, atol=0)
    assert current.current is offload.hooks["first"]
    torch.testing.assert_close(second(first(x)), want[1], rtol=0, atol=0)
    assert current.current is offload.hooks["second"]
    offload.release()
    assert current.current is None
