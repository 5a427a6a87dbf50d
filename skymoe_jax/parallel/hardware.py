"""Facts about the accelerators, in one table: per chip kind its peak dense bf16 FLOP/s, HBM size
and bandwidth, and inter-chip interconnect (ICI) bandwidth.

Figures are vendor data-sheet numbers, per chip; None where nothing here has needed one yet.
The MFU the trainer logs divides by the peaks, the AOT report compares its memory totals with
the HBM sizes, and the TPU projection (profiling/roofline.py) turns compiled FLOPs, HBM bytes
and ICI bytes into times with the peak and the two bandwidths.
"""
import dataclasses
import time
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One chip kind's data-sheet figures.

  device_kinds: the jax `device_kind` prefixes that are this chip (the longest match decides).
  hbm_gib: HBM per chip. ici_bidirectional_bytes_per_s: ICI sent and received per chip, all
  links together; a chip sends half of it (ici_send_bytes_per_s).
  """
  name: str
  device_kinds: Tuple[str, ...]
  peak_bf16_flops_per_s: float
  hbm_gib: Optional[int] = None
  hbm_bytes_per_s: Optional[float] = None
  ici_bidirectional_bytes_per_s: Optional[float] = None
  chips_per_host: Optional[int] = None
  host_vcpus: Optional[int] = None   # CPU cores of the host VM (input pipeline headroom)
  source: str = ''

  @property
  def ici_send_bytes_per_s(self) -> Optional[float]:
    bidirectional = self.ici_bidirectional_bytes_per_s
    return None if bidirectional is None else bidirectional / 2

  @property
  def hbm_bytes(self) -> Optional[int]:
    return None if self.hbm_gib is None else self.hbm_gib * GiB


# Keyed by TPU generation as topology names spell it ('v5p:4x4x4'), GPUs by model.
#
# Peak dense bf16 FLOP/s per chip: vendor data sheets, for MFU.
#
# HBM per chip in GiB: the Cloud TPU system architecture figures (v4 32, v5e 16, v5p 95,
# v6e/Trillium 32), read as GiB. Where a figure is meant as 10^9 bytes the chip has ~7% less
# (v5p: 88.5 GiB); a total near the limit is no proof.
#
# TPU v5p: Cloud TPU documentation, "TPU v5p" system architecture table
# (cloud.google.com/tpu/docs/v5p): peak compute per chip (bf16) 459 TFLOPs; HBM bandwidth
# 2765 GBps; bidirectional inter-chip interconnect (ICI) bandwidth per chip 1200 GBps (the older
# version of the page: "Interchip Interconnect BW 4800 Gbps", i.e. 600 GB/s, one direction). A
# chip sends at most half of the bidirectional figure, 600 GB/s, summed over its 6 torus links:
# a collective over one torus dimension uses 2 of them, so collective times from these figures
# are lower bounds. A v5p host holds 4 chips; its VM has 208 vCPUs and 448 GB RAM ("VM, host and
# slice properties" on the same page; half of each when pinned to one NUMA node).
CHIPS = {
    'v4': Chip('TPU v4', ('TPU v4',), 275e12, hbm_gib=32),
    'v5e': Chip('TPU v5e', ('TPU v5 lite', 'TPU v5e'), 197e12, hbm_gib=16),
    'v5p': Chip('TPU v5p', ('TPU v5p', 'TPU v5'), 459e12, hbm_gib=95, hbm_bytes_per_s=2765e9,
                ici_bidirectional_bytes_per_s=1200e9, chips_per_host=4, host_vcpus=208,
                source=('Cloud TPU docs, TPU v5p system architecture '
                        '(cloud.google.com/tpu/docs/v5p): 459 TFLOPs bf16, 2765 GBps HBM, '
                        '1200 GBps bidirectional ICI per chip')),
    'v6e': Chip('TPU v6e', ('TPU v6 lite', 'TPU v6e'), 918e12, hbm_gib=32),
    'h100': Chip('NVIDIA H100', ('NVIDIA H100',), 989e12),
    'h200': Chip('NVIDIA H200', ('NVIDIA H200',), 989e12),
    'a100': Chip('NVIDIA A100', ('NVIDIA A100',), 312e12),
}


def chip_of_device_kind(kind: str) -> Optional[Chip]:
  """The chip a jax device_kind names ('TPU v5 lite' -> v5e, not v5p's 'TPU v5'), else None."""
  matches = [(len(prefix), chip) for chip in CHIPS.values() for prefix in chip.device_kinds
             if kind.startswith(prefix)]
  return max(matches, key=lambda m: m[0])[1] if matches else None


def matmul_flops_per_second(dtype, n: Optional[int] = None, repeats: int = 10) -> float:
  """Measured FLOP/s of one square [n, n] @ [n, n] matmul on the default device, the median of
  `repeats` timed calls after a warm-up one: the ceiling a benchmark's own rate is judged by.

  n: 4096 on CPU, 8192 on an accelerator (4096 leaves an H200 well short of its peak).
  """
  n = n or (4096 if jax.default_backend() == 'cpu' else 8192)
  a = jnp.ones((n, n), dtype)
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))  # compile / warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(matmul(a))
    times.append(time.perf_counter() - start)
  return 2 * n ** 3 / float(np.median(times))


def peak_flops_per_device() -> float:
  """Peak FLOP/s of one device: the data-sheet table, or on CPU a measured fp32 matmul rate."""
  chip = chip_of_device_kind(jax.devices()[0].device_kind)
  if chip is not None:
    return chip.peak_bf16_flops_per_s
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  start, reps = time.perf_counter(), 10
  for _ in range(reps):
    a = matmul(a)
  a.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - start) / jax.local_device_count()
