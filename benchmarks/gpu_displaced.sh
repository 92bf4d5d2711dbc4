#!/usr/bin/env bash
# Displaced (stale-KV) patch parallelism, quality on one GPU: train the quality harness's small FLUX-architecture
# model (benchmarks/quality/train.py, TRAIN_S seconds, default 420; skipped when $MODEL already holds one), then
# benchmarks/quality/displaced.py: PSNR/SSIM of the simulated displaced images against the exact ones for 2 and 4
# patches, warm-up 1, 2 and 4, both text modes. Writes $OUT/log.txt and $OUT/displaced_quality.jsonl (the weights
# go to ${MODEL:-/tmp/quality_model}, kept off $OUT). PSNR/SSIM need torchmetrics: carry its wheels, from the repo
# root: ../shared/gpu/fetch_wheels.sh torchmetrics lightning-utilities
# Usage (from the repo root): bash benchmarks/gpu_displaced.sh [extra displaced.py args...]
set -u
. benchmarks/gpu_env.sh
MODEL="${MODEL:-/tmp/quality_model}"
set -o pipefail
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
  metrics=()
  python3 -c "import torchmetrics" 2>/dev/null || { echo "torchmetrics is missing: --no-metrics"; metrics=(--no-metrics); }
  if [ ! -f "$MODEL/text_encoder.json" ]; then
    echo "== train"
    python3 benchmarks/quality/train.py --out "$MODEL" --time-limit-s "${TRAIN_S:-420}" || exit 1
  fi
  cp "$MODEL/text_encoder.json" "$OUT/model.json"
  echo "== displaced quality"
  timeout "${QUALITY_TIMEOUT:-900}" python3 benchmarks/quality/displaced.py --model "$MODEL" \
    --out "$OUT/displaced_quality.jsonl" ${metrics[@]+"${metrics[@]}"} "$@"
} 2>&1 | tee "$OUT/log.txt"
