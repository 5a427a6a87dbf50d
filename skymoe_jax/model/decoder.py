"""LLaMA-style decoder whose chosen layers carry a routed MoE FFN instead of the dense one.

Layers are grouped in blocks of `layout.block_period` consecutive layers (2 for "every other
layer is MoE"); with scan_layers the block is scanned, so compile time does not grow with depth.
The parameter layout (scanned or unrolled) is model/layout.py's. Each layer is attn_norm, attn,
ffn_norm, then `mlp` or `moe`.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from skymoe_jax.model import layers, layout
from skymoe_jax.model.attention import Attention, attention_mask, init_kv_cache
from skymoe_jax.model.mlp import MLP
from skymoe_jax.model.moe.layer import MoeFFN


def image_grid(model_cfg) -> int:
  """The patch grid the decoder's 2-D rotary positions lay the image tokens on; 0 when they take
  1-D positions (model.llm.image_rope)."""
  v = model_cfg.vision
  return v.image_size // v.patch_size if model_cfg.llm.get('image_rope', '1d') == '2d' else 0


class DecoderLayer(nn.Module):
  config: ml_collections.FrozenConfigDict  # model config
  is_moe: bool

  @nn.compact
  def __call__(self, x, positions, mask, token_mask, task_id, granularity_id, condition, cache,
               index):
    llm, cfg = self.config.llm, self.config
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    lora_on = cfg.lora.rank > 0
    h = layers.RMSNorm(llm.norm_eps, name='attn_norm', **kw)(x)
    attn_out, cache = Attention(
        llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.rope_theta, image_grid(cfg),
        lora_targets=tuple(cfg.lora.targets) if lora_on else (), lora_rank=cfg.lora.rank,
        lora_alpha=cfg.lora.alpha, attention_impl=cfg.attention_impl, name='attn', **kw)(
            h, positions, mask, cache, index)
    x = x + attn_out
    h = layers.RMSNorm(llm.norm_eps, name='ffn_norm', **kw)(x)
    if self.is_moe:
      m = cfg.moe
      ffn_out, aux = MoeFFN(
          m.num_experts, m.top_k, m.mlp_dim or llm.mlp_dim, m.renormalize, m.backend,
          m.ep_strategy, m.capacity_factor, m.ragged_impl, m.ragged_block_size, m.adaptive,
          m.num_tasks, m.num_granularities, m.condition_dim, m.get('condition_scale', 1.0),
          name='moe', **kw)(
              h, token_mask, task_id, granularity_id, condition)
    else:
      ffn_out, aux = MLP(llm.mlp_dim, name='mlp', **kw)(h), None
    x = x + ffn_out
    x = nn.with_logical_constraint(x, ('activation_batch', 'activation_length', 'activation_embed'))
    return x, aux, cache


class DecoderBlock(nn.Module):
  """`len(moe_flags)` consecutive layers; the unit that is scanned. Returns (x, (aux, cache))."""
  config: ml_collections.FrozenConfigDict
  moe_flags: Sequence[bool]

  @nn.compact
  def __call__(self, x, positions, mask, token_mask, task_id, granularity_id, condition, cache,
               index):
    layer_cls = layers.maybe_remat(DecoderLayer, self.config.remat_policy)
    auxes, new_cache = [], {}
    for j, is_moe in enumerate(self.moe_flags):
      name = f'layer_{j}'
      x, aux, c = layer_cls(self.config, is_moe, name=name)(
          x, positions, mask, token_mask, task_id, granularity_id, condition,
          None if cache is None else cache[name], index)
      new_cache[name] = c
      if aux is not None:
        auxes.append(aux)
    # Stack this block's MoE layers: every aux leaf gets a leading [moe layers in block] axis.
    aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes else None
    return x, (aux, new_cache if cache is not None else None)


class Decoder(nn.Module):
  config: ml_collections.FrozenConfigDict  # model config

  def setup(self):
    cfg, llm = self.config, self.config.llm
    self.embedding = layers.param(self, 'embed', nn.initializers.normal(0.02),
                                  (llm.vocab_size, llm.embed_dim), ('vocab', 'embed'),
                                  jnp.dtype(cfg.param_dtype))
    if not llm.tie_embeddings:
      self.lm_head = layers.param(self, 'lm_head', layers.fan_in_init(1),
                                  (llm.embed_dim, llm.vocab_size), ('embed', 'vocab'),
                                  jnp.dtype(cfg.param_dtype))
    self.final_norm = layers.RMSNorm(llm.norm_eps, dtype=jnp.dtype(cfg.dtype),
                                     param_dtype=jnp.dtype(cfg.param_dtype))
    moe = set(layout.moe_layers(cfg))
    n = llm.num_layers
    if cfg.scan_layers:
      p = layout.decoder_period(cfg)
      flags = tuple(i in moe for i in range(p))
      self.blocks = nn.scan(
          DecoderBlock, variable_axes={'params': 0}, split_rngs={'params': True},
          in_axes=(nn.broadcast,) * 6 + (0, nn.broadcast), length=n // p,
          metadata_params={nn.PARTITION_NAME: 'layers'})(cfg, flags)
    else:
      layer_cls = layers.maybe_remat(DecoderLayer, cfg.remat_policy)
      self.layers = [layer_cls(cfg, i in moe, name=f'layer_{i}') for i in range(n)]

  def embed(self, tokens):
    # The lookup reads a replicated table (gathered inside the slice). Why: with the vocabulary
    # split over tensor, XLA partitioned the gather by moving table shards along the data axis,
    # i.e. between slices on a multislice pod, where only gradient sums should cross.
    table = nn.with_logical_constraint(self.embedding.astype(jnp.dtype(self.config.dtype)),
                                       (None, None))
    x = table[tokens]
    return nn.with_logical_constraint(x, ('activation_batch', 'activation_length',
                                          'activation_embed'))

  def init_cache(self, batch: int, max_len: int):
    """Empty KV cache laid out like the layers (stacked per block when scanned)."""
    llm, dtype = self.config.llm, jnp.dtype(self.config.dtype)
    one = init_kv_cache(batch, max_len, llm.num_kv_heads, llm.head_dim, dtype)
    if self.config.scan_layers:
      p = layout.decoder_period(self.config)
      stacked = jax.tree.map(lambda a: jnp.broadcast_to(a, (llm.num_layers // p,) + a.shape), one)
      return {f'layer_{j}': stacked for j in range(p)}
    return {f'layer_{i}': one for i in range(llm.num_layers)}

  def __call__(self, x, positions, token_mask, task_id, granularity_id,
               cache: Optional[dict] = None, index=0, slot_mask=None, condition=None):
    """x: [B, T, D] input embeddings; positions: [B, T]; token_mask: [B, T] bool; task_id,
    granularity_id [B]: the tags (they route unless `condition` does; MoeFFN).

    With a cache: the tokens go to slots index..index+T-1 and `slot_mask` [B, S] says which
    slots hold real tokens after this write. Returns (logits fp32 [B, T, V], aux, cache) where
    aux['moe'] stacks each MoE layer's losses and statistics along a leading axis, in layer order.
    """
    mask = attention_mask(token_mask, slot_mask if cache is not None else None, index)
    args = (positions, mask, token_mask, task_id, granularity_id, condition)
    if self.config.scan_layers:
      x, (aux, cache) = self.blocks(x, *args, cache, index)
      # [blocks, moe layers per block, ...] -> [moe layers, ...] in layer order.
      aux = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), aux)
    else:
      auxes, new_cache = [], {}
      for i, layer in enumerate(self.layers):
        name = f'layer_{i}'
        x, a, c = layer(x, *args, None if cache is None else cache[name], index)
        new_cache[name] = c
        if a is not None:
          auxes.append(a)
      aux = jax.tree.map(lambda *a: jnp.stack(a), *auxes) if auxes else None
      cache = new_cache if cache is not None else None
    x = self.final_norm(x)
    dtype = jnp.dtype(self.config.dtype)
    head = (self.embedding.T if self.config.llm.tie_embeddings else self.lm_head).astype(dtype)
    logits = jnp.einsum('btd,dv->btv', x, head, preferred_element_type=jnp.float32)
    logits = nn.with_logical_constraint(logits, ('activation_batch', 'activation_length',
                                                 'activation_vocab'))
    return logits, {'moe': aux}, cache
