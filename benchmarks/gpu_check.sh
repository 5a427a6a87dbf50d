#!/usr/bin/env bash
# One run on a lent GPU machine (its image has jax, flax, optax, torch, transformers; carry
# ml_collections as a wheel in .whl/). Runs the MoE and model tests on the GPU, then the MoE
# layer benchmark. Usage (from the repo root, on that machine): bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
# fp32 parity tolerances need full-precision matmuls (GPU default is TF32).
JAX_PLATFORMS=cuda JAX_DEFAULT_MATMUL_PRECISION=highest timeout 300 \
  python3 -m pytest -q -p no:cacheprovider tests/test_moe.py tests/test_model.py 2>&1 | tail -25
JAX_PLATFORMS=cuda timeout 240 python3 benchmarks/moe_layer.py --out="$OUT/moe_layer_gpu.json" \
  --shapes=demo,large 2>&1 | tail -30
