#!/usr/bin/env bash
# The seam benchmark on one GPU: benchmarks/seam_overhead.py on an old commit's library and on this
# working tree, alternating, in one run. Before the run (here, with git):
#   git archive -o .whl/seam_old.tar <old commit>     # .whl/ travels with `carry`
# Usage: MODELS="flux stdit" ROUNDS=2 bash benchmarks/gpu_seam.sh [extra seam_overhead.py args...]
set -u
. benchmarks/gpu_env.sh
OLD=/tmp/seam_old
rm -rf "$OLD" && mkdir -p "$OLD" && tar -xf .whl/seam_old.tar -C "$OLD" || exit 1
SITE=${PYTHONPATH%%:*}
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  for model in ${MODELS:-flux stdit}; do
    for round in $(seq "${ROUNDS:-2}"); do
      for label in old new; do
        lib=$PWD; [ "$label" = old ] && lib=$OLD
        echo "== $model round $round: $label"
        PYTHONPATH=$SITE:$lib timeout 560 torchrun --nproc_per_node 1 benchmarks/seam_overhead.py --label "$label" \
          --model "$model" --out "$OUT" "$@" 2>&1 | grep -v "^W1\|warn"
      done
    done
  done
} 2>&1 | tee "$OUT/log.txt"
exit 0
