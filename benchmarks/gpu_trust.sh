#!/usr/bin/env bash
# The trust fixes on GPUs: the strided-input backend tests (1 GPU), the multi-GPU parity tests (cross-attention,
# the lse, the rank-agreement check over NCCL, every mesh with and without a PeerExchange), then what the
# rank-agreement check costs (benchmarks/check_overhead.py) on 1 and N GPUs. Logs to $OUT/log.txt.
# Usage (from the repo root, wheels from ../shared/gpu/fetch_wheels.sh fa3 in .whl/):
#   bash benchmarks/gpu_trust.sh
set -u
. benchmarks/gpu_env.sh
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch, diffusers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'diffusers', diffusers.__version__)"
  echo "== single-GPU backend tests (strided inputs, the flash-attention rule)"
  timeout 300 python3 -m pytest tests/test_strides.py tests/test_backends.py -m gpu -q -p no:cacheprovider --tb=short 2>&1 | tail -15
  for n in ${PARITY_WORLDS:-$N}; do
    echo "== multi-GPU parity tests on $n GPUs"
    timeout 400 torchrun --nproc_per_node "$n" --local-ranks-filter 0 -m pytest tests/test_gpu_parallel.py -q \
      -p no:cacheprovider --tb=short 2>&1 | grep -v "^W1\|warn" | tail -30
  done
  for n in ${WORLDS:-1 $N}; do
    echo "== check overhead on $n GPU(s)"
    timeout 300 torchrun --nproc_per_node "$n" benchmarks/check_overhead.py --out "$OUT" 2>&1 | grep -v "^W1\|warn"
  done
} 2>&1 | tee "$OUT/log.txt"
exit 0
