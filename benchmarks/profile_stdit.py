"""Where one STDiT3-XL/2 step goes on one GPU: the CUDA kernels of one forward of the CFG pair, grouped.

    python benchmarks/profile_stdit.py --latent 30 90 160      # 720p 4 s

Prints the step time (median of 3), the top kernels by total GPU time and the share of each kernel
family (GEMMs, attention, normalisation, elementwise, copies), from ``torch.profiler``.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from stdit_workload import build_stdit, stdit_inputs
from torch.profiler import ProfilerActivity, profile

from models.stdit import STDiT3Config

FAMILIES = {
    "gemm": ("gemm", "cutlass", "sm90_xmma", "nvjet", "cublas"),
    "attention": ("flash", "fmha", "attention", "cudnn"),
    "norm": ("norm", "layer_norm", "welford"),
    "copy": ("copy", "transpose", "permute", "cat", "index"),
    "elementwise": ("elementwise", "vectorized", "reduce", "unrolled"),
}


def family(name: str) -> str:
    low = name.lower()
    return next((f for f, keys in FAMILIES.items() if any(k in low for k in keys)), "other")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--latent", type=int, nargs=3, default=(30, 90, 160))
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    device = torch.device("cuda")
    model = build_stdit(STDiT3Config(), device, torch.bfloat16)
    inputs = stdit_inputs(model.config, tuple(args.latent), device, torch.bfloat16)
    times = []
    with torch.no_grad():
        for _ in range(4):
            torch.cuda.synchronize()
            start = time.perf_counter()
            model(**inputs)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
            model(**inputs)
            torch.cuda.synchronize()
    print(f"step: {sorted(times[1:])[1] * 1e3:.1f} ms (median of 3)")
    kernels = [e for e in prof.key_averages() if e.device_type.name == "CUDA"]
    total = sum(e.self_device_time_total for e in kernels)
    shares = defaultdict(float)
    for e in kernels:
        shares[family(e.key)] += e.self_device_time_total
    print(f"GPU kernel time {total / 1e3:.1f} ms; by family: " + ", ".join(
        f"{f} {t / total:.0%}" for f, t in sorted(shares.items(), key=lambda kv: -kv[1])))  # fmt: skip
    for e in sorted(kernels, key=lambda e: -e.self_device_time_total)[: args.top]:
        print(f"{e.self_device_time_total / 1e3:9.1f} ms {e.count:6d}x  {family(e.key):11s} {e.key[:110]}")
    print("operators (with input shapes) by the GPU time of their own kernels:")
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.device_type.name == "CPU"]
    for e in sorted(ops, key=lambda e: -e.self_device_time_total)[: args.top]:
        print(f"{e.self_device_time_total / 1e3:9.1f} ms {e.count:6d}x  {e.key[:40]:40s} {str(e.input_shapes)[:90]}")


if __name__ == "__main__":
    main()
