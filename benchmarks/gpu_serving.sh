#!/usr/bin/env bash
# The server on one GPU (benchmarks/serving_bench.py): the FLUX.1-dev pipeline (random, bf16) served over HTTP
# by the code `xdit serve` runs, measured by `xdit bench` beside direct pipeline calls in the same process.
# Wheels: ../shared/gpu/fetch_wheels.sh fa3 plus the serving stack (docs/serving.md lists it), carried in .whl/.
# Usage: PARTS="overhead batching" bash benchmarks/gpu_serving.sh; PARTS=sweep bash benchmarks/gpu_serving.sh
set -u
. benchmarks/gpu_env.sh
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, fastapi, uvicorn; print('torch', torch.__version__, 'fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__)"
  timeout 560 python3 benchmarks/serving_bench.py --parts ${PARTS:-overhead batching sweep} ${EXTRA:-} --out "$OUT" 2>&1 \
    | grep -v "^W1\|warn\|INFO:"
} 2>&1 | tee -a "$OUT/log.txt"
exit 0
