"""Open-Sora 1.2 on GPUs, real-size models with random weights (bf16): the video VAE decode and the
whole text-to-video pipeline, on as many GPUs as torchrun starts.

    torchrun --nproc_per_node 2 benchmarks/opensora_bench.py --vae --pipeline 360p 720p --out results/

* ``--vae``: decode 720p 4 s latents ``[1, 4, 30, 90, 160]`` (102 frames of 720×1280). World 1 runs
  the plain ``OpenSoraVAE.decode`` (the reference path: per-chunk temporal decode, diffusers per
  frame) and a float32 decode of the same bf16-valued weights, cached in ``--out``; larger worlds run
  ``parallelize_vae`` (chunks and frames dealt to the ranks, the video gathered to every rank). Every
  output is checked against the float32 decode by the flash-attention rule (error at most twice the
  plain bf16 decode's). Median of ``--reps`` after one warm-up; peak memory of the slowest rank.
* ``--pipeline RES ...``: prompt → T5-XXL (float32, on rank 0 only; a byte-level tokenizer stands in
  for T5's, same 300 tokens) → 30 rectified-flow steps of STDiT3-XL/2 with CFG → VAE decode, 4 s at
  9:16. On more than one GPU: ``parallelize_opensora`` with the CFG pair on the batch axis when the
  rank count is even; ``--compile``: STDiT3's blocks compiled (``compile_repeated_blocks``). One warm-up
  call (2 steps), then one timed call; its breakdown (text, denoising, decode) is what the pipeline reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist
from checks import agreed_max, world_one_reference
from stdit_workload import build_stdit
from transformers import T5Config, T5EncoderModel

from models.stdit import STDiT3Config
from models.stdit.pipeline import OpenSoraPipeline, image_size, parallelize_opensora, parse_num_frames
from models.stdit.text import T5TextEncoder
from models.stdit.video_vae import OpenSoraVAE
from models.testing import tiny_t5_text_encoder
from parallel_vae import parallelize_vae, unparallelize_vae
from xdit_core import ParallelMesh, init_distributed

T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64)


def log(*args: object) -> None:
    if dist.get_rank() == 0:
        print(*args, flush=True)


def peak_gib(device: torch.device) -> float:
    return agreed_max(torch.cuda.max_memory_allocated(device) / 2**30, device)


def build_vae(device: torch.device) -> OpenSoraVAE:
    torch.manual_seed(0)
    with torch.device(device):
        vae = OpenSoraVAE().eval()
    return vae.to(torch.bfloat16).requires_grad_(False)


def bench_vae(args: argparse.Namespace, device: torch.device) -> dict:
    world = dist.get_world_size()
    vae = build_vae(device)
    frames = 102
    z = torch.randn(1, 4, vae.latent_frames(frames), 90, 160, generator=torch.Generator().manual_seed(0))
    z = z.to(device, torch.bfloat16)

    def compute() -> dict:
        with torch.no_grad():
            plain = vae.decode(z, num_frames=frames)
            vae.float()
            try:
                fp32 = vae.decode(z.float(), num_frames=frames)
            finally:
                vae.to(torch.bfloat16)
        return {"fp32": fp32, "ref_err": (plain.float() - fp32).abs().max().item()}

    ref = world_one_reference(Path(args.out) / "vae_ref_720p_4s.pt", world, compute)
    assert ref is not None
    fp32, ref_err = ref["fp32"].to(device), ref["ref_err"]
    if world > 1:
        parallelize_vae(vae, dist.group.WORLD, tile_rows=args.vae_tile_rows)
    times = []
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad():
        for _ in range(args.reps + 1):
            dist.barrier()
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            video = vae.decode(z, num_frames=frames)
            torch.cuda.synchronize(device)
            times.append(agreed_max(time.perf_counter() - start, device))
    err = agreed_max((video.float() - fp32).abs().max().item(), device)
    if world > 1:
        unparallelize_vae(vae)
    return {
        "item": "vae 720p 4s", "world": world, "variant": "plain" if world == 1 else "ours",
        "median_s": statistics.median(times[1:]), "times_s": times[1:], "peak_gib": peak_gib(device),
        "max_err": err, "ref_err": ref_err, "ok": err <= 2 * ref_err + 1e-2,
    }  # fmt: skip


def build_pipeline(device: torch.device) -> OpenSoraPipeline:
    transformer = build_stdit(STDiT3Config(), device, torch.bfloat16)
    vae = build_vae(device)
    text = None
    if dist.get_rank() == 0:  # T5 runs once, on rank 0
        with torch.device(device):
            t5 = T5EncoderModel(T5Config(**T5_XXL, feed_forward_proj="gated-gelu", is_encoder_decoder=False))
        tokenizer = tiny_t5_text_encoder().tokenizer
        text = T5TextEncoder(tokenizer, t5.eval().requires_grad_(False), max_length=300)
    return OpenSoraPipeline(transformer, vae, text)


def bench_pipeline(args: argparse.Namespace, device: torch.device, pipe: OpenSoraPipeline) -> list[dict]:
    world, rows = dist.get_world_size(), []
    for resolution in args.pipeline:
        height, width = image_size(resolution, "9:16")
        frames = parse_num_frames(args.num_frames)
        call = dict(height=height, width=width, num_frames=frames, seed=1024)
        pipe(args.prompt, **call, steps=2)  # warm-up: kernels, allocator, cuDNN plans
        torch.cuda.reset_peak_memory_stats(device)
        dist.barrier()
        out = pipe(args.prompt, **call, steps=args.steps)
        finite = agreed_max(0.0 if out.video is None or bool(out.video.isfinite().all()) else 1.0, device) == 0
        timings = {k: agreed_max(v, device) for k, v in out.timings.items()}
        rows.append({
            "item": f"pipeline {resolution} {args.num_frames}", "world": world, "size": f"{height}x{width}x{frames}",
            "steps": args.steps, **{f"{k}_s": v for k, v in timings.items()},
            "step_s": timings["denoise"] / args.steps, "peak_gib": peak_gib(device), "finite": finite,
        })  # fmt: skip
        log(json.dumps(rows[-1]))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vae", action="store_true", help="time the 720p 4 s VAE decode")
    p.add_argument("--vae-tile-rows", type=int, default=None)
    p.add_argument("--pipeline", nargs="*", default=[], help="resolutions for the whole pipeline (e.g. 360p 720p)")
    p.add_argument("--num-frames", default="4s")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--compile", action="store_true", help="pipeline: compile STDiT3's blocks (fullgraph)")
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--prompt", default="a red fox running through fresh snow at sunrise, cinematic")
    p.add_argument("--out", default="results/opensora")
    args = p.parse_args()
    ctx = init_distributed()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # as the reference's script
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    if args.vae:
        rows.append(bench_vae(args, ctx.device))
        log(json.dumps(rows[-1]))
        torch.cuda.empty_cache()
    if args.pipeline:
        pipe = build_pipeline(ctx.device)
        if ctx.world_size > 1:
            batch = 2 if ctx.world_size % 2 == 0 else 1
            mesh = ParallelMesh.build(ulysses=ctx.world_size // batch, batch=batch, device_type="cuda")
            pipe = parallelize_opensora(pipe, mesh)
            log(f"mesh {mesh.describe()}")
        if args.compile:
            pipe.transformer.compile_repeated_blocks(dynamic=False)
        rows += bench_pipeline(args, ctx.device, pipe)
    if ctx.rank == 0:
        name = f"opensora_world_{ctx.world_size}_{'vae' if args.vae else ''}{'_'.join(args.pipeline)}"
        name += "_compiled.json" if args.compile else ".json"
        (out / name).write_text(json.dumps(rows, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
