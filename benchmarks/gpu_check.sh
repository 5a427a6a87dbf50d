#!/usr/bin/env bash
# One run on a lent H100/H200, about 8 minutes: the kernel tests on the GPU, then
#   1. the MoE layer forward + backward in bf16: the ragged backend with the Triton grouped-matmul
#      kernels (ragged_impl=triton, what 'auto' picks on a GPU) against jax.lax.ragged_dot and a
#      dense FFN of equal active FLOPs (and HF Mixtral in torch);
#   2. the attention kernels, forward + backward at the 7B shape (xla, cudnn, tokamax);
#   3. the configs/gpu_1b.py train step (1.5B active, bf16, attention and MoE kernels by 'auto'):
#      MFU against the H200's data-sheet bf16 peak (target >= 35%), and the small demo/large steps.
# JSON results land in $OUT (default benchmarks/results/gpu_check/); the timings of each stage are
# printed, with a `timeout` on each so that one slow stage cannot eat the others' time.
#
# The machine's image has CUDA jax/jaxlib, flax, optax, torch and transformers, and reaches no
# package index. The `gpu` extra (jax[cuda12], ~1 GB of CUDA wheels) is more than a run may
# carry, so the image's jax is used and its version is printed; the pure-Python wheels the image
# lacks travel in .whl/ (ml_collections), the baseline backends.py in .gpu/ (the package is not
# installed there: PYTHONPATH below puts the repository root on the path):
#   mkdir -p .whl .gpu
#   pip download --no-deps -d .whl ml_collections==1.1.0
#   git show REV:skymoe_jax/model/moe/backends.py > .gpu/baseline_backends.py   (optional)
# Usage (repo root, on that machine): bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda
# torch and jax share the card: no up-front grab of 75% of it by jax.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
stage() { echo "=== $(date +%T) $*"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -c "import jax, flax, optax, torch, transformers; print('jax', jax.__version__, 'flax', \
flax.__version__, 'optax', optax.__version__, 'torch', torch.__version__, 'transformers', \
transformers.__version__, jax.devices())"
BASELINE=()
[ -f .gpu/baseline_backends.py ] && BASELINE=(--baseline_backends=.gpu/baseline_backends.py)

# --- The kernel tests (grouped matmul, attention) and the MoE tests, on the GPU.
# fp32 parity tolerances need full-precision matmuls (the GPU default is TF32).
stage "kernel and MoE tests"
JAX_DEFAULT_MATMUL_PRECISION=highest timeout 90 python3 -m pytest -q -p no:cacheprovider \
  tests/test_moe.py tests/test_grouped_matmul.py tests/test_attention_kernels.py 2>&1 | tail -5

# --- MoE layer, bf16: the GPU ragged_impl (triton) vs ragged_dot vs the dense FFN.
stage "MoE layer fwd+bwd, bf16"
timeout 120 python3 benchmarks/moe_layer.py --out="$OUT/moe_layer_gpu.json" --shapes=large \
  --dtypes=bfloat16 --backends=ragged,dense --ragged_impls=triton,ragged_dot \
  --torch_impls=grouped_mm "${BASELINE[@]}" 2>&1 | grep -v Warning

# --- Attention kernels (attention_kernels.benchmark), ms per forward + backward.
stage "attention kernels fwd+bwd, bf16, 4 x 2048 x 32 heads"
timeout 45 python3 - "$OUT/attention_gpu.json" <<'PY'
import json, sys
import jax
from skymoe_jax.model import attention_kernels
result = {'device': jax.devices()[0].device_kind, 'ms_fwd_bwd': attention_kernels.benchmark()}
print(result)
json.dump(result, open(sys.argv[1], 'w'), indent=1)
PY

# --- The gpu_1b train step (MFU), then the small configs for comparison with earlier runs.
stage "train step gpu_1b"
timeout 180 python3 benchmarks/train_step.py --out="$OUT/train_step_gpu_1b.json" \
  --configs=gpu_1b --steps=8 --warmup=2 --profile_steps=0 2>&1 | tail -6
stage "train step demo, large (bf16)"
timeout 45 python3 benchmarks/train_step.py --out="$OUT/train_step_gpu.json" \
  --configs=demo,large --steps=10 --dtype=bfloat16 --profile_steps=0 2>&1 | tail -4
stage "done"
