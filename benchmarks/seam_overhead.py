"""The FLUX step at world 1 through the model adapter, for comparing two versions of the library.

Run it once per version (``PYTHONPATH`` picks the library; this script and ``flux_workload.py`` beside
it stay the same), alternating versions, and compare medians::

    PYTHONPATH=old torchrun --nproc_per_node 1 benchmarks/seam_overhead.py --label old --out results/seam
    PYTHONPATH=$PWD torchrun --nproc_per_node 1 benchmarks/seam_overhead.py --label new --out results/seam

Rows: FLUX.1-dev (random bf16 weights) at ``--size``: the plain diffusers model, and
``parallelize_flux`` on a mesh of one rank, eager and with ``cuda_graph=True``; optionally
(``--compile``) with the blocks compiled (``compile_repeated_blocks``). Median of ``--reps`` timed
steps after warm-up; every parallel output is compared with the plain model's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from flux_workload import FLUX_DEV, build_flux, flux_inputs  # beside this script (its folder is on sys.path)

from models import parallelize_flux, unparallelize_flux
from xdit_core import ParallelMesh, init_distributed


def _median_ms(fn, reps: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--label", required=True, help="the version's name in the results")
    p.add_argument("--size", type=int, default=1024)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--out", default="results/seam")
    args = p.parse_args()
    ctx = init_distributed()
    mesh = ParallelMesh.build(ulysses=1)
    model = build_flux(FLUX_DEV, ctx.device, torch.bfloat16)
    inputs = flux_inputs(FLUX_DEV, args.size, 512, ctx.device, torch.bfloat16)
    rows = []
    with torch.no_grad():
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
            ms = _median_ms(lambda: model(**inputs), args.reps)
            if graph is not None:
                unparallelize_flux(model)
            rows.append({"label": args.label, "variant": name, "size": args.size, "ms": ms, "max_err_vs_plain": err})
            print(f"{args.label:<6} {name:<26} {ms:9.2f} ms  err vs plain {err:.3g}", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "seam_overhead.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
