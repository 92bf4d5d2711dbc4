"""Generate a video with Open-Sora 1.2 (STDiT3 + its video VAE + T5) on several GPUs (or CPU processes).

    torchrun --nproc_per_node 4 examples/stdit_generate.py --model-path /models/OpenSora-STDiT-v3 \\
        --vae-path /models/OpenSora-VAE-v1.2 --text-encoder-path /models/t5-v1_1-xxl \\
        --resolution 720p --aspect-ratio 9:16 --num-frames 4s --prompt "a red fox in the snow" --out fox.mp4

Without paths, tiny random models (a byte-level tokenizer included) are built in every process, so the
whole path runs on a CPU in seconds: ``torchrun --nproc_per_node 2 examples/stdit_generate.py``.
Rank 0 encodes the prompt (the only rank that loads T5), shows the progress bar, writes the MP4 and
prints the timings. The CFG pair goes on the ``batch`` axis when the rank count is even.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from models.stdit.pipeline import (
    ASPECT_RATIOS,
    RESOLUTIONS,
    OpenSoraPipeline,
    image_size,
    parallelize_opensora,
    parse_num_frames,
    tiny_opensora_pipeline,
)
from models.stdit.video_io import write_mp4
from xdit_core import ParallelMesh, init_distributed


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="local folder of OpenSora-STDiT-v3 (default: tiny random)")
    p.add_argument("--vae-path", default=None, help="local folder of OpenSora-VAE-v1.2")
    p.add_argument("--text-encoder-path", default=None, help="local folder of t5-v1_1-xxl (tokenizer + encoder)")
    p.add_argument("--prompt", default="a red fox running through fresh snow at sunrise")
    p.add_argument("--resolution", default=None, choices=list(RESOLUTIONS), help="default 720p; tiny: 144p")
    p.add_argument("--aspect-ratio", default="9:16", choices=ASPECT_RATIOS, help="height:width (9:16 = landscape)")
    p.add_argument("--num-frames", default=None, help="frames or image/2s/4s/8s/16s (default 4s = 102; tiny: 17)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default 30; tiny: 4)")
    p.add_argument("--cfg-scale", type=float, default=7.0)
    p.add_argument("--seed", type=int, default=1024)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--ulysses", type=int, default=None, help="ulysses degree (default: ranks / (ring × batch))")
    p.add_argument(
        "--peer-exchange", action="store_true", help="Ulysses all-to-alls into the peer GPUs' memory (one NVLink host)"
    )
    p.add_argument("--ring", type=int, default=1)
    p.add_argument("--batch", type=int, default=None, help="CFG pair axis: 1 or 2 (default 2 on an even rank count)")
    p.add_argument("--spatial", choices=("usp", "dsp"), default="usp", help="spatial attention across ranks")
    p.add_argument("--vae-tile-rows", type=int, default=None, help="decode frames in slabs of this many rows (exact)")
    p.add_argument("--out", default="opensora.mp4")
    args = p.parse_args()
    paths = [args.model_path, args.vae_path, args.text_encoder_path]
    if any(paths) and not all(paths):
        p.error("pass all of --model-path, --vae-path and --text-encoder-path, or none (tiny random models)")
    for path in filter(None, paths):
        if not Path(path).is_dir():
            p.error(f"{path} is not a folder")
    args.tiny = not any(paths)
    try:
        args.num_frames = parse_num_frames(args.num_frames or ("17" if args.tiny else "4s"))
        args.height, args.width = image_size(args.resolution or ("144p" if args.tiny else "720p"), args.aspect_ratio)
    except ValueError as e:
        p.error(str(e))
    args.steps = args.steps or (4 if args.tiny else 30)
    return args


def main() -> None:
    args = parse_args()
    ctx = init_distributed()
    batch = args.batch or (2 if ctx.world_size % 2 == 0 else 1)
    ulysses = args.ulysses or ctx.world_size // (args.ring * batch)
    mesh = ParallelMesh.build(ulysses=ulysses, ring=args.ring, batch=batch, peer_exchange=args.peer_exchange)
    if args.tiny:
        pipe = tiny_opensora_pipeline(seed=0).to(ctx.device)
    else:
        dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
        text = args.text_encoder_path if ctx.rank == 0 else None  # T5 lives on rank 0 only
        pipe = OpenSoraPipeline.from_pretrained(args.model_path, args.vae_path, text, dtype=dtype, device=ctx.device)
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
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
