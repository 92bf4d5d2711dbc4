# Sourced by the GPU run scripts: the environment every multi-GPU run needs, and the carried wheels
# (../shared/gpu/fetch_wheels.sh fa3 puts diffusers and FA3 in .whl/) installed under /tmp/site.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
OUT=${OUT:-results/gpu}
mkdir -p "$OUT"
N=$(nvidia-smi -L | wc -l)
