"""Attention implementations against the xla reference (layers.attend) on CPU.

splash runs its Pallas kernels in interpret mode here. cuDNN and tokamax's GPU kernels cannot
run on CPU: their tests run our call of each library (the mask as we translate it) with the
library's own XLA implementation of the same call, so they check the translation, not the
GPU kernels (benchmarks/gpu_check.sh runs those).
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from skymoe_jax import registry
from skymoe_jax.model import attention, attention_kernels as ak, factory, layers
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.training import state as state_lib
from skymoe_jax.training import step as step_lib

# Our mask through each library's own XLA reference of the call we make.
TRANSLATIONS = {
    'cudnn': lambda q, k, v, m: ak.cudnn_attention(q, k, v, m, implementation='xla'),
    'tokamax': lambda q, k, v, m: ak.tokamax_attention(q, k, v, m, implementation='xla'),
}
KERNELS = {'splash': ak.splash_attention, **TRANSLATIONS}


def _qkv(length, batch=2, heads=4, kv_heads=2, head_dim=16, dtype=jnp.float32, seed=0):
  rng = np.random.default_rng(seed)
  make = lambda h: jnp.asarray(rng.normal(size=(batch, length, h, head_dim)), dtype)
  return make(heads), make(kv_heads), make(kv_heads)


def _batch_mask(length, num_image=8):
  """Token masks of real batches: [image tokens, text, padding] (the input pipeline's rows),
  one row with padding inside the text as well (as tests/test_sharding.py's batch has), and
  one with leading padding (a decoder without image tokens), whose first queries see no key."""
  mask = np.ones((3, length), bool)
  mask[0, length - 5:] = False
  mask[1, num_image:num_image + 3] = False
  mask[1, length - 9:] = False
  mask[2, :4] = False
  return jnp.asarray(mask)


def _check(fn, q, k, v, mask, rtol=2e-5, atol=2e-5):
  (b, t), s = q.shape[:2], k.shape[1]
  # Kernels must agree on every query that sees a real key (padded ones too).
  rows = jnp.broadcast_to(mask.dense(t, s), (b, t, s)).any(-1).astype(jnp.float32)
  weights = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)
  def loss(f, q, k, v):
    out = f(q, k, v, mask).astype(jnp.float32)
    return jnp.sum(out * weights * rows[:, :, None, None])
  got, want = jax.jit(fn)(q, k, v, mask), jax.jit(ak.xla_attention)(q, k, v, mask)
  sel = np.asarray(rows, bool)
  np.testing.assert_allclose(np.asarray(got, np.float32)[sel], np.asarray(want, np.float32)[sel],
                             rtol=rtol, atol=atol)
  g_got = jax.jit(jax.grad(lambda *a: loss(fn, *a), argnums=(0, 1, 2)))(q, k, v)
  g_want = jax.jit(jax.grad(lambda *a: loss(ak.xla_attention, *a), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=rtol, atol=atol)


@pytest.mark.parametrize('name', sorted(KERNELS))
def test_decoder_mask_values_and_grads_equal_xla(name):
  """Causal over [image, text] with the padding of real batches; 150 tokens: splash pads them
  to 256 in two blocks of 128 (one skipped above the diagonal)."""
  q, k, v = _qkv(150, batch=3)
  mask = attention.attention_mask(_batch_mask(150))
  _check(KERNELS[name], q, k, v, mask)


@pytest.mark.parametrize('name', sorted(KERNELS))
def test_vision_full_mask_values_and_grads_equal_xla(name):
  """The ViT's full mask at an odd length (1 + 6*6 tokens: splash pads to 128), and with
  padding keys (non-causal key mask)."""
  q, k, v = _qkv(37, heads=2, kv_heads=2)
  _check(KERNELS[name], q, k, v, ak.AttentionMask(None, causal=False))
  padded = ak.AttentionMask(jnp.arange(37)[None, :] < jnp.array([[30], [37]]), causal=False)
  _check(KERNELS[name], q, k, v, padded)


def test_splash_bf16_close_to_xla():
  q, k, v = _qkv(150, batch=3, dtype=jnp.bfloat16)
  _check(ak.splash_attention, q, k, v, attention.attention_mask(_batch_mask(150)),
         rtol=3e-2, atol=3e-2)


def test_splash_padded_queries_stay_finite():
  """Leading padding: a padded query with no real key before it must not divide by zero (its
  NaN would reach real rows through the next layer's keys)."""
  q, k, v = _qkv(20)
  token_mask = jnp.asarray(np.arange(20)[None, :] >= np.array([[4], [0]]))
  out = ak.splash_attention(q, k, v, attention.attention_mask(token_mask))
  assert np.isfinite(np.asarray(out)).all()


def test_dense_mask_is_causal_and_padding():
  """AttentionMask.dense against a hand-built numpy mask, with and without a KV cache."""
  token_mask = np.array([[1, 1, 0, 1], [0, 1, 1, 1]], bool)
  t = s = 4
  want = np.tril(np.ones((t, s), bool))[None] & token_mask[:, None, :]
  np.testing.assert_array_equal(attention.attention_mask(jnp.asarray(token_mask)).dense(t, s),
                                want)
  slot_mask = np.array([[1, 1, 1, 0, 1, 1], [0, 1, 1, 1, 1, 1]], bool)  # 6 slots, writing 2..3
  dense = attention.attention_mask(jnp.asarray(token_mask[:, :2]), jnp.asarray(slot_mask),
                                   2).dense(2, 6)
  want = (np.arange(6)[None, :] <= np.array([[2], [3]]))[None] & slot_mask[:, None, :]
  np.testing.assert_array_equal(dense, want)


def test_splash_blocks_for_the_model_shapes():
  assert ak.splash_blocks(2048) == (2048, 512)  # 7B decoder: 1296 image + 752 text tokens
  assert ak.splash_blocks(1297) == (1408, 128)  # ViT-L/14 at 504 px with its class token
  assert ak.splash_blocks(28) == (128, 128)


def test_auto_is_xla_on_cpu_and_kernels_refuse_the_wrong_platform():
  assert layers.target_platform() == "cpu"
  assert ak.auto_choice(jnp.bfloat16) == ak.auto_choice(jnp.float32) == 'xla'
  q, k, v = _qkv(8)
  mask = attention.attention_mask(jnp.ones((2, 8), bool))
  np.testing.assert_array_equal(ak.attend('auto', q, k, v, mask), ak.xla_attention(q, k, v, mask))
  for name in ('cudnn', 'tokamax_triton', 'tokamax_mosaic'):
    with pytest.raises(NotImplementedError, match=f"attention_impl='{name}' runs on gpu"):
      ak.attend(name, q, k, v, mask)


def test_unknown_name_fails_validation(tiny_config):
  tiny_config.model.attention_impl = 'flash'
  with pytest.raises(registry.UnknownChoiceError, match=r"config.model.attention_impl='flash'"):
    factory.validate(tiny_config)


def _attention_module(impl):
  return attention.Attention(num_heads=4, num_kv_heads=2, head_dim=16, attention_impl=impl)


def test_kv_cache_takes_the_xla_path():
  """With a cache every implementation decodes exactly as xla does (prefill then one step)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 5, 32)), jnp.float32)
  slot_mask = jnp.asarray(np.array([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]], bool))  # left pad
  positions = jnp.maximum(jnp.cumsum(slot_mask[:, :5], axis=1) - 1, 0)
  params = _attention_module('xla').init(jax.random.key(0), x, positions,
                                         attention.attention_mask(slot_mask[:, :5]))
  def decode(impl):
    apply = jax.jit(_attention_module(impl).apply)
    cache = attention.init_kv_cache(2, 6, 2, 16, jnp.float32)
    y1, cache = apply(params, x, positions, attention.attention_mask(
        slot_mask[:, :5], slot_mask, 0), cache, 0)
    y2, _ = apply(params, x[:, :1], positions[:, -1:] + 1, attention.attention_mask(
        jnp.ones((2, 1), bool), slot_mask, 5), cache, 5)
    return y1, y2
  for got, want in zip(decode('splash'), decode('xla')):
    np.testing.assert_array_equal(got, want)


def test_attention_intermediates_carry_checkpoint_names():
  x = jnp.ones((1, 4, 32))
  module = _attention_module('xla')
  mask = attention.attention_mask(jnp.ones((1, 4), bool))
  params = module.init(jax.random.key(0), x, jnp.arange(4)[None], mask)
  jaxpr = jax.make_jaxpr(lambda p: module.apply(p, x, jnp.arange(4)[None], mask))(params)
  names = [e.params['name'] for e in jaxpr.jaxpr.eqns if e.primitive.name == 'name']
  assert names == ['query_proj', 'key_proj', 'value_proj', 'attention_context', 'attention_out']


def _tiny(impl, mesh_sizes):
  """The tiny model, smaller still (dense, two decoder layers, one ViT block): the test is
  about attention, and compiling the train step twice must stay quick."""
  config = load_config('tiny', 'stage1')
  config.model.attention_impl = impl
  config.optimizer.trainable = ()  # every parameter: the ViT's attention backward runs too
  config.model.llm.num_layers = 2
  config.model.vision.depth = 2  # feature_layer -2: one block built
  config.mesh.update(dict(data=1, fsdp=1, expert=1, tensor=1))
  config.mesh.update(mesh_sizes)
  return config


def _train_batch(config, seed):
  rng = np.random.default_rng(seed)
  v, b, t = config.model.vision, 8, 10
  mask = np.arange(t)[None, :] < rng.integers(3, t + 1, (b, 1))  # right padding, as the pipeline
  mask[1, :2] = False  # and padding inside a row
  return {
      'images': rng.normal(size=(b, v.image_size, v.image_size, 3)).astype(np.float32),
      'tokens': rng.integers(0, config.model.llm.vocab_size, (b, t)).astype(np.int32),
      'token_mask': mask, 'loss_mask': mask & (np.arange(t) >= 1),
      'task_id': rng.integers(0, 5, b).astype(np.int32),
      'granularity_id': rng.integers(0, 3, b).astype(np.int32)}


def _train(config, steps=1):
  model = factory.create_model(config)
  mesh = mesh_lib.create_mesh(config)
  tx = optax.sgd(0.1, momentum=0.9)
  state = state_lib.create_train_state(config, model, tx, mesh, jax.random.key(1))
  step = step_lib.make_train_step(config, model, tx, mesh)
  losses = []
  for i in range(steps):
    state, metrics = step(state, _train_batch(config, i))
    losses.append(float(metrics['loss']))
  return losses, jax.device_get(state['params'])


def test_sharded_train_step_with_splash_equals_xla():
  """A sharded train step of the tiny model on data=2 x fsdp=2 x tensor=2 (heads split):
  splash (interpret mode, inside shard_map) gives xla's loss and updated parameters."""
  mesh = dict(data=2, fsdp=2, tensor=2)
  want_losses, want_params = _train(_tiny('xla', mesh))
  got_losses, got_params = _train(_tiny('splash', mesh))
  np.testing.assert_allclose(got_losses, want_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4), got_params,
               want_params)
