"""Decoder self-attention: grouped-query heads, RoPE, LoRA on chosen projections, KV cache.

Keys and values live in "slots". Without a cache the T input tokens are slots 0..T-1. With a
cache of S slots, the new tokens are written at slots index..index+T-1 and attend to every
filled slot; a query in slot t may see slot s when s <= t and slot s holds a real token. RoPE
uses each token's own position (which may differ from its slot when prompts are padded), so
prefill + step-by-step decoding computes exactly what one full forward pass does.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from skymoe_jax.model import layers, lora
from skymoe_jax.model.rope import apply_rope


def init_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype):
  """One layer's empty cache."""
  shape = (batch, max_len, num_kv_heads, head_dim)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def attention_mask(token_mask, slot_mask=None, index=0):
  """Boolean [B, T, S] mask for T new tokens written at slots index..index+T-1.

  token_mask: [B, T] real (True) or padding tokens among the new ones.
  slot_mask: [B, S] which cache slots hold real tokens after this write (None: no cache, S = T).
  """
  t = token_mask.shape[1]
  if slot_mask is None:
    slot_mask, index = token_mask, 0
  s = slot_mask.shape[1]
  query_slot = index + jnp.arange(t)
  causal = jnp.arange(s)[None, :] <= query_slot[:, None]  # [T, S]
  return causal[None] & slot_mask[:, None, :]


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  lora_targets: Sequence[str] = ()
  lora_rank: int = 0
  lora_alpha: float = 16.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  def _project(self, name, x, heads):
    proj = layers.Linear((heads, self.head_dim), ('embed',), ('heads' if heads == self.num_heads
                                                              else 'kv_heads', 'head_dim'),
                         dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    y = proj(x)
    if name in self.lora_targets:
      y = y + lora.LoRA((heads, self.head_dim), ('embed',), (proj.out_axes[0], 'head_dim'),
                        self.lora_rank, self.lora_alpha, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=name + lora.LORA_SUFFIX)(x)
    return y

  @nn.compact
  def __call__(self, x, positions, mask, cache: Optional[dict] = None, index=0):
    """x: [B, T, D]; positions: [B, T]; mask: [B, T, S] from `attention_mask`.

    Returns (y [B, T, D], updated cache or None).
    """
    q = self._project('query', x, self.num_heads)
    k = self._project('key', x, self.num_kv_heads)
    v = self._project('value', x, self.num_kv_heads)
    q = apply_rope(q, positions, self.rope_theta)
    k = apply_rope(k, positions, self.rope_theta)
    q = nn.with_logical_constraint(q, ('activation_batch', 'activation_length', 'heads', 'head_dim'))
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache['k'], k.astype(cache['k'].dtype), index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache['v'], v.astype(cache['v'].dtype), index, axis=1)
      cache = {'k': k, 'v': v}
    out = layers.attend(q, k.astype(self.dtype), v.astype(self.dtype), mask)
    y = layers.Linear((x.shape[-1],), ('heads', 'head_dim'), ('embed',), dtype=self.dtype,
                      param_dtype=self.param_dtype, name='out')(out)
    return y, cache
