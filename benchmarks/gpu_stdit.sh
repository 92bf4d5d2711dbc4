#!/usr/bin/env bash
# One STDiT3-XL/2 step (720p 4 s, CFG pair) on 1, 2 and N GPUs (override: WORLDS="1 2 4"). Logs to
# $OUT/log.txt, the merged table to $OUT. Usage (from the repo root, wheels in .whl/):
#   bash benchmarks/gpu_stdit.sh [extra sweep args...]
set -u
. benchmarks/gpu_env.sh
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__)"
  rm -rf /tmp/stdit
  for n in ${WORLDS-1 2 $N}; do
    echo "== stdit step on $n GPU(s)"
    timeout ${WORLD_TIMEOUT:-300} torchrun --nproc_per_node "$n" benchmarks/sweep.py --workloads stdit --out /tmp/stdit "$@" \
      2>&1 | grep -v "^W1\|warn\|Warn"
    cp /tmp/stdit/world_"$n".json "$OUT"/stdit_world_"$n".json 2>/dev/null
  done
  python3 benchmarks/sweep.py --report /tmp/stdit
} 2>&1 | tee "$OUT/log.txt"
cp /tmp/stdit/sweep.txt "$OUT"/ 2>/dev/null
exit 0
