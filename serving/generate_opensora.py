"""Generate a video with Open-Sora 1.2 (STDiT3 + its video VAE + T5) on several GPUs (or CPU processes).

    torchrun --nproc_per_node 4 -m serving.cli generate opensora --model-path /models/OpenSora-STDiT-v3 \\
        --vae-path /models/OpenSora-VAE-v1.2 --text-encoder-path /models/t5-v1_1-xxl \\
        --resolution 720p --aspect-ratio 9:16 --num-frames 4s --prompt "a red fox in the snow" --out fox.mp4

The three paths are local folders (``hf download hpcai-tech/OpenSora-STDiT-v3 --local-dir
/models/OpenSora-STDiT-v3`` and likewise). Without paths, tiny random models (a byte-level tokenizer
included) are built in every process, so the whole path runs on a CPU in seconds:
``xdit generate opensora`` (one process, no launcher needed) or
``torchrun --nproc_per_node 2 -m serving.cli generate opensora``. Every argument is checked before any
process group or model exists. Rank 0 encodes the prompt (the only rank that loads T5), shows the
progress bar, writes the MP4 and prints the timings. The CFG pair goes on the ``batch`` axis when the
rank count is even.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from models.stdit.checkpoint import checkpoint_files
from models.stdit.config import STDiT3Config
from models.stdit.pipeline import (
    ASPECT_RATIOS,
    RESOLUTIONS,
    OpenSoraPipeline,
    image_size,
    parallelize_opensora,
    parse_num_frames,
)
from models.stdit.text import encoder_folders
from models.stdit.video_io import write_mp4
from models.stdit.video_vae import OpenSoraVAEConfig
from models.testing import tiny_opensora_pipeline
from serving.launch_checks import (
    add_mesh_arguments,
    check_output,
    check_pyav,
    finite_float,
    launch_rank,
    launch_world_size,
    local_folder,
    mesh_degrees,
    positive_int,
    process_group,
    seed_int,
)
from xdit_core import ParallelMesh


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The arguments, every one checked (argparse's error, exit code 2) before any process group exists."""
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="local folder of OpenSora-STDiT-v3 (default: tiny random)")
    p.add_argument("--vae-path", default=None, help="local folder of OpenSora-VAE-v1.2")
    p.add_argument("--text-encoder-path", default=None, help="local folder of t5-v1_1-xxl (tokenizer + encoder)")
    p.add_argument("--prompt", default="a red fox running through fresh snow at sunrise")
    p.add_argument("--resolution", default=None, choices=list(RESOLUTIONS), help="default 720p; tiny: 144p")
    p.add_argument("--aspect-ratio", default="9:16", choices=ASPECT_RATIOS, help="height:width (9:16 = landscape)")
    p.add_argument("--num-frames", default=None, help="frames or image/2s/4s/8s/16s (default 4s = 102; tiny: 17)")
    p.add_argument("--steps", type=positive_int, default=None, help="denoising steps (default 30; tiny: 4)")
    p.add_argument("--cfg-scale", type=finite_float, default=7.0)
    p.add_argument("--seed", type=seed_int, default=1024)
    p.add_argument("--fps", type=positive_int, default=24)
    p.add_argument(
        "--peer-exchange", action="store_true", help="Ulysses all-to-alls into the peer GPUs' memory (one NVLink host)"
    )
    add_mesh_arguments(p, batch_help="CFG pair axis, 1 or 2 (default 2 on an even rank count)", batch_default=None)
    p.add_argument("--spatial", choices=("usp", "dsp"), default="usp", help="spatial attention across ranks")
    p.add_argument(
        "--vae-tile-rows", type=positive_int, default=None, help="decode frames in slabs of this many rows (exact)"
    )
    p.add_argument("--out", default="opensora.mp4", help="the MP4 to write (its folder must exist)")
    args = p.parse_args(argv)
    try:
        _check(args)
    except ValueError as e:
        p.error(str(e))
    return args


def check_models_and_batch(args: argparse.Namespace) -> None:
    """The three model folders (all or none: none = tiny random models; configs read now, T5 on rank 0),
    ``args.tiny``, and the batch axis (the CFG pair: 1 or 2, default 2 on an even rank count) with the
    ulysses degree; ``xdit generate opensora`` and ``xdit serve opensora`` share it."""
    paths = [args.model_path, args.vae_path, args.text_encoder_path]
    if any(paths) and not all(paths):
        raise ValueError("pass all of --model-path, --vae-path and --text-encoder-path, or none (tiny random models)")
    args.tiny = not any(paths)
    world, rank = launch_world_size(), launch_rank()
    args.batch = args.batch or (2 if world % (2 * args.tp) == 0 else 1)
    if args.batch not in (1, 2):
        raise ValueError(f"--batch {args.batch}: Open-Sora's batch axis holds the CFG pair, so 1 or 2")
    args.ulysses = mesh_degrees(world, args.ulysses, args.ring, args.batch, args.tp)
    if not args.tiny:
        for option, model, config in (
            ("--model-path", args.model_path, STDiT3Config),
            ("--vae-path", args.vae_path, OpenSoraVAEConfig),
        ):
            config_file, _ = checkpoint_files(local_folder(model, option), option)
            config.from_json(config_file)  # its fields checked now, not after the process group starts
        if rank == 0:  # T5 lives on rank 0 only
            try:
                encoder_folders(local_folder(args.text_encoder_path, "--text-encoder-path"))
            except ValueError as e:
                raise ValueError(f"--text-encoder-path: {e}") from None


def _check(args: argparse.Namespace) -> None:
    """Fill in the defaults and check every argument against the others, the models and the launch."""
    check_models_and_batch(args)
    rank = launch_rank()
    if args.peer_exchange and not torch.cuda.is_available():
        raise ValueError("--peer-exchange needs CUDA GPUs; none is visible")
    args.num_frames = parse_num_frames(args.num_frames or ("17" if args.tiny else "4s"))
    args.height, args.width = image_size(args.resolution or ("144p" if args.tiny else "720p"), args.aspect_ratio)
    args.steps = args.steps or (4 if args.tiny else 30)
    if rank == 0:  # rank 0 writes the video
        check_output(args.out, ".mp4")
        check_pyav()


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parse_args(argv, prog)
    with process_group() as ctx:
        mesh = ParallelMesh.build(
            ulysses=args.ulysses, ring=args.ring, batch=args.batch, tp=args.tp, peer_exchange=args.peer_exchange
        )
        if args.tiny:
            pipe = tiny_opensora_pipeline(seed=0).to(ctx.device)
        else:
            dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
            text = args.text_encoder_path if ctx.rank == 0 else None  # T5 lives on rank 0 only
            pipe = OpenSoraPipeline.from_pretrained(
                args.model_path, args.vae_path, text, dtype=dtype, device=ctx.device
            )
        pipe = parallelize_opensora(pipe, mesh, spatial=args.spatial, vae_tile_rows=args.vae_tile_rows, video_rank=0)
        if ctx.rank == 0:
            models = "tiny random models" if args.tiny else args.model_path
            print(f"Open-Sora 1.2 on {ctx.world_size} rank(s), mesh {mesh.describe()}: {args.height}×{args.width}, "
                  f"{args.num_frames} frames, {args.steps} steps, {models}")  # fmt: skip
        dist.barrier()
        out = pipe(
            args.prompt,
            height=args.height,
            width=args.width,
            num_frames=args.num_frames,
            steps=args.steps,
            cfg_scale=args.cfg_scale,
            seed=args.seed,
            fps=args.fps,
            progress=lambda steps: tqdm(steps, desc="denoising", disable=ctx.rank != 0),
        )
        if ctx.rank == 0:
            path = write_mp4(out.video[0], args.out, fps=args.fps)
            t = out.timings
            print(f"text {t['text']:.2f} s, denoising {t['denoise']:.2f} s ({t['denoise'] / args.steps:.3f} s/step), "
                  f"VAE decode {t['decode']:.2f} s, total {t['total']:.2f} s; wrote {path} "
                  f"({out.video.shape[2]} frames of {out.video.shape[3]}×{out.video.shape[4]})")  # fmt: skip


if __name__ == "__main__":
    main()
