#!/usr/bin/env bash
# One run on a lent H100/H200, at most 8 minutes: the MoE tests on the GPU, then benchmarks 1-3
# (MoE layer vs dense / HF Mixtral in torch / matmul peak, with the accelerator ragged
# implementations and the previous dispatch code as a before/after baseline; the full train step
# in bf16; generation with and without the KV cache). JSON results land in $OUT. The block loop
# (ragged_impl=blocks) is left out: on an H200 it ran 15-30x the dense FFN (a kernel launch per
# block), see results/moe_layer_h200.json.
#
# The machine's image has CUDA jax/jaxlib, flax, optax, torch and transformers, and reaches no
# package index. The `gpu` extra (jax[cuda12], ~1 GB of CUDA wheels) is more than a run may
# carry, so the image's jax is used and its version is printed; the pure-Python wheels the image
# lacks travel in .whl/ (ml_collections), the baseline backends.py in .gpu/ (the package is not
# installed there: PYTHONPATH below puts the repository root on the path):
#   mkdir -p .whl .gpu
#   pip download --no-deps -d .whl ml_collections==1.1.0
#   git show REV:skymoe_jax/model/moe/backends.py > .gpu/baseline_backends.py
#   (skymoe_jax/moe/backends.py for a REV before the package's layers)
# Usage (repo root, on that machine): bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
# torch and jax share the card: no up-front grab of 75% of it by jax.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', \
transformers.__version__, jax.devices())"
BASELINE=()
[ -f .gpu/baseline_backends.py ] && BASELINE=(--baseline_backends=.gpu/baseline_backends.py)

# fp32 parity tolerances need full-precision matmuls (the GPU default is TF32).
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 100 \
  python3 -m pytest -q -p no:cacheprovider tests/test_moe.py 2>&1 | tail -5
# Full fp32 on both sides (torch's fp32 matmuls are; jax's GPU default is TF32).
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 200 python3 benchmarks/moe_layer.py \
  --out="$OUT/moe_layer_gpu.json" --shapes=demo,large --dtypes=bfloat16,float32 --backends=ragged,capacity,dense \
  --ragged_impls=ragged_dot,batched "${BASELINE[@]}" 2>&1 | grep -v Warning
timeout 90 python3 benchmarks/train_step.py --out="$OUT/train_step_gpu.json" \
  --configs=demo,large --steps=10 --dtype=bfloat16 --profile_steps=0 2>&1 | tail -8
# Greedy tokens of the two paths must agree: full-precision matmuls again.
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 120 python3 benchmarks/generation.py \
  --out="$OUT/generation_gpu.json" --batches=1,8 --repeats=3 2>&1 | tail -8
