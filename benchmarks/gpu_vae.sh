#!/usr/bin/env bash
# The VAE decode on 1, 2 and N GPUs (override: WORLDS="1 2 4"; WORLDS="" skips it), then, with
# LARGEST="12288 16384", each of those sizes alone on N GPUs (slabs only, no reference, one timed
# decode) to find the largest that decodes.
# Logs to $OUT/log.txt, the merged table to $OUT. Usage (from the repo root, wheels in .whl/):
#   bash benchmarks/gpu_vae.sh [extra sweep args...]
set -u
. benchmarks/gpu_env.sh
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
  rm -rf /tmp/vae
  for n in ${WORLDS-1 2 $N}; do
    echo "== vae decode on $n GPU(s)"
    sizes=2048,4096
    [ "$n" = "$N" ] && sizes=2048,4096,8192
    timeout ${WORLD_TIMEOUT:-300} torchrun --nproc_per_node "$n" benchmarks/sweep.py --workloads vae --out /tmp/vae \
      --vae-sizes "$sizes" "$@" 2>&1 | grep -v "^W1\|warn\|Warn"
    cp /tmp/vae/world_"$n".json "$OUT"/ 2>/dev/null
  done
  for size in ${LARGEST:-}; do
    echo "== vae decode of ${size}² on $N GPUs"
    mkdir -p /tmp/vae_large_$size
    timeout ${LARGE_TIMEOUT:-300} torchrun --nproc_per_node "$N" benchmarks/sweep.py --workloads vae \
      --out /tmp/vae_large_$size --vae-sizes "$size" --vae-reps 1 --no-vae-whole-bands "$@" 2>&1 | grep -v "^W1\|warn\|Warn" | tail -5
    cp /tmp/vae_large_$size/world_"$N".json "$OUT"/large_"$size".json 2>/dev/null
  done
  python3 benchmarks/sweep.py --report /tmp/vae
} 2>&1 | tee "$OUT/log.txt"
cp /tmp/vae/sweep.txt "$OUT"/ 2>/dev/null
exit 0
