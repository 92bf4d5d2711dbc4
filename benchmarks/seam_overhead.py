"""The FLUX and STDiT3 steps at world 1 through the model adapters, for comparing two versions of the library.

Run it once per version (``PYTHONPATH`` picks the library; this script and ``flux_workload.py`` beside
it stay the same), alternating versions, and compare medians::

    PYTHONPATH=old torchrun --nproc_per_node 1 benchmarks/seam_overhead.py --label old --out results/seam
    PYTHONPATH=$PWD torchrun --nproc_per_node 1 benchmarks/seam_overhead.py --label new --out results/seam

Rows (``--model flux``): FLUX.1-dev (random bf16 weights) at ``--size``: the plain diffusers model,
and ``parallelize_flux`` on a mesh of one rank, eager and with ``cuda_graph=True``; optionally
(``--compile``) with the blocks compiled (``compile_repeated_blocks``). ``--model stdit``: STDiT3-XL
(random bf16 weights), one 720p 4 s step (the CFG pair, latents 30×90×160), plain and through
``parallelize_stdit`` on a mesh of one rank. Median of ``--reps`` timed steps after warm-up; every
parallel output is compared with the plain model's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from checks import median_ms
from flux_model import FLUX_DEV, build_flux, flux_inputs  # beside this script (its folder is on sys.path)
from stdit_workload import CONFIGS, build_stdit, stdit_inputs

import models
from models import parallelize_flux, unparallelize_flux
from models.stdit import parallelize_stdit, unparallelize_stdit
from xdit_core import ParallelMesh, init_distributed

STDIT_720P = (30, 90, 160)  # 4 s at 720p: latent frames, rows, columns


def _flux_rows(args: argparse.Namespace, device: torch.device, mesh: ParallelMesh) -> list[dict]:
    model = build_flux(FLUX_DEV, device, torch.bfloat16)
    inputs = flux_inputs(FLUX_DEV, args.size, 512, device, torch.bfloat16)
    rows = []
    plain = model(**inputs)[0]
    variants = [("plain", None), ("parallel eager", False), ("parallel cuda_graph", True)]
    if args.compile:  # after the eager rows, the blocks compiled
        variants += [("compiled plain", None), ("compiled parallel", False), ("compiled parallel cuda_graph", True)]
    for name, graph in variants:
        if name == "compiled plain":
            model.compile_repeated_blocks(dynamic=False)
        if graph is not None:
            parallelize_flux(model, mesh, cuda_graph=graph)
        err = (model(**inputs)[0].float() - plain.float()).abs().max().item()
        ms = median_ms(lambda: model(**inputs), args.reps, warmup=3)
        if graph is not None:
            unparallelize_flux(model)
        rows.append({"model": "flux", "variant": name, "size": args.size, "ms": ms, "max_err_vs_plain": err})
    return rows


def _stdit_rows(args: argparse.Namespace, device: torch.device, mesh: ParallelMesh) -> list[dict]:
    config = CONFIGS["xl"]
    model = build_stdit(config, device, torch.bfloat16)
    inputs = stdit_inputs(config, STDIT_720P, device, torch.bfloat16)
    plain = model(**inputs)
    rows = []
    for name in ("plain", "parallel eager"):
        if name != "plain":
            parallelize_stdit(model, mesh)
        err = (model(**inputs).float() - plain.float()).abs().max().item()
        ms = median_ms(lambda: model(**inputs), args.reps, warmup=2)
        if name != "plain":
            unparallelize_stdit(model)
        rows.append({"model": "stdit", "variant": name, "size": "720p 4 s", "ms": ms, "max_err_vs_plain": err})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="the version's name in the results")
    p.add_argument("--model", choices=("flux", "stdit"), default="flux")
    p.add_argument("--size", type=int, default=1024, help="FLUX image side in pixels")
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--compile", action="store_true", help="FLUX: also the compiled rows")
    p.add_argument("--out", default="results/seam")
    args = p.parse_args()
    ctx = init_distributed()
    print(f"{args.label}: library at {Path(models.__file__).resolve().parent.parent}", flush=True)
    mesh = ParallelMesh.build(ulysses=1)
    with torch.no_grad():
        rows = (_flux_rows if args.model == "flux" else _stdit_rows)(args, ctx.device, mesh)
    for row in rows:
        row["label"] = args.label
        print(
            f"{args.label:<6} {row['model']:<6} {row['variant']:<28} {row['ms']:9.2f} ms  "
            f"err vs plain {row['max_err_vs_plain']:.3g}",
            flush=True,
        )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "seam_overhead.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
