#!/usr/bin/env bash
# One run on an accelerator machine: GPU tests (1 GPU, then torchrun on 2 and N GPUs), then the attention
# sweep on 1, 2 and N GPUs (override: WORLDS="1 2 3 4", PARITY_WORLDS="4"). Everything is logged to
# $OUT/log.txt; the sweep's table, CSV, JSON and plot land in $OUT. Usage (from the repo root, wheels from ../shared/gpu/fetch_wheels.sh fa3 in .whl/):
#   bash benchmarks/gpu_run.sh [extra sweep args...]
set -u
. benchmarks/gpu_env.sh
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvidia-smi topo -m
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpus', torch.cuda.device_count())"
  python3 -c "
import torch
from attention import AttentionCall, available_backends
from attention.backends import BACKENDS
c = AttentionCall(torch.device('cuda'), torch.bfloat16, 128, False)
for b in BACKENDS: print(' backend', b.name, '->', b.why_not(c) or 'ok')"
  echo "== single-GPU backend tests"
  timeout 300 python3 -m pytest tests/test_backends.py -m gpu -q -p no:cacheprovider --tb=short 2>&1 | tail -25
  for n in ${PARITY_WORLDS:-2 $N}; do
    echo "== multi-GPU parity tests on $n GPUs"
    timeout 300 torchrun --nproc_per_node "$n" --local-ranks-filter 0 -m pytest tests/test_gpu_parallel.py -q \
      -p no:cacheprovider --tb=short 2>&1 | grep -v "^W1\|warn" | tail -40
  done
  rm -rf /tmp/sweep
  for n in ${WORLDS:-1 2 $N}; do
    echo "== sweep on $n GPU(s)"
    timeout 400 torchrun --nproc_per_node "$n" benchmarks/sweep.py --out /tmp/sweep "$@" 2>&1 | grep -v "^W1\|warn"
  done
  python3 benchmarks/sweep.py --report /tmp/sweep
} 2>&1 | tee "$OUT/log.txt"
cp /tmp/sweep/sweep.json /tmp/sweep/sweep.csv /tmp/sweep/sweep.txt /tmp/sweep/speedup.png "$OUT"/ 2>/dev/null
exit 0
