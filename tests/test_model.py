"""The full model: KV-cache decoding, masks, LoRA merge, scanned vs unrolled layers, remat."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from skymoe_jax.model import factory, lora
from skymoe_jax.model.layout import block_period
from skymoe_jax.model.skymoe import positions_from_mask


def _init(config, batch=2, text_len=6, seed=0):
  model = factory.create_model(config)
  args = factory.example_inputs(config, batch, text_len)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(seed), *args)['params']))()
  return model, params


def _randomize_lora_b(params, key):
  """LoRA B starts at zero; give it values so the adapters matter."""
  def visit(tree, key):
    out = {}
    for name, value in tree.items():
      key, sub = jax.random.split(key)
      if name.endswith(lora.LORA_SUFFIX):
        out[name] = dict(value, b=0.1 * jax.random.normal(sub, value['b'].shape))
      elif isinstance(value, dict):
        out[name] = visit(value, sub)
      else:
        out[name] = value
    return out
  return visit(params, key)


def _inputs(config, batch, text_len, seed=1, pad_left=()):
  """Random images/tokens; rows in pad_left get that many padding tokens at the text start."""
  rng = np.random.default_rng(seed)
  v = config.model.vision
  images = rng.normal(size=(batch, v.image_size, v.image_size, 3)).astype(np.float32)
  tokens = rng.integers(0, config.model.llm.vocab_size, size=(batch, text_len)).astype(np.int32)
  mask = np.ones((batch, text_len), bool)
  for row, n in enumerate(pad_left):
    mask[row, :n] = False
  task = rng.integers(0, config.model.moe.num_tasks, size=batch).astype(np.int32)
  gran = rng.integers(0, config.model.moe.num_granularities, size=batch).astype(np.int32)
  return images, tokens, mask, task, gran


@pytest.mark.parametrize('scan,image_rope', [(True, '1d'), (False, '1d'), (True, '2d')])
def test_kv_cache_decoding_equals_full_forward(tiny_config, scan, image_rope):
  tiny_config.model.scan_layers = scan
  tiny_config.model.llm.image_rope = image_rope  # 2-D: prefill ends inside the text, as in use
  model, params = _init(tiny_config)
  params = {'params': _randomize_lora_b(params, jax.random.key(3))}
  b, t = 2, 7
  images, tokens, text_mask, task, gran = _inputs(tiny_config, b, t, pad_left=(0, 2))

  def embed(p):
    img = model.apply(p, images, method=lambda m, x: m.encode_images(x))
    txt = model.apply(p, tokens, method=lambda m, x: m.embed_tokens(x))
    x = jnp.concatenate([img, txt], axis=1)
    mask = jnp.concatenate([jnp.ones(img.shape[:2], bool), text_mask], axis=1)
    return x, mask

  x, mask = jax.jit(embed)(params)
  positions = positions_from_mask(mask)
  full_logits, _ = jax.jit(model.apply)(params, images, tokens, text_mask, task, gran)

  total = x.shape[1]
  prefill = total - 4
  cache = model.apply(params, b, total + 3, method=lambda m, b, s: m.init_cache(b, s))
  slot_mask = jnp.zeros((b, total + 3), bool)

  @jax.jit
  def step(cache, slot_mask, start, x_new, mask_new, pos_new):
    slot_mask = jax.lax.dynamic_update_slice_in_dim(slot_mask, mask_new, start, axis=1)
    logits, _, cache = model.apply(params, x_new, pos_new, mask_new, task, gran, cache, start,
                                   slot_mask, method=lambda m, *a: m.decode(*a))
    return logits, cache, slot_mask

  logits, cache, slot_mask = step(cache, slot_mask, 0, x[:, :prefill], mask[:, :prefill],
                                  positions[:, :prefill])
  pieces = [logits]
  for i in range(prefill, total):
    logits, cache, slot_mask = step(cache, slot_mask, i, x[:, i:i + 1], mask[:, i:i + 1],
                                    positions[:, i:i + 1])
    pieces.append(logits)
  cached = jnp.concatenate(pieces, axis=1)[:, -t:]
  real = np.asarray(text_mask)
  np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full_logits)[real], atol=2e-5)


def test_padding_and_future_tokens_do_not_leak(tiny_config):
  model, params = _init(tiny_config)
  apply = jax.jit(model.apply)
  images, tokens, mask, task, gran = _inputs(tiny_config, 2, 8, pad_left=(3, 0))
  base, _ = apply({'params': params}, images, tokens, mask, task, gran)

  # Different junk under the padding: real positions unchanged.
  other = tokens.copy()
  other[0, :3] = (other[0, :3] + 17) % tiny_config.model.llm.vocab_size
  junk, _ = apply({'params': params}, images, other, mask, task, gran)
  np.testing.assert_allclose(np.asarray(junk)[mask], np.asarray(base)[mask], atol=1e-5)

  # Changing the last token changes nothing before it (causality), but does change its own logits.
  future = tokens.copy()
  future[:, -1] = (future[:, -1] + 5) % tiny_config.model.llm.vocab_size
  fut, _ = apply({'params': params}, images, future, mask, task, gran)
  np.testing.assert_allclose(np.asarray(fut)[:, :-1], np.asarray(base)[:, :-1], atol=1e-5)
  assert np.abs(np.asarray(fut)[:, -1] - np.asarray(base)[:, -1]).max() > 1e-4

  # Padding tokens are not routed: per-layer routed count = real tokens (image + text) * k.
  _, aux = apply({'params': params}, images, tokens, mask, task, gran)
  real_tokens = 2 * tiny_config.model.vision.image_size ** 2 // 64 + mask.sum()
  np.testing.assert_array_equal(aux['moe']['num_routed'], real_tokens * tiny_config.model.moe.top_k)


def _drop_lora(params):
  if not isinstance(params, dict):
    return params
  return {k: _drop_lora(v) for k, v in params.items() if not k.endswith(lora.LORA_SUFFIX)}


def test_merged_lora_equals_unmerged(tiny_config):
  model, params = _init(tiny_config)
  params = _randomize_lora_b(params, jax.random.key(7))
  inputs = _inputs(tiny_config, 2, 6)
  with_adapters, _ = jax.jit(model.apply)({'params': params}, *inputs)

  merged = lora.merge_lora(params, tiny_config.model.lora.alpha)
  tiny_config.model.lora.rank = 0
  plain = jax.jit(factory.create_model(tiny_config).apply)
  assert jax.tree.structure(merged) == jax.tree.structure(_drop_lora(params))
  merged_out, _ = plain({'params': merged}, *inputs)
  np.testing.assert_allclose(merged_out, with_adapters, atol=2e-5)
  # ...and the adapters really matter: the base weights alone give other logits.
  base_out, _ = plain({'params': _drop_lora(params)}, *inputs)
  assert np.abs(np.asarray(base_out) - np.asarray(with_adapters)).max() > 1e-3


def _unroll(params, config):
  """Scanned parameter layout -> unrolled layout, by slicing the stacked layer axis."""
  out = jax.tree.map(lambda x: x, params)
  vision_layers = out['vision'].pop('layers')
  n = jax.tree.leaves(vision_layers)[0].shape[0]
  for i in range(n):
    out['vision'][f'layer_{i}'] = jax.tree.map(lambda x: x[i], vision_layers)
  blocks = out['decoder'].pop('blocks')
  llm = config.model.llm
  p = block_period(llm.num_layers, sorted(config.model.moe.layers))
  for i in range(llm.num_layers):
    out['decoder'][f'layer_{i}'] = jax.tree.map(lambda x: x[i // p], blocks[f'layer_{i % p}'])
  return out


def test_scanned_equals_unrolled(tiny_config):
  model, params = _init(tiny_config)
  params = _randomize_lora_b(params, jax.random.key(1))
  inputs = _inputs(tiny_config, 2, 5, pad_left=(1, 0))
  scanned, scanned_aux = jax.jit(model.apply)({'params': params}, *inputs)
  tiny_config.model.scan_layers = False
  unrolled_model = factory.create_model(tiny_config)
  unrolled_params = _unroll(params, tiny_config)
  # The unrolled model's own tree has exactly the same paths and shapes.
  expected = jax.tree.map(lambda x: x.shape, nn.unbox(jax.eval_shape(
      lambda: unrolled_model.init(jax.random.key(0), *factory.example_inputs(tiny_config)))[
          'params']))
  assert jax.tree.map(lambda x: x.shape, unrolled_params) == expected
  unrolled, unrolled_aux = jax.jit(unrolled_model.apply)({'params': unrolled_params}, *inputs)
  np.testing.assert_allclose(unrolled, scanned, atol=1e-5)
  for name in ('load', 'load_balance_loss', 'z_loss', 'counts_by_condition'):
    np.testing.assert_allclose(unrolled_aux['moe'][name], scanned_aux['moe'][name], atol=1e-5)


def test_remat_does_not_change_values_or_gradients(tiny_config):
  model, params = _init(tiny_config)
  inputs = _inputs(tiny_config, 2, 5)

  def loss_fn(model):
    def f(p):
      logits, aux = model.apply({'params': p}, *inputs)
      return jnp.mean(jax.nn.logsumexp(logits, -1)) + jnp.sum(aux['moe']['load_balance_loss'])
    return jax.jit(jax.value_and_grad(f))

  ref_loss, ref_grads = loss_fn(model)(params)
  tiny_config.model.remat_policy = 'full'
  loss, grads = loss_fn(factory.create_model(tiny_config))(params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grads, ref_grads)


def test_bfloat16_compute_stays_close_to_float32(tiny_config):
  model, params = _init(tiny_config)
  inputs = _inputs(tiny_config, 2, 5)
  ref, _ = jax.jit(model.apply)({'params': params}, *inputs)
  tiny_config.model.dtype = 'bfloat16'
  out, aux = jax.jit(factory.create_model(tiny_config).apply)({'params': params}, *inputs)
  assert out.dtype == jnp.float32 and aux['moe']['z_loss'].dtype == jnp.float32
  scale = np.abs(np.asarray(ref)).max()
  assert np.abs(np.asarray(out) - np.asarray(ref)).max() < 0.05 * scale


def test_config_is_frozen_and_hashable(tiny_config):
  model = factory.create_model(tiny_config)
  assert isinstance(model.config, ml_collections.FrozenConfigDict)
  hash(model.config)
