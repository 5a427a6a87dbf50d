"""Decoder self-attention: grouped-query heads, RoPE, LoRA on chosen projections, KV cache.

Keys and values live in "slots". Without a cache the T input tokens are slots 0..T-1. With a
cache of S slots, the new tokens are written at slots index..index+T-1 and attend to every
filled slot; a query in slot t may see slot s when s <= t and slot s holds a real token. RoPE
uses each token's own position (which may differ from its slot when prompts are padded), so
prefill + step-by-step decoding computes exactly what one full forward pass does.

The attention itself is `attention_impl`'s (model/attention_kernels.py); a call with a cache
always takes the xla reference. Intermediate values carry checkpoint names that remat
policies save by name (layers.ATTENTION_SAVED): the q, k, v projections (LoRA included, before
RoPE) 'query_proj', 'key_proj', 'value_proj'; the attention's output before the out projection
'attention_context'; the out projection's output 'attention_out'.
"""
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from skymoe_jax.model import attention_kernels, layers, lora
from skymoe_jax.model.rope import apply_rope


def init_kv_cache(batch: int, max_len: int, num_kv_heads: int, head_dim: int, dtype):
  """One layer's empty cache."""
  shape = (batch, max_len, num_kv_heads, head_dim)
  return {'k': jnp.zeros(shape, dtype), 'v': jnp.zeros(shape, dtype)}


def attention_mask(token_mask, slot_mask=None, index=0) -> attention_kernels.AttentionMask:
  """The causal mask for T new tokens written at slots index..index+T-1.

  token_mask: [B, T] real (True) or padding tokens among the new ones.
  slot_mask: [B, S] which cache slots hold real tokens after this write (None: no cache, S = T).
  """
  if slot_mask is None:
    return attention_kernels.AttentionMask(token_mask)
  return attention_kernels.AttentionMask(slot_mask, query_offset=index)


class Attention(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float = 10000.0
  image_grid: int = 0  # > 0: 2-D rotary positions for the first image_grid^2 tokens (rope.py)
  lora_targets: Sequence[str] = ()
  lora_rank: int = 0
  lora_alpha: float = 16.0
  attention_impl: str = 'xla'  # a name in attention_kernels.CHOICES
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
    """x: [B, T, D]; positions: [B, T]; mask: from `attention_mask`.

    Returns (y [B, T, D], updated cache or None).
    """
    q = checkpoint_name(self._project('query', x, self.num_heads), 'query_proj')
    k = checkpoint_name(self._project('key', x, self.num_kv_heads), 'key_proj')
    v = checkpoint_name(self._project('value', x, self.num_kv_heads), 'value_proj')
    q = apply_rope(q, positions, self.rope_theta, self.image_grid)
    k = apply_rope(k, positions, self.rope_theta, self.image_grid)
    q = nn.with_logical_constraint(q, ('activation_batch', 'activation_length', 'heads', 'head_dim'))
    if cache is not None:
      k = jax.lax.dynamic_update_slice_in_dim(cache['k'], k.astype(cache['k'].dtype), index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(cache['v'], v.astype(cache['v'].dtype), index, axis=1)
      cache = {'k': k, 'v': v}
    out = attention_kernels.attend(self.attention_impl, q, k.astype(self.dtype),
                                   v.astype(self.dtype), mask)
    out = checkpoint_name(out, 'attention_context')
    y = layers.Linear((x.shape[-1],), ('heads', 'head_dim'), ('embed',), dtype=self.dtype,
                      param_dtype=self.param_dtype, name='out')(out)
    return checkpoint_name(y, 'attention_out'), cache
