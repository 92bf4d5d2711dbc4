#!/usr/bin/env bash
# CPU offload on one GPU (benchmarks/offload_bench.py): the FLUX.1-dev pipeline at 1024², 28 steps, resident vs
# model (ours and diffusers') vs layerwise (prefetch) offload, then resident vs sequential at 4 steps;
# Open-Sora 720p 4 s (10 steps), every mode. Wheels: ../shared/gpu/fetch_wheels.sh fa3 accelerate psutil pyyaml (into .whl/, carried).
# Usage: PARTS="flux opensora" bash benchmarks/gpu_offload.sh     (results in $OUT)
set -u
. benchmarks/gpu_env.sh
run() { timeout "$1" torchrun --nproc_per_node 1 benchmarks/offload_bench.py "${@:2}" --out "$OUT" 2>&1 | grep -v "^W1\|warn"; }
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'accelerate', accelerate.__version__)"
  echo "== tests/test_gpu_offload.py: every mode onto the GPU equals resident (tiny pipelines)"
  timeout 240 torchrun --nproc_per_node 1 -m pytest tests/test_gpu_offload.py -q -p no:cacheprovider --tb=short 2>&1 | tail -15
  for part in ${PARTS:-flux opensora}; do
    case "$part" in
      flux)
        echo "== FLUX.1-dev pipeline 1024², 28 steps"
        run 480 --model flux --modes resident model diffusers-model layerwise --steps 28
        echo "== FLUX.1-dev pipeline 1024², 4 steps: sequential"
        run 240 --model flux --modes resident sequential --steps 4 --warmup-steps 1 ;;
      opensora)
        echo "== Open-Sora 720p 4 s, 10 steps"
        run 560 --model opensora --steps 10 --warmup-steps 1 ;;
    esac
  done
} 2>&1 | tee -a "$OUT/log.txt"
exit 0
