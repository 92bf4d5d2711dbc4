"""One denoising step on one GPU, every way the library runs it, with where the GPU time goes.

    torchrun --nproc_per_node 1 benchmarks/step_bench.py --label new --model flux --sizes 1024 2048 --out DIR
    torchrun --nproc_per_node 1 benchmarks/step_bench.py --label new --model stdit --out DIR

Rows (``--rows``, default all): ``plain`` (the model as built) and ``ours`` (through the adapter on a
mesh of one rank: ``parallelize_flux`` / ``parallelize_stdit``), each ``-eager``, ``-compiled`` (the
repeated blocks compiled: ``compile_repeated_blocks``; ``fullgraph=True`` for ``ours`` and for STDiT3)
and ``-compiled+graph`` (then replayed from a CUDA graph; FLUX only). Models: FLUX.1-dev's transformer at
``--sizes`` (512 text tokens) and STDiT3-XL/2 at ``--latent`` (default 720p 4 s, the CFG pair), random
bf16 weights. Each row: median of ``--reps`` CUDA-synchronised steps after warm-up; its error against a
float32 forward of the same weights next to the plain eager bf16 model's (pass: at most twice that, the
flash-attention rule); with ``--profile`` one more step under ``torch.profiler``, its kernel time split
into GEMM, attention and everything else, and the step's idle share (median step − kernel time).

The library is whatever ``PYTHONPATH`` puts first, so the same script times an older commit beside this
one (``benchmarks/gpu_step.sh``); on a library without ``STDiT3.compile_repeated_blocks`` the STDiT3 blocks are
compiled one by one with ``torch.compile``'s defaults.
Results append to ``DIR/step_bench.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from checks import median_ms
from flux_model import FLUX_DEV, build_flux, flux_inputs  # beside this script (its folder is on sys.path)
from stdit_workload import CONFIGS, build_stdit, stdit_inputs
from torch.profiler import ProfilerActivity, profile

import models
from models import parallelize_flux, unparallelize_flux
from models.stdit import parallelize_stdit, unparallelize_stdit
from xdit_core import ParallelMesh, init_distributed
from xdit_core.graphs import CudaGraphed

ROWS = ("plain-eager", "ours-eager", "plain-compiled", "plain-compiled+graph", "ours-compiled", "ours-compiled+graph")
FAMILIES = {  # kernel-name fragments, first match wins (FA3's kernels are CUTLASS ones: attention first)
    "attention": ("flash", "fmha", "sdpa", "attention"),
    "gemm": ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas"),
}


def family(name: str) -> str:
    low = name.lower()
    if low.startswith("triton_"):  # inductor's kernels, named after the ops fused in (maybe "..._attention_...")
        return "gemm" if low.startswith("triton_tem") else "other"
    return next((f for f, keys in FAMILIES.items() if any(k in low for k in keys)), "other")


def kernel_split(fn: Callable[[], Any]) -> dict[str, float]:
    """GPU kernel time of one ``fn()`` by family, in ms, and the kernel names that took longest."""
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    split: dict[str, float] = {f: 0.0 for f in (*FAMILIES, "other")}
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    for e in kernels:
        split[family(e.key)] += e.self_device_time_total / 1e3
    top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:12]
    return {**split, "top": [(round(e.self_device_time_total / 1e3, 2), e.count, e.key[:100]) for e in top]}


def measure(name: str, fn: Callable[[], Any], fp32: torch.Tensor, ref_err: float, args: argparse.Namespace) -> dict:
    out = fn()
    out = out[0] if isinstance(out, tuple) else out
    err = (out.float() - fp32.float()).abs().max().item()
    start = time.time()
    ms = median_ms(fn, args.reps, args.warmup)
    window = (start, time.time())  # wall-clock span of the timed steps, to match with sampled GPU clocks
    row = {"row": name, "ms": ms, "window": window, "max_err": err, "ref_err": ref_err, "ok": err <= 2 * ref_err}
    row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    if args.profile:
        split = kernel_split(fn)
        busy = sum(split[f] for f in (*FAMILIES, "other"))
        row["kernels_ms"] = {f: round(split[f], 2) for f in (*FAMILIES, "other")}
        row["idle_ms"] = round(max(ms - busy, 0.0), 2)
        row["top_kernels"] = split["top"]
    return row


def _compile_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {}
    for item in args.inductor:
        key, value = item.split("=", 1)
        options[key] = json.loads(value)
    return options


def flux_rows(args: argparse.Namespace, device: torch.device, mesh: ParallelMesh) -> list[dict]:
    from flux_workload import _references

    model = build_flux(FLUX_DEV, device, torch.bfloat16)
    rows = []
    options = _compile_options(args)
    compiled: str | None = None

    def compile_as(kind: str) -> None:
        nonlocal compiled
        if compiled != kind:
            for block in (*model.transformer_blocks, *model.single_transformer_blocks):
                block._compiled_call_impl = None  # undo an earlier compile (torch keeps it on the module)
            model.compile_repeated_blocks(fullgraph=kind == "ours", dynamic=False, options=options or None)
            compiled = kind

    refs = {}
    for size in args.sizes:
        inputs = flux_inputs(FLUX_DEV, size, 512, device, torch.bfloat16)
        plain, fp32 = _references(model, inputs, Path(args.out) / f"flux_ref_dev_{size}.pt")
        refs[size] = inputs, fp32, (plain.float() - fp32.float()).abs().max().item()
        del plain
    for name in args.rows:  # rows outside sizes: each compiled kind is built once (and once more per size)
        kind, mode = name.split("-", 1)
        if mode != "eager":
            compile_as(kind)
        for size, (inputs, fp32, ref_err) in refs.items():
            runner: Callable[..., Any] = model
            if kind == "ours":
                parallelize_flux(model, mesh, cuda_graph=mode == "compiled+graph")
            elif mode == "compiled+graph":
                runner = CudaGraphed(model)
            try:
                row = measure(name, lambda r=runner, i=inputs: r(**i), fp32, ref_err, args)
            finally:
                if kind == "ours":
                    unparallelize_flux(model)
            rows.append({"model": "flux", "size": size, **row})
            report(args.label, rows[-1])
    return rows


def stdit_rows(args: argparse.Namespace, device: torch.device, mesh: ParallelMesh) -> list[dict]:
    from stdit_workload import _reference

    config = CONFIGS["xl"]
    model = build_stdit(config, device, torch.bfloat16)
    inputs = stdit_inputs(config, tuple(args.latent), device, torch.bfloat16)
    cache = Path(args.out) / f"stdit_ref_xl_{'x'.join(map(str, args.latent))}.pt"
    fp32, ref_err = _reference(model, inputs, cache, 1)
    rows = []
    compiled = False
    for name in args.rows:
        kind, mode = name.split("-", 1)
        if mode == "compiled+graph":  # a 1-2 s step has no launch overhead to remove
            print(f"{args.label:<6} stdit  {name}: skipped (CUDA graphs are timed for FLUX only)", flush=True)
            continue
        if mode == "compiled" and not compiled:
            if hasattr(model, "compile_repeated_blocks"):
                model.compile_repeated_blocks(dynamic=False, options=_compile_options(args) or None)
            else:  # an older library: the blocks one by one
                for block in (*model.spatial_blocks, *model.temporal_blocks):
                    block.compile(dynamic=False)
            compiled = True
        if kind == "ours":
            parallelize_stdit(model, mesh)
        try:
            row = measure(name, lambda: model(**inputs), fp32, ref_err, args)
        finally:
            if kind == "ours":
                unparallelize_stdit(model)
        rows.append({"model": "stdit", "size": "x".join(map(str, args.latent)), **row})
        report(args.label, rows[-1])
    return rows


def report(label: str, row: dict) -> None:
    split = row.get("kernels_ms")
    where = ""
    if split:
        where = (
            "  gemm {gemm:.1f} attn {attention:.1f} other {other:.1f}".format(**split) + f" idle {row['idle_ms']:.1f}"
        )
    print(
        f"{label:<6} {row['model']:<6} {row['size']!s:<10} {row['row']:<22} {row['ms']:9.2f} ms  "
        f"err {row['max_err']:.3g} (bf16 {row['ref_err']:.3g}{'' if row['ok'] else ' FAIL'}){where}",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="the library version's name in the results")
    p.add_argument("--model", choices=("flux", "stdit"), default="flux")
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048], help="FLUX image sides in pixels")
    p.add_argument("--latent", type=int, nargs=3, default=[30, 90, 160], help="STDiT3 latent T H W (720p 4 s)")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), metavar="ROW", help=f"of {ROWS}")
    p.add_argument("--reps", type=int, default=None, help="timed steps (default FLUX 10, STDiT3 3)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="also split one step's kernel time by family")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=JSON", help="inductor option")
    p.add_argument("--out", default="results/step")
    args = p.parse_args()
    args.reps = args.reps or (10 if args.model == "flux" else 3)
    ctx = init_distributed()
    print(f"{args.label}: library at {Path(models.__file__).resolve().parent.parent}", flush=True)
    mesh = ParallelMesh.build(ulysses=1)
    with torch.no_grad():
        rows = (flux_rows if args.model == "flux" else stdit_rows)(args, ctx.device, mesh)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "step_bench.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps({"label": args.label, "gpu": torch.cuda.get_device_name(), **row}) + "\n")


if __name__ == "__main__":
    main()
