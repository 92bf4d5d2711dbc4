"""Generate one image with FLUX on several GPUs (or CPU processes), exactly as one device would.

    torchrun --nproc_per_node 4 examples/flux_generate.py --model-path /models/FLUX.1-dev --ulysses 4 \\
        --height 1024 --width 1024 --steps 28 --prompt "a red fox in the snow" --out fox.png

Without ``--model-path`` a tiny random FLUX pipeline is built in-process (tokenizers included), so the
whole path runs on a CPU in seconds: ``torchrun --nproc_per_node 2 examples/flux_generate.py``.
Rank 0 shows the progress bar, saves the image and prints the timings.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist
from diffusers import FluxPipeline

from models import parallelize_flux_pipeline, tiny_flux_pipeline
from xdit_core import ParallelMesh, init_distributed


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="local diffusers folder of FLUX.1-dev / schnell (default: tiny)")
    p.add_argument("--ulysses", type=int, default=None, help="ulysses degree (default: all ranks / (ring × batch))")
    p.add_argument("--ring", type=int, default=1)
    p.add_argument("--batch", type=int, default=1, help="batch axis: prompts or the true-CFG pair split over it")
    p.add_argument("--height", type=int, default=None, help="pixels (default 1024; tiny: 64)")
    p.add_argument("--width", type=int, default=None, help="pixels (default 1024; tiny: 64)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 28; tiny: 4)")
    p.add_argument("--guidance", type=float, default=3.5, help="distilled guidance scale")
    p.add_argument("--true-cfg", type=float, default=1.0, help="true CFG scale (> 1 needs --negative-prompt)")
    p.add_argument("--negative-prompt", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompt", default="a photo of a small house on a river at night")
    p.add_argument("--max-sequence-length", type=int, default=None, help="T5 tokens (default 512; tiny: 64)")
    p.add_argument("--text", choices=("shard", "replicate"), default="shard", help="text tokens sharded or replicated")
    p.add_argument("--cuda-graph", action="store_true", help="replay each step from a CUDA graph (GPUs)")
    p.add_argument(
        "--peer-exchange", action="store_true", help="Ulysses all-to-alls into the peer GPUs' memory (one NVLink host)"
    )
    p.add_argument(
        "--vae-tile-rows", type=int, default=None, help="decode in slabs of this many rows (less memory; exact)"
    )
    p.add_argument("--plain-vae", action="store_true", help="decode on every rank alone (no parallel VAE)")
    p.add_argument("--out", default="flux.png")
    return p.parse_args()


def main() -> None:
    args = parse_args()
    ctx = init_distributed()
    ulysses = args.ulysses or ctx.world_size // (args.ring * args.batch)
    mesh = ParallelMesh.build(ulysses=ulysses, ring=args.ring, batch=args.batch, peer_exchange=args.peer_exchange)
    tiny = args.model_path is None
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    if tiny:
        pipe = tiny_flux_pipeline(seed=0, dtype=dtype)
    else:
        pipe = FluxPipeline.from_pretrained(args.model_path, torch_dtype=dtype)
    pipe = pipe.to(ctx.device)
    pipe.set_progress_bar_config(disable=ctx.rank != 0)
    parallel = parallelize_flux_pipeline(
        pipe,
        mesh,
        text=args.text,
        cuda_graph=args.cuda_graph,
        vae=not args.plain_vae,
        vae_tile_rows=args.vae_tile_rows,
    )
    size = 64 if tiny else 1024
    call = dict(
        height=args.height or size,
        width=args.width or size,
        num_inference_steps=args.steps or (4 if tiny else 28),
        guidance_scale=args.guidance,
        true_cfg_scale=args.true_cfg,
        negative_prompt=args.negative_prompt,
        max_sequence_length=args.max_sequence_length or (64 if tiny else 512),
        generator=torch.Generator(ctx.device).manual_seed(args.seed),
    )
    if ctx.rank == 0:
        print(f"FLUX on {ctx.world_size} rank(s), mesh {mesh.describe()}, {call['height']}×{call['width']}, "
              f"{call['num_inference_steps']} steps, {'tiny random model' if tiny else args.model_path}")  # fmt: skip
    dist.barrier()
    start = time.perf_counter()
    image = parallel(args.prompt, **call).images[0]
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if ctx.rank == 0:
        image.save(args.out)
        steps = call["num_inference_steps"]
        print(f"done in {seconds:.2f} s ({seconds / steps * 1e3:.0f} ms per step incl. text and VAE); saved {args.out}")
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
