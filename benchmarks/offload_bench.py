"""CPU offload on one GPU: peak memory and time of the whole pipeline, resident vs each offload mode.

    torchrun --nproc_per_node 1 benchmarks/offload_bench.py --model flux --out results/offload
    torchrun --nproc_per_node 1 benchmarks/offload_bench.py --model opensora --steps 10 --out results/offload

* ``flux``: the FLUX.1-dev pipeline (T5-XXL, CLIP-L, transformer, VAE; random weights, bf16) at
  ``--size``² for ``--steps`` steps, as ``parallelize_flux_pipeline`` on a one-rank mesh (the parallel
  VAE included), resident or offloaded (``enable_model_cpu_offload`` / ``enable_group_offload`` with a
  side-stream prefetch / ``enable_sequential_cpu_offload``).
* ``opensora``: Open-Sora 1.2 at ``--resolution`` 9:16, ``--num-frames`` (T5-XXL in float32, STDiT3-XL/2
  and the video VAE in bf16), ``OpenSoraPipeline.enable_offload(mode)``.

Each mode builds the same weights on the GPU (the offload moves them to the CPU), makes one warm-up
call (``--warmup-steps``), then one timed call; the peak is ``torch.cuda.max_memory_allocated`` over
the timed call. ``diffusers-model``: diffusers' own ``enable_model_cpu_offload`` (accelerate's hook),
beside ``model`` (:class:`models.offload.WholeOffload`). The host-to-device bandwidth (pinned and
pageable) is measured first: the ceiling of every mode. Each mode's output is compared with the
resident output (max abs difference; offload changes where weights live, not the arithmetic).
``--tiny``: the tests' tiny models on the CPU (a smoke run: times only). One JSON line per mode in
``--out``/offload_<model>.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist

from models import parallelize_flux_pipeline
from models.offload import MODES
from models.stdit.pipeline import image_size, parse_num_frames
from models.testing import tiny_flux_pipeline, tiny_opensora_pipeline
from xdit_core import ParallelMesh, init_distributed


def build(args: argparse.Namespace, device: torch.device):
    if args.model == "flux":
        if args.tiny:
            return parallelize_flux_pipeline(tiny_flux_pipeline(seed=0), ParallelMesh.build())
        from flux_pipeline_model import build_flux_dev_pipeline

        return parallelize_flux_pipeline(build_flux_dev_pipeline(device), ParallelMesh.build())
    if args.tiny:
        return tiny_opensora_pipeline(seed=0)
    from opensora_bench import build_pipeline

    return build_pipeline(device)


def offload(pipe, model: str, mode: str, device: torch.device) -> None:
    if mode == "resident":
        return
    if mode == "diffusers-model":  # diffusers' own enable_model_cpu_offload on the stock pipeline inside
        pipe.pipe.enable_model_cpu_offload(device=device)
    elif model == "opensora":
        pipe.enable_offload(mode, device=device)
    elif mode == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "layerwise":
        pipe.enable_group_offload(device)  # prefetch on a side stream on CUDA
    else:
        pipe.enable_sequential_cpu_offload(device=device)


def generate(pipe, args: argparse.Namespace, steps: int) -> tuple[torch.Tensor, dict]:
    if args.model == "flux":
        size = 32 if args.tiny else args.size
        call = dict(height=size, width=size, num_inference_steps=steps, guidance_scale=3.5, output_type="pt")
        out = pipe(args.prompt, generator=torch.Generator().manual_seed(0), **call)
        return out.images, {}
    height, width = (64, 96) if args.tiny else image_size(args.resolution, "9:16")
    frames = 20 if args.tiny else parse_num_frames(args.num_frames)
    out = pipe(args.prompt, height=height, width=width, num_frames=frames, steps=steps, seed=1024, clean_caption=False)
    return out.video, {f"{k}_s": round(v, 3) for k, v in out.timings.items()}


def run_mode(args: argparse.Namespace, mode: str, device: torch.device, reference: torch.Tensor | None) -> tuple:
    cuda = device.type == "cuda"
    start = time.perf_counter()
    pipe = build(args, device)
    offload(pipe, args.model, mode, device)
    setup_s = time.perf_counter() - start
    generate(pipe, args, args.warmup_steps)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out, timings = generate(pipe, args, args.steps)
    if cuda:
        torch.cuda.synchronize(device)
    total = time.perf_counter() - start
    out = out.float().cpu()
    row = {
        "model": args.model, "mode": mode, "steps": args.steps, "total_s": round(total, 3),
        "setup_s": round(setup_s, 1),
        **timings,
        "peak_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None,
        "resident_gib_after": round(torch.cuda.memory_allocated(device) / 2**30, 2) if cuda else None,
        "finite": bool(out.isfinite().all()),
        "max_abs_diff_vs_resident": None if reference is None else float((out - reference).abs().max()),
    }  # fmt: skip
    del pipe
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return row, out


def link_gbps(device: torch.device, gib: int = 4) -> dict[str, float]:
    """Host-to-device copy bandwidth (GB/s, median of 5) from pinned and from pageable memory: the ceiling
    of every offload mode."""
    result = {}
    for name in ("pinned", "pageable"):
        host = torch.empty(gib * 2**30, dtype=torch.uint8, pin_memory=name == "pinned")
        times = []
        for _ in range(5):
            torch.cuda.synchronize(device)
            start = time.perf_counter()
            host.to(device, non_blocking=True)
            torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        result[name] = round(host.numel() / sorted(times)[2] / 1e9, 1)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("flux", "opensora"), default="flux")
    p.add_argument("--modes", nargs="+", default=["resident", *MODES], choices=["resident", *MODES, "diffusers-model"])
    p.add_argument("--size", type=int, default=1024, help="FLUX: image side in pixels")
    p.add_argument("--resolution", default="720p", help="Open-Sora")
    p.add_argument("--num-frames", default="4s", help="Open-Sora")
    p.add_argument("--steps", type=int, default=28)
    p.add_argument("--warmup-steps", type=int, default=2)
    p.add_argument("--prompt", default="a red fox running through fresh snow at sunrise, cinematic")
    p.add_argument("--tiny", action="store_true", help="the tests' tiny models on the CPU (smoke run)")
    p.add_argument("--out", default="results/offload")
    args = p.parse_args()
    ctx = init_distributed()
    if ctx.world_size != 1:
        raise SystemExit("offload_bench.py measures one GPU: run it with torchrun --nproc_per_node 1")
    device = torch.device("cpu") if args.tiny else ctx.device
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = None
    if device.type == "cuda":
        print(json.dumps({"host_to_device_gbps": link_gbps(device)}), flush=True)
    with (out_dir / f"offload_{args.model}.jsonl").open("a") as log:
        for mode in args.modes:
            row, out = run_mode(args, mode, device, reference)
            if mode == "resident":
                reference = out
            print(json.dumps(row), flush=True)
            log.write(json.dumps(row) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
