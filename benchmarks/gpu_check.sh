#!/usr/bin/env bash
# Regression check on one GPU: rerun the one-GPU workloads benchmarks/baselines.json lists (the FLUX.1-dev step
# at 1024² and 2048², eager and compiled, plain and through parallelize_flux; the STDiT3 720p 4 s step, eager and
# compiled) and compare them with it
# (benchmarks/baselines.py). Exit status 1 when a figure regressed past its tolerance, failed parity, or was not
# measured. Wheels: ../shared/gpu/fetch_wheels.sh fa3 (into .whl/, carried).
# Usage: bash benchmarks/gpu_check.sh     (results in $OUT/check)
set -u
. benchmarks/gpu_env.sh
R="$OUT/check"
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  timeout 900 torchrun --nproc_per_node 1 benchmarks/sweep.py --workloads flux,stdit --flux-sizes 1024,2048 \
    --flux-compile --stdit-compile --no-flux-baselines --out "$R" 2>&1 | grep -v "^W1"
  python3 benchmarks/sweep.py --report "$R" --check benchmarks/baselines.json
} 2>&1 | tee "$OUT/check.log"
exit "${PIPESTATUS[0]}"
