"""Batched autoregressive generation with the KV cache, for evaluation.

Layout. The model reads image tokens first, then the text. Prompts arrive left-aligned with
padding on the right (as the input pipeline pads them). Inside `generate` each row's real
tokens (its Nv image tokens, then its prompt) are moved to the END of the [Nv + P] prefix by a
stable sort on the mask, so every row's last real token sits in slot Nv + P - 1 and generated
token i of every row is written to slot Nv + P + i: one scalar cache index serves the whole
batch. Padding ends up in the first slots; the slot mask keeps it out of attention (its weight is
an exact zero) and RoPE positions count real tokens only (skymoe.positions_from_mask), so each
row computes what it would compute alone. How many other rows there are, what they hold and how
much padding the batch needs cannot change a sample's answer; tests check this token for token.

Steps. One `decode` call prefills every prefix slot but the last (its logits are never used, so
XLA drops the vocabulary projection there); a `jax.lax.while_loop` then feeds one slot per step,
starting with the last prefix slot, and stops as soon as every row has emitted eos. A finished
row keeps emitting pad_id; `lengths` counts the tokens before eos.

Choice of token: greedy (temperature 0) or sampling at a temperature with nucleus (top-p)
filtering. Each row has its own key, folded with the step: pass one key per row (e.g. folded
with the sample id) and sampling is batch-invariant too; one key is split by row index.
eos_id, pad_id, temperature and top_p enter the compiled function as traced scalars; only
greedy-or-sampling, max_new_tokens and the shapes are compile-time.

Condition. A model that predicts its router's condition (model.moe.condition='predicted')
predicts it once, from the prompt's text tokens, before the prefill, and every decode step
routes by that same prediction: what a full forward pass over prompt + answer computes, whose
head pools the prompt alone. task_id / granularity_id then route nothing.

Routing is dropless: a model configured with the `capacity` backend (which drops tokens over
capacity, and would make answers depend on the rest of the batch) generates with the `ragged`
backend instead (and the ring instead of the all_to_all expert-parallel strategy), from a copy
of the model config: the parameters are the same (`dropless_model`).
"""
import functools
import math
from typing import Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from skymoe_jax.model import skymoe
from skymoe_jax.model.skymoe import SkyMoE, positions_from_mask
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.parallel import sharding

DROPLESS_BACKEND = 'ragged'
# PRNG implementations whose draws under vmap equal the per-key draws.
VMAP_INVARIANT_KEYS = ('threefry2x32',)


def dropless_model(model: SkyMoE) -> SkyMoE:
  """`model` itself, or the same model with the capacity backend replaced by a dropless one.

  The backend changes no parameter, so the caller's params fit the returned model unchanged.
  """
  if model.config.moe.backend != 'capacity':
    return model
  cfg = model.config.as_configdict()
  cfg.moe.backend = DROPLESS_BACKEND
  if cfg.moe.ep_strategy == 'all_to_all':  # exchanges capacity buffers; ring is dropless
    cfg.moe.ep_strategy = 'ring'
  return SkyMoE(ml_collections.FrozenConfigDict(cfg))


def nucleus_filter(logits, top_p):
  """Logits [..., V] outside the smallest top set whose probability reaches top_p -> -inf.

  The most likely token is always kept, so a tiny top_p is greedy decoding; top_p >= 1 keeps
  every token (float rounding of the cumulative sum must not cut the tail).
  """
  sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  kept = (mass_before < top_p) | (top_p >= 1.0)
  threshold = jnp.min(jnp.where(kept, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits >= threshold, logits, -jnp.inf)


def select_tokens(logits, keys, sample: bool, temperature, top_p):
  """Next token per row from fp32 logits [B, V]: argmax, or (sample) a draw at `temperature`
  from the top_p nucleus with keys [B]."""
  if not sample:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = nucleus_filter(logits / temperature, top_p)
  if str(jax.random.key_impl(keys)) in VMAP_INVARIANT_KEYS:
    return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
  # Other key kinds (rbg) draw different bits under vmap, depending on the whole batch of keys:
  # one row at a time keeps a row's sample its own.
  return jax.lax.map(lambda kl: jax.random.categorical(*kl), (keys, logits)).astype(jnp.int32)


def _constrain_cache(cache):
  """Cache leaves [(layers,) B, S, Hkv, Dh] split like the activations (no-op without rules)."""
  def constrain(a):
    names = (None,) * (a.ndim - 4) + ('activation_batch', 'activation_length', 'kv_heads',
                                      'head_dim')
    return nn.with_logical_constraint(a, names)
  return jax.tree.map(constrain, cache)


def _generate(params, images, prompt_tokens, prompt_mask, task_id, granularity_id, row_keys,
              options, *, model, max_new_tokens, sample):
  """The traced body of `generate`. row_keys [B]: typed PRNG keys; options: traced scalars
  eos_id, pad_id, temperature, top_p (changing them does not recompile)."""
  eos_id, pad_id = options['eos_id'], options['pad_id']
  variables = {'params': params}
  apply = functools.partial(model.apply, variables)
  b, p = prompt_tokens.shape
  image_embeds = apply(images, method='encode_images')
  nv = image_embeds.shape[1]
  text_embeds = apply(prompt_tokens, method='embed_tokens').astype(image_embeds.dtype)
  x = jnp.concatenate([image_embeds, text_embeds], axis=1)
  mask = jnp.concatenate([jnp.ones((b, nv), bool), prompt_mask.astype(bool)], axis=1)

  # Right-align the real tokens: a stable sort puts the padding first and keeps the real
  # tokens' order, whatever pattern the mask had.
  order = jnp.argsort(mask.astype(jnp.int32), axis=1, stable=True)
  x = jnp.take_along_axis(x, order[:, :, None], axis=1)
  mask = jnp.take_along_axis(mask, order, axis=1)
  positions = positions_from_mask(mask)

  t = nv + p
  # The last prefix slot and max_new_tokens - 1 generated tokens are fed in the loop; the last
  # chosen token never is.
  size = t + max_new_tokens - 1
  cache = _constrain_cache(apply(b, size, method='init_cache'))
  # Slots past the prefix are all real (tokens after eos are never read); causality hides the
  # ones not written yet, so this mask stays fixed for the whole generation.
  slot_mask = jnp.concatenate([mask, jnp.ones((b, max_new_tokens - 1), bool)], axis=1)
  condition = None
  if skymoe.predicts_condition(model.config):
    condition = skymoe.condition_distributions(
        apply(prompt_tokens, prompt_mask.astype(bool), method='predict_condition'))
  decode = functools.partial(apply, method='decode', condition=condition)
  if t > 1:
    _, _, cache = decode(x[:, :t - 1], positions[:, :t - 1], mask[:, :t - 1], task_id,
                         granularity_id, cache, 0, slot_mask)
    cache = _constrain_cache(cache)
  last_position = positions[:, t - 1]
  fold = jax.vmap(jax.random.fold_in, in_axes=(0, None))

  def cond(state):
    step, _, _, done, _, _ = state
    return (step < max_new_tokens) & ~jnp.all(done)

  def body(state):
    step, cache, inputs, done, lengths, tokens = state
    logits, _, cache = decode(inputs, (last_position + step)[:, None], jnp.ones((b, 1), bool),
                              task_id, granularity_id, cache, t - 1 + step, slot_mask)
    token = select_tokens(logits[:, 0], fold(row_keys, step), sample, options['temperature'],
                          options['top_p'])
    token = jnp.where(done, pad_id, token)
    done = done | (token == eos_id)
    lengths = lengths + (~done).astype(jnp.int32)
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], step, axis=1)
    inputs = apply(token[:, None], method='embed_tokens').astype(x.dtype)
    return step + 1, _constrain_cache(cache), inputs, done, lengths, tokens

  state = (jnp.int32(0), cache, x[:, t - 1:], jnp.zeros((b,), bool), jnp.zeros((b,), jnp.int32),
           jnp.full((b, max_new_tokens), pad_id, jnp.int32))
  _, _, _, _, lengths, tokens = jax.lax.while_loop(cond, body, state)
  return tokens, lengths


# Unsharded generation: one compilation per (model, max_new_tokens, greedy or not, shapes),
# shared by every generate function made for them.
_generate_jit = jax.jit(_generate, static_argnames=('model', 'max_new_tokens', 'sample'))


def _row_keys(rng, batch: int):
  """One typed key per row: rng is None, one key (typed or raw), or [B] keys."""
  if rng is None:
    rng = jax.random.key(0)
  if not jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.wrap_key_data(rng)
  if rng.ndim == 0:
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(batch))
  if rng.shape != (batch,):
    raise ValueError(f'rng: one key or one per row ({batch}), got key shape {rng.shape}')
  return rng


def _pad_rows(a, rows: int):
  """Repeat the last row so the batch has `rows` rows (host arrays stay on the host)."""
  extra = rows - a.shape[0]
  if extra == 0:
    return a
  xp = np if isinstance(a, np.ndarray) else jnp
  return xp.concatenate([a, xp.repeat(a[-1:], extra, axis=0)])


def make_generate_fn(model: SkyMoE, config, max_new_tokens: int, eos_id: int, pad_id: int,
                     temperature: float = 0.0, top_p: float = 1.0,
                     mesh: Optional[jax.sharding.Mesh] = None) -> Callable:
  """Returns generate(params, images, prompt_tokens, prompt_mask, task_id, granularity_id, rng).

  images [B, H, W, 3] float; prompt_tokens [B, P] int32 with prompt_mask [B, P] bool (real
  tokens, normally a prefix); task_id, granularity_id [B]; rng: one PRNG key, one per row, or
  None (greedy). Returns (tokens [B, max_new_tokens] int32: each row's tokens up to and
  including eos, then pad_id; lengths [B] int32: tokens before eos).

  Compiled once per input shape: eos_id, pad_id, temperature and top_p are traced, so without
  a mesh every generate function for the same model, max_new_tokens and greedy-or-sampling
  shares one compilation. With a mesh, inputs are placed on it (batch split over the
  rule table's batch axes, params by their logical axes) and a batch that does not divide the
  batch axes is padded with copies of its last row, which are dropped from the result.
  """
  if max_new_tokens < 1:
    raise ValueError(f'max_new_tokens must be >= 1, got {max_new_tokens}')
  if temperature < 0.0:
    raise ValueError(f'temperature must be >= 0, got {temperature}')
  if not 0.0 < top_p <= 1.0:
    raise ValueError(f'top_p must be in (0, 1], got {top_p}')
  model = dropless_model(model)
  static = dict(model=model, max_new_tokens=max_new_tokens, sample=temperature > 0.0)
  options = {'eos_id': jnp.int32(eos_id), 'pad_id': jnp.int32(pad_id),
             'temperature': jnp.float32(temperature), 'top_p': jnp.float32(top_p)}

  if mesh is None:
    def generate(params, images, prompt_tokens, prompt_mask, task_id, granularity_id, rng=None):
      keys = _row_keys(rng, prompt_tokens.shape[0])
      return _generate_jit(params, images, prompt_tokens, prompt_mask, task_id, granularity_id,
                           keys, options, **static)
    return generate

  _, param_sh = sharding.param_shardings(config, mesh, model)
  batch_sh = lambda ndim: mesh_lib.batch_sharding(mesh, config, ndim)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  in_sh = (param_sh, batch_sh(4), batch_sh(2), batch_sh(2), batch_sh(1), batch_sh(1), batch_sh(1),
           replicated)
  jitted = jax.jit(functools.partial(_generate, **static), in_shardings=in_sh,
                   out_shardings=(batch_sh(2), batch_sh(1)))
  ways = math.prod(mesh.shape[a] for a in mesh_lib.batch_axes(config))

  def generate(params, images, prompt_tokens, prompt_mask, task_id, granularity_id, rng=None):
    b = prompt_tokens.shape[0]
    rows = -(-b // ways) * ways
    batch = [_pad_rows(a, rows)
             for a in (images, prompt_tokens, prompt_mask, task_id, granularity_id)]
    keys = _pad_rows(_row_keys(rng, b), rows)
    args = jax.device_put((params, *batch, keys, options), in_sh)
    with mesh_lib.activate(mesh, config):
      tokens, lengths = jitted(*args)
    return tokens[:b], lengths[:b]

  generate.jitted = jitted  # for lowering / AOT compilation
  return generate
