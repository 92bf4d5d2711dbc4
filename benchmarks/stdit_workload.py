"""Sweep workload ``stdit``: one STDiT3 forward (one denoising step with its CFG pair), parallel and not.

Rows: on world 1 the plain model; on larger worlds ``parallelize_stdit`` with the spatial attention
as USP and as DSP on the all-ranks sequence-parallel mesh, and the CFG pair on the ``batch`` axis
(``b2`` × sequence parallel over the rest, spatial USP); with ``--stdit-compile`` also the blocks
compiled (``compile_repeated_blocks``: the plain model on world 1, USP on all ranks on larger worlds).
Input: batch 2 (the CFG pair), latents ``--stdit-latent`` (default 720p 4 s: 30×90×160, 108 000
tokens per sample), 300 text tokens of which 120 valid. Every output is checked against a float32
forward of the same (bf16-valued) weights on one device, by the flash-attention rule (error at most
twice the plain bf16 model's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from checks import agreed_max, world_one_reference

from models.stdit import STDiT3, STDiT3Config, parallelize_stdit, unparallelize_stdit
from xdit_core import ParallelMesh

CONFIGS = {
    "xl": STDiT3Config(),
    "tiny": STDiT3Config(depth=2, hidden_size=64, num_heads=4, caption_channels=32, model_max_length=10),
}


def build_stdit(config: STDiT3Config, device: torch.device, dtype: torch.dtype) -> STDiT3:
    """Random weights (perturbed so no gate or table is trivial), the same on every rank."""
    torch.manual_seed(0)
    with torch.device(device):
        model = STDiT3(config).eval()
        with torch.no_grad():
            for p in model.parameters():
                if p is not model.rope.freqs:
                    p.add_(torch.randn_like(p) * 0.02)
    return model.to(dtype).requires_grad_(False)


def stdit_inputs(config: STDiT3Config, latent: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> dict:
    frames, h, w = latent
    gen = torch.Generator(device).manual_seed(frames * h * w)
    length = config.model_max_length
    mask = torch.zeros(2, length, dtype=torch.bool, device=device)
    mask[:, : max(1, length * 2 // 5)] = True  # 120 of 300 tokens valid, for both halves of the pair
    return dict(
        x=torch.randn(2, config.in_channels, frames, h, w, generator=gen, device=device).to(dtype),
        timestep=torch.tensor([700.0, 700.0], device=device).to(dtype),
        y=torch.randn(2, 1, length, config.caption_channels, generator=gen, device=device).to(dtype),
        mask=mask,
        fps=torch.tensor([24.0], device=device),
        height=torch.tensor([h * 8.0], device=device),
        width=torch.tensor([w * 8.0], device=device),
    )


def _reference(model: STDiT3, inputs: dict, cache: Path, world: int) -> tuple[torch.Tensor, float] | None:
    """(float32 output, error of the plain bf16 output): computed on world 1, cached in ``cache``."""

    def compute() -> dict:
        with torch.no_grad():
            plain = model(**inputs)
            dtype = next(model.parameters()).dtype
            model.float()
            try:
                fp32 = model(**{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()})
            finally:
                model.to(dtype)
        return {"fp32": fp32, "ref_err": (plain - fp32).abs().max().item()}

    saved = world_one_reference(cache, world, compute)
    return None if saved is None else (saved["fp32"].to(inputs["x"].device), saved["ref_err"])


def stdit_workload(args: Any, timer: Any) -> Iterator[dict]:
    """Rows for the latent size ``args.stdit_latent`` on this world (see the module docstring)."""
    world, device = dist.get_world_size(), timer.device
    gpu = device.type == "cuda"
    config = CONFIGS[args.stdit_config]
    dtype = torch.bfloat16 if gpu else torch.float32
    timer = dataclasses.replace(timer, warmup=1, iters=1, reps=args.stdit_reps)
    model = build_stdit(config, device, dtype)
    latent = tuple(args.stdit_latent)
    inputs = stdit_inputs(config, latent, device, dtype)
    ref = _reference(
        model, inputs, Path(args.out) / f"stdit_ref_{args.stdit_config}_{'x'.join(map(str, latent))}.pt", world
    )
    assert ref is not None
    fp32, ref_err = ref
    tokens = latent[0] * -(-latent[1] // 2) * -(-latent[2] // 2)

    def row(variant: str, mesh: str) -> dict:
        if gpu:
            torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            err = agreed_max((model(**inputs) - fp32).abs().max().item(), device)
            ms = timer(lambda: model(**inputs))
        floor = 1e-5 if dtype == torch.float32 else 0.0
        return {
            "workload": "stdit", "shape": f"2x{'x'.join(map(str, latent))} ({tokens} tok)", "world": world,
            "backend": "auto", "variant": variant, "mesh": mesh, "median_ms": ms, "graph_ms": None,
            "max_err": err, "ref_err": ref_err, "ok": err <= 2 * ref_err + floor,
            "peak_gib": agreed_max(torch.cuda.max_memory_allocated(device) / 2**30, device) if gpu else None,
        }  # fmt: skip

    if world == 1:
        yield row("single", "1")
        if args.stdit_compile:  # the blocks compiled (fullgraph), as the product runs them
            model.compile_repeated_blocks(dynamic=False)
            yield row("single compiled", "1")
        return
    device_type = device.type
    spatial_modes = ("usp", "dsp") if latent[0] >= world else ("usp",)  # DSP needs a frame per rank
    cases = [(f"u{world}", ParallelMesh.build(ulysses=world, device_type=device_type), s) for s in spatial_modes]
    pair = ParallelMesh.build(ulysses=world // 2, batch=2, device_type=device_type)
    cases.append((f"b2×u{world // 2}", pair, "usp"))
    for name, mesh, spatial in cases:
        parallelize_stdit(model, mesh, spatial=spatial)
        try:
            yield row(f"ours {spatial}", name)
        finally:
            unparallelize_stdit(model)
    if args.stdit_compile:  # USP on all ranks, the blocks compiled (the attention is one custom op)
        model.compile_repeated_blocks(dynamic=False)
        parallelize_stdit(model, cases[0][1], spatial="usp")
        try:
            yield row("ours usp compiled", cases[0][0])
        finally:
            unparallelize_stdit(model)
