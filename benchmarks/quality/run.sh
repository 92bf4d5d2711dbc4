#!/usr/bin/env bash
# The step-cache quality harness on one GPU: train the small FLUX-architecture model on procedural captioned
# shapes (TRAIN_S seconds of training, default 420), then sample its prompt set exactly and under each lossy
# cache configuration and compare. Writes log.txt, train.json, quality.json, quality.txt, quality.png and
# samples.png to $OUT/quality (the weights to ${MODEL:-/tmp/quality_model}, kept off $OUT: they need not come back).
# PSNR/SSIM need torchmetrics: carry its wheels, from the repo root:
#   ../shared/gpu/fetch_wheels.sh torchmetrics lightning-utilities
# Usage (from the repo root): bash benchmarks/quality/run.sh [extra evaluate.py args...]
set -u
. benchmarks/gpu_env.sh
Q="$OUT/quality"
MODEL="${MODEL:-/tmp/quality_model}"
mkdir -p "$Q"
set -o pipefail
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)"
  python3 -c "import torchmetrics; print('torchmetrics', torchmetrics.__version__)" \
    || echo "torchmetrics is missing: evaluating with --no-metrics (no PSNR/SSIM)"
  echo "== train"
  python3 benchmarks/quality/train.py --out "$MODEL" --time-limit-s "${TRAIN_S:-420}" || exit 1
  cp "$MODEL/train.json" "$Q/"
  echo "== evaluate"
  metrics=()
  python3 -c "import torchmetrics" 2>/dev/null || metrics=(--no-metrics)
  python3 benchmarks/quality/evaluate.py --model "$MODEL" --out "$Q" ${metrics[@]+"${metrics[@]}"} "$@"
} 2>&1 | tee "$Q/log.txt"
