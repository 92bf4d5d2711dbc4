#!/usr/bin/env bash
# The FLUX transformer step on 1, 2 and N GPUs (override: WORLDS="1 2 4"; COMPILE_WORLDS="1 4" also
# time regional torch.compile there). Logs to $OUT/log.txt, the merged table and plot to $OUT.
# Usage (from the repo root, wheels from ../shared/gpu/fetch_wheels.sh fa3 in .whl/):
#   bash benchmarks/gpu_flux.sh [extra sweep args...]
set -u
. benchmarks/gpu_env.sh
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
  rm -rf /tmp/flux
  for n in ${WORLDS:-1 2 $N}; do
    echo "== flux step on $n GPU(s)"
    compile=--no-flux-compile
    case " ${COMPILE_WORLDS:-1 $N} " in *" $n "*) compile=--flux-compile ;; esac
    timeout ${WORLD_TIMEOUT:-300} torchrun --nproc_per_node "$n" benchmarks/sweep.py --workloads flux --out /tmp/flux $compile "$@" \
      2>&1 | grep -v "^W1\|warn\|Warn"
    cp /tmp/flux/world_"$n".json "$OUT"/ 2>/dev/null  # what finished survives a later timeout
  done
  python3 benchmarks/sweep.py --report /tmp/flux
} 2>&1 | tee "$OUT/log.txt"
cp /tmp/flux/sweep.json /tmp/flux/sweep.txt /tmp/flux/speedup.png "$OUT"/ 2>/dev/null
exit 0
