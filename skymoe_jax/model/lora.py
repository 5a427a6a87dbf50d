"""LoRA: a low-rank update (alpha / r) * A @ B beside a frozen projection, and its merge.

A projection named `query` gets its adapter as the sibling `query_lora` = {'a': [*in, r],
'b': [r, *out]}. B starts at zero, so an adapted model starts equal to its base.
"""
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from skymoe_jax.model import layers

LORA_SUFFIX = '_lora'


class LoRA(nn.Module):
  """Returns the LoRA delta (alpha / rank) * (x @ A) @ B for a projection of shape [*in, *out]."""
  features: Sequence[int]
  in_axes: Sequence[str]
  out_axes: Sequence[str]
  rank: int
  alpha: float
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n_in = len(self.in_axes)
    a = layers.param(self, 'a', layers.fan_in_init(n_in), tuple(x.shape[-n_in:]) + (self.rank,),
                     tuple(self.in_axes) + ('lora',), self.param_dtype)
    b = layers.param(self, 'b', nn.initializers.zeros, (self.rank,) + tuple(self.features),
                     ('lora',) + tuple(self.out_axes), self.param_dtype)
    x = x.astype(self.dtype)
    h = jax.lax.dot_general(
        x, a.astype(self.dtype), ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))),
                                  ((), ())))
    y = jnp.tensordot(h, b.astype(self.dtype), axes=1)
    return y * (self.alpha / self.rank)


def lora_kernel_delta(lora_params, alpha: float):
  """The dense [*in, *out] matrix a LoRA adapter adds to its projection's kernel."""
  a, b = lora_params['a'], lora_params['b']
  rank = a.shape[-1]
  return jnp.tensordot(a, b, axes=1) * (alpha / rank)


def merge_lora(params, alpha: float):
  """Folds every `X_lora` adapter into the kernel of its sibling `X` and drops the adapter.

  Works on plain nested dicts of arrays, scanned (stacked) layers included: the leading
  layer axis of a stacked adapter is vmapped over.
  """
  if not isinstance(params, dict):
    return params
  merged = {}
  for name, value in params.items():
    if name.endswith(LORA_SUFFIX):
      continue
    adapter = params.get(name + LORA_SUFFIX)
    if adapter is not None:
      kernel = value['kernel']
      # Scanned layers add the same leading axes to a, b and kernel: count them and vmap.
      num_stacked = adapter['a'].ndim + adapter['b'].ndim - 2 - kernel.ndim
      delta_fn = lambda lp: lora_kernel_delta(lp, alpha)
      for _ in range(num_stacked):
        delta_fn = jax.vmap(delta_fn)
      delta = delta_fn(adapter)
      merged[name] = dict(value, kernel=(kernel + delta.astype(kernel.dtype)))
    else:
      merged[name] = merge_lora(value, alpha)
  return merged
