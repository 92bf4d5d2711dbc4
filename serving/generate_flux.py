"""Generate one image with FLUX on several GPUs (or CPU processes), exactly as one device would.

    torchrun --nproc_per_node 4 -m serving.cli generate flux --model-path /models/FLUX.1-dev --ulysses 4 \\
        --height 1024 --width 1024 --steps 28 --prompt "a red fox in the snow" --out fox.png

``--model-path`` is a local diffusers folder (``hf download black-forest-labs/FLUX.1-dev
--local-dir /models/FLUX.1-dev``); height and width must be multiples of 16 (FLUX packs 2×2 patches of
its 8× VAE's latents). Without ``--model-path`` a tiny random FLUX pipeline is built in-process
(tokenizers included; its 2× VAE makes the multiple 4), so the whole path runs on a CPU in seconds:
``xdit generate flux`` (one process, no launcher needed) or
``torchrun --nproc_per_node 2 -m serving.cli generate flux``. Every argument is checked before any
process group or model exists. Rank 0 shows the progress bar, saves the image and prints the timings.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.distributed as dist

from models import load_flux_pipeline, parallelize_flux_pipeline, tiny_flux_pipeline
from serving.launch_checks import (
    add_mesh_arguments,
    check_flux_folder,
    check_output,
    finite_float,
    launch_rank,
    launch_world_size,
    least_height,
    local_folder,
    mesh_degrees,
    positive_int,
    process_group,
    seed_int,
)
from xdit_core import ParallelMesh

TINY_MULTIPLE = 4  # the tiny pipeline's VAE downsamples 2×, and FLUX packs 2×2 latents
TINY_MAX_SEQUENCE, MAX_SEQUENCE = 128, 512  # the tiny T5 tokenizer's length; FluxPipeline's limit


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The arguments, every one checked (argparse's error, exit code 2) before any process group exists."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="local diffusers folder of FLUX.1-dev / schnell (default: tiny)")
    add_mesh_arguments(p, batch_help="batch axis: 2 splits the true-CFG pair (needs --true-cfg)")
    p.add_argument(
        "--height", type=positive_int, default=None, help="pixels, a multiple of 16 (default 1024; tiny: 64)"
    )
    p.add_argument("--width", type=positive_int, default=None, help="pixels, a multiple of 16 (default 1024; tiny: 64)")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default 28; tiny: 4)")
    p.add_argument("--guidance", type=finite_float, default=3.5, help="distilled guidance scale")
    p.add_argument(
        "--true-cfg", type=finite_float, default=1.0, help="true CFG scale: 1 = off, > 1 needs --negative-prompt"
    )
    p.add_argument("--negative-prompt", default=None, help="the true-CFG negative prompt (needs --true-cfg > 1)")
    p.add_argument("--seed", type=seed_int, default=0)
    p.add_argument("--prompt", default="a photo of a small house on a river at night")
    p.add_argument(
        "--max-sequence-length", type=positive_int, default=None, help="T5 tokens (default and most 512; tiny: 64, 128)"
    )
    p.add_argument("--text", choices=("shard", "replicate"), default="shard", help="text tokens sharded or replicated")
    p.add_argument("--cuda-graph", action="store_true", help="replay each step from a CUDA graph (GPUs)")
    p.add_argument(
        "--peer-exchange", action="store_true", help="Ulysses all-to-alls into the peer GPUs' memory (one NVLink host)"
    )
    p.add_argument(
        "--vae-tile-rows",
        type=positive_int,
        default=None,
        help="decode in slabs of this many rows (less memory; exact)",
    )
    p.add_argument("--plain-vae", action="store_true", help="decode on every rank alone (no parallel VAE)")
    p.add_argument("--out", default="flux.png", help="the PNG to write (its folder must exist)")
    args = p.parse_args(argv)
    try:
        _check(args)
    except ValueError as e:
        p.error(str(e))
    return args


def _check(args: argparse.Namespace) -> None:
    """Fill in the defaults and check every argument against the others, the model and the launch."""
    world = launch_world_size()
    args.ulysses = mesh_degrees(world, args.ulysses, args.ring, args.batch, args.tp)
    if args.true_cfg < 1:
        raise ValueError(f"--true-cfg {args.true_cfg} must be >= 1 (1 = off, > 1 = true CFG with --negative-prompt)")
    if args.true_cfg > 1 and args.negative_prompt is None:
        raise ValueError(f"--true-cfg {args.true_cfg} needs --negative-prompt (true CFG contrasts it with the prompt)")
    if args.true_cfg == 1 and args.negative_prompt is not None:
        raise ValueError("--negative-prompt is used only with --true-cfg > 1 (true CFG is off at 1)")
    samples = 2 if args.true_cfg > 1 else 1  # one prompt; true CFG adds its negative
    if args.batch > samples:
        fits = "1 or 2 (the true-CFG pair)" if samples == 2 else "1 (or 2 with --true-cfg > 1)"
        raise ValueError(
            f"--batch {args.batch} splits each step's samples over {args.batch} ranks, but this run has {samples}: "
            f"use --batch {fits}"
        )
    if (args.cuda_graph or args.peer_exchange) and not torch.cuda.is_available():
        flag = "--cuda-graph" if args.cuda_graph else "--peer-exchange"
        raise ValueError(f"{flag} needs CUDA GPUs; none is visible")
    tiny = args.model_path is None
    if tiny:
        multiple, size, steps, tokens, most = TINY_MULTIPLE, 64, 4, 64, TINY_MAX_SEQUENCE
    else:
        multiple = check_flux_folder(local_folder(args.model_path, "--model-path"))
        size, steps, tokens, most = 1024, 28, 512, MAX_SEQUENCE
    args.height, args.width = args.height or size, args.width or size
    args.steps = args.steps or steps
    args.max_sequence_length = args.max_sequence_length or tokens
    what = "the tiny model" if tiny else "FLUX"
    for name in ("height", "width"):
        value = getattr(args, name)
        if value % multiple:
            near = max(multiple, value // multiple * multiple)
            raise ValueError(
                f"--{name} {value} must be a multiple of {multiple} for {what} (2×2 patches of latents "
                f"{multiple // 2}× smaller than the image); e.g. {near} or {near + multiple}"
            )
    rows = args.height // (multiple // 2)
    if not args.plain_vae and rows < world:
        least = least_height(world, multiple)
        raise ValueError(
            f"--height {args.height} gives {rows} latent rows, too few for the parallel VAE over {world} ranks "
            f"(one row each at least): use --height >= {least} or --plain-vae"
        )
    if args.max_sequence_length > most:
        raise ValueError(f"--max-sequence-length {args.max_sequence_length} exceeds {most}, the most {what} takes")
    if launch_rank() == 0:  # rank 0 writes the image
        check_output(args.out, ".png")


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parse_args(argv, prog)
    with process_group() as ctx:
        mesh = ParallelMesh.build(
            ulysses=args.ulysses, ring=args.ring, batch=args.batch, tp=args.tp, peer_exchange=args.peer_exchange
        )
        tiny = args.model_path is None
        dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
        if tiny:
            pipe = tiny_flux_pipeline(seed=0, dtype=dtype)
        else:
            pipe = load_flux_pipeline(args.model_path, mesh, torch_dtype=dtype)  # text encoders on rank 0 only
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
        call = dict(
            height=args.height,
            width=args.width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            true_cfg_scale=args.true_cfg,
            negative_prompt=args.negative_prompt,
            max_sequence_length=args.max_sequence_length,
            generator=torch.Generator(ctx.device).manual_seed(args.seed),
        )
        if ctx.rank == 0:
            print(f"FLUX on {ctx.world_size} rank(s), mesh {mesh.describe()}, {args.height}×{args.width}, "
                  f"{args.steps} steps, {'tiny random model' if tiny else args.model_path}")  # fmt: skip
        dist.barrier()
        start = time.perf_counter()
        image = parallel(args.prompt, **call).images[0]
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
        if ctx.rank == 0:
            image.save(args.out)
            print(f"done in {seconds:.2f} s ({seconds / args.steps * 1e3:.0f} ms per step incl. text and VAE); "
                  f"saved {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
