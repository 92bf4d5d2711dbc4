#!/usr/bin/env bash
# Open-Sora 1.2 on GPUs (benchmarks/opensora_bench.py): the 720p 4 s VAE decode and the whole pipeline.
# RUNS lists "GPUs:arguments" runs separated by "|" (default: 1 GPU and all GPUs, VAE + 360p + 720p);
# world 1 must run --vae before larger worlds do (it computes the float32 reference). Logs to
# $OUT/log.txt, JSON rows to $OUT. Usage (from the repo root, wheels in .whl/):
#   RUNS="1:--vae --pipeline 360p|4:--vae --pipeline 360p 720p" bash benchmarks/gpu_opensora.sh
set -u
. benchmarks/gpu_env.sh
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__)"
  IFS='|' read -ra runs <<< "${RUNS:-1:--vae --pipeline 360p 720p|$N:--vae --pipeline 360p 720p}"
  for run in "${runs[@]}"; do
    n=${run%%:*}
    echo "== $n GPU(s): ${run#*:}"
    # shellcheck disable=SC2086
    timeout ${RUN_TIMEOUT:-400} torchrun --nproc_per_node "$n" benchmarks/opensora_bench.py --out /tmp/opensora ${run#*:} \
      2>&1 | grep -v "^W1\|warn\|Warn\|it/s\]"
  done
} 2>&1 | tee "$OUT/log.txt"
cp /tmp/opensora/*.json "$OUT"/ 2>/dev/null
exit 0
