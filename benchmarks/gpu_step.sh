#!/usr/bin/env bash
# The one-GPU speed work, in one run of parts: probe (benchmarks/kernel_probe.py); stdit and flux
# (benchmarks/step_bench.py on this working tree, label "new", and, when .whl/step_old.tar holds an older commit,
# on that one, "old"); flux-pipeline and opensora (the two pipelines end to end, compiled); check (the regression
# baselines, benchmarks/gpu_check.sh).
# Before the run (here, with git):
#   git archive -o .whl/step_old.tar <old commit>     # .whl/ travels with `carry`
#   ../shared/gpu/fetch_wheels.sh fa3                  # diffusers and FlashAttention-3's forward
# Usage: PARTS="probe stdit flux flux-pipeline opensora check" bash benchmarks/gpu_step.sh [step_bench.py args...]
#   (results in $OUT)
#   OLD_ROWS="plain-eager ..." limits the old library's rows (step_bench.py --rows)
#   CLOCKS=1 samples the GPU's SM clock, power and clock-event reasons every 50 ms and reports them per row
#   (benchmarks/clocks_report.py)
set -u
. benchmarks/gpu_env.sh
SITE=${PYTHONPATH%%:*}
OLD=/tmp/step_old
LABELS=new
if [ -f .whl/step_old.tar ]; then
  rm -rf "$OLD" && mkdir -p "$OLD" && tar -xf .whl/step_old.tar -C "$OLD" && LABELS="old new"
fi
if [ "${CLOCKS:-0}" = 1 ]; then
  reasons=clocks_event_reasons.active
  nvidia-smi --query-gpu=$reasons --format=csv >/dev/null 2>&1 || reasons=clocks_throttle_reasons.active
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,power.limit,$reasons --format=csv,noheader,nounits \
    -lms 50 > "$OUT/clocks.csv" &
  SAMPLER=$!
fi
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
  for part in ${PARTS:-probe stdit flux flux-pipeline opensora check}; do
    echo "== $part"
    case $part in
      probe) timeout 300 python3 benchmarks/kernel_probe.py --out "$OUT"; continue ;;
      flux-pipeline)  # the FLUX.1-dev pipeline end to end, blocks compiled, on one GPU
        timeout "${PART_TIMEOUT:-900}" torchrun --nproc_per_node 1 benchmarks/pipeline_bench.py --compile --reps 2 \
          --out "$OUT/flux_pipeline" 2>&1 | grep -v "^W1\|warn"; continue ;;
      opensora)  # Open-Sora 1.2 720p 4 s end to end, STDiT3's blocks compiled, on one GPU
        timeout "${PART_TIMEOUT:-900}" torchrun --nproc_per_node 1 benchmarks/opensora_bench.py --pipeline 720p \
          --compile --out "$OUT/opensora" 2>&1 | grep -v "^W1\|warn"; continue ;;
      check) timeout "${PART_TIMEOUT:-900}" bash benchmarks/gpu_check.sh; continue ;;
    esac
    for label in $LABELS; do
      lib=$PWD; rows=(); [ "$label" = old ] && lib=$OLD && [ -n "${OLD_ROWS:-}" ] && rows=(--rows $OLD_ROWS)
      PYTHONPATH=$SITE:$lib timeout "${PART_TIMEOUT:-900}" torchrun --nproc_per_node 1 benchmarks/step_bench.py \
        --label "$label" --model "$part" --profile --out "$OUT" "$@" "${rows[@]}" 2>&1 | grep -v "^W1\|warn"
    done
  done
  if [ "${CLOCKS:-0}" = 1 ]; then
    kill "$SAMPLER"
    python3 benchmarks/clocks_report.py "$OUT/clocks.csv" "$OUT/step_bench.jsonl"
  fi
} 2>&1 | tee -a "$OUT/step.log"
exit 0
