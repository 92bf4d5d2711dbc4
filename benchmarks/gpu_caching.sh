#!/usr/bin/env bash
# Step caching on one GPU: the FLUX.1-dev-size speed run (benchmarks/caching_bench.py), then the quality
# harness (benchmarks/quality/run.sh: train the small model, compare every policy with the exact images).
# Wheels: ../shared/gpu/fetch_wheels.sh fa3 torchmetrics lightning-utilities (into .whl/, carried).
# Usage: bash benchmarks/gpu_caching.sh          (results in $OUT)
set -u
. benchmarks/gpu_env.sh
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  echo "== caching speed: FLUX.1-dev size, 1024², 28 steps"
  timeout "${SPEED_TIMEOUT:-240}" python3 benchmarks/caching_bench.py --out "$OUT" 2>&1 | grep -v "^W1\|warn"
  echo "== quality harness"
  timeout "${QUALITY_TIMEOUT:-480}" bash benchmarks/quality/run.sh 2>&1
} 2>&1 | tee "$OUT/log.txt"
exit 0
