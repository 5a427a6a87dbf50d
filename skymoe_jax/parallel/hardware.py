"""Facts about the accelerators, in one table: peak FLOP/s per device kind, HBM per TPU chip.

Figures are vendor data-sheet numbers (dense bf16); the MFU the trainer logs divides by them, and
the AOT report compares its memory totals with the HBM sizes.
"""
import time

import jax
import jax.numpy as jnp

GiB = 1024 ** 3

# Peak dense bf16 FLOP/s per device by jax device_kind prefix (vendor data sheets), for MFU.
PEAK_FLOPS = {'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
              'TPU v5': 459e12, 'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
              'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA A100': 312e12}

# HBM per chip in GiB by TPU generation (the topology name's prefix): the Cloud TPU system
# architecture figures (v4 32, v5e 16, v5p 95, v6e/Trillium 32), read as GiB. Where a figure is
# meant as 10^9 bytes the chip has ~7% less (v5p: 88.5 GiB); a total near the limit is no proof.
HBM_PER_CHIP_GIB = {'v4': 32, 'v5e': 16, 'v5p': 95, 'v6e': 32}


def peak_flops_per_device() -> float:
  """Peak FLOP/s of one device: the data-sheet table, or on CPU a measured fp32 matmul rate."""
  kind = jax.devices()[0].device_kind
  for prefix, flops in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  start, reps = time.perf_counter(), 10
  for _ in range(reps):
    a = matmul(a)
  a.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - start) / jax.local_device_count()
