"""The optimizer: schedule by hand, clipping, accumulation, the trainable mask on real paths."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from skymoe_jax import config as config_lib
from skymoe_jax.model import factory, layout
from skymoe_jax.training import optimizer as opt_lib


def _cfg(**overrides):
  cfg = config_lib.optimizer_defaults()
  cfg.update(overrides)
  return cfg


def test_schedule_by_hand():
  cfg = _cfg(learning_rate=1e-3, warmup_fraction=0.1, min_lr_ratio=0.1)
  lr = opt_lib.learning_rate_schedule(cfg, total_steps=100)  # 10 warm-up steps
  want = {0: 0.0, 5: 5e-4, 10: 1e-3,
          55: 1e-4 + 0.9e-3 * 0.5,                                # cosine midpoint
          32: 1e-4 + 0.9e-3 * 0.5 * (1 + math.cos(math.pi * 22 / 90)),
          100: 1e-4, 150: 1e-4}                                  # the end, and held after it
  for step, value in want.items():
    np.testing.assert_allclose(float(lr(step)), value, rtol=1e-6, atol=1e-12, err_msg=step)
  # Defaults: 3% warm-up, cosine to 0.
  lr = opt_lib.learning_rate_schedule(_cfg(learning_rate=2e-4), total_steps=1000)
  np.testing.assert_allclose([float(lr(s)) for s in (15, 30, 1000)], [1e-4, 2e-4, 0.0],
                             atol=1e-12)


def test_no_warmup_starts_at_peak():
  lr = opt_lib.learning_rate_schedule(_cfg(learning_rate=1.0, warmup_fraction=0.0), 10)
  np.testing.assert_allclose([float(lr(0)), float(lr(5)), float(lr(10))], [1.0, 0.5, 0.0],
                             atol=1e-7)


def _constant_lr(**overrides):
  return _cfg(warmup_fraction=0.0, min_lr_ratio=1.0, weight_decay=0.0, **overrides)


def test_clipping_scales_a_norm_10_gradient_to_1():
  params = {'w': jnp.zeros(4)}
  grads = {'w': jnp.array([6.0, 8.0, 0.0, 0.0])}  # norm 10
  clip = optax.clip_by_global_norm(1.0)
  clipped, _ = clip.update(grads, clip.init(params))
  np.testing.assert_allclose(clipped['w'], [0.6, 0.8, 0, 0], rtol=1e-6)
  # Inside the optimizer: with b1=b2=0 Adam's step is g / |g| per element, so compare the
  # clipped optimizer on g with the unclipped one on g / 10 (same direction, norm 1): equal
  # only if clipping happened before Adam.
  cfg = _constant_lr(grad_clip_norm=1.0, b1=0.0, b2=0.0, eps=1.0, learning_rate=1.0)
  tx = opt_lib.make_optimizer(cfg, 10)
  upd, _ = tx.update(grads, tx.init(params), params)
  tx_ref = opt_lib.make_optimizer(_constant_lr(grad_clip_norm=0.0, b1=0.0, b2=0.0, eps=1.0,
                                            learning_rate=1.0), 10)
  ref, _ = tx_ref.update({'w': grads['w'] / 10}, tx_ref.init(params), params)
  np.testing.assert_allclose(upd['w'], ref['w'], rtol=1e-6)
  np.testing.assert_allclose(upd['w'], -np.array([0.6, 0.8, 0, 0]) / 1.0 / (
      1 + np.array([0.6, 0.8, 0, 0])), rtol=1e-6)  # -g / (|g| + eps) with eps=1


def test_accumulation_equals_one_step_with_the_mean_gradient():
  k = 4
  rng = np.random.default_rng(0)
  params = {'a': jnp.asarray(rng.normal(size=(3, 5)), jnp.float32),
            'b': jnp.asarray(rng.normal(size=(5,)), jnp.float32)}
  micro = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
           for _ in range(2 * k)]
  cfg = dict(learning_rate=1e-2, warmup_fraction=0.0, weight_decay=0.1, grad_clip_norm=1.0)
  tx_acc = opt_lib.make_optimizer(_cfg(grad_accum_steps=k, **cfg), total_steps=5)
  tx_one = opt_lib.make_optimizer(_cfg(**cfg), total_steps=5)
  step_acc = jax.jit(tx_acc.update)
  p_acc, s_acc = params, tx_acc.init(params)
  p_one, s_one = params, tx_one.init(params)
  for big_step in range(2):
    for i in range(k):
      upd, s_acc = step_acc(micro[big_step * k + i], s_acc, p_acc)
      if i < k - 1:  # nothing moves before the k-th micro-batch
        assert all(not np.any(u) for u in jax.tree.leaves(upd))
      p_acc = optax.apply_updates(p_acc, upd)
    mean = jax.tree.map(lambda *g: sum(g) / k, *micro[big_step * k:(big_step + 1) * k])
    upd, s_one = tx_one.update(mean, s_one, p_one)
    p_one = optax.apply_updates(p_one, upd)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), p_acc,
                 p_one)
  # The schedule counts optimizer steps, not micro-batches.
  assert int(s_acc.gradient_step) == 2 and int(s_acc.inner_opt_state[1][0].count) == 2


@pytest.fixture(scope='module')
def tiny_params():
  config = load_config('tiny')
  return nn.unbox(factory.abstract_params(config))


def _paths(params, mask):
  return sorted(layout.param_path(p) for (p, _), m in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(mask)) if m)


STAGE_I = [f'decoder/blocks/layer_{i}/attn/{proj}_lora/{ab}'
           for i in (0, 1) for proj in ('query', 'value') for ab in ('a', 'b')] + [
               'projector/fc1/bias', 'projector/fc1/kernel', 'projector/fc2/bias',
               'projector/fc2/kernel']
# Scanned layers: layer_0 of the (MoE, dense) block holds every MoE layer's weights.
STAGE_II = [f'decoder/blocks/layer_0/moe/{n}' for n in (
    'condition_proj', 'granularity_embed', 'router', 'task_embed', 'w_down', 'w_gate', 'w_up')]


def test_trainable_mask_on_the_tiny_model(tiny_params):
  mask = opt_lib.trainable_mask(tiny_params, config_lib.STAGE_I_TRAINABLE)
  assert jax.tree.structure(mask) == jax.tree.structure(tiny_params)
  assert _paths(tiny_params, mask) == sorted(STAGE_I)
  mask = opt_lib.trainable_mask(tiny_params, config_lib.STAGE_II_TRAINABLE)
  assert _paths(tiny_params, mask) == sorted(STAGE_II)
  assert all(jax.tree.leaves(opt_lib.trainable_mask(tiny_params, ())))
  # Boxed (logically partitioned) params give the same mask.
  boxed = factory.abstract_params(load_config('tiny'))
  assert jax.tree.leaves(opt_lib.trainable_mask(boxed, config_lib.STAGE_I_TRAINABLE)) == \
      jax.tree.leaves(opt_lib.trainable_mask(tiny_params, config_lib.STAGE_I_TRAINABLE))
  with pytest.raises(ValueError, match=r"pattern '.\*/mooe/.\*' matches no parameter"):
    opt_lib.trainable_mask(tiny_params, ('.*/mooe/.*',))


def _real_params(abstract):
  rng = np.random.default_rng(1)
  return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), abstract)


@pytest.mark.parametrize('accum', [1, 2])
def test_frozen_params_never_change_and_hold_no_state(tiny_params, accum):
  params = _real_params(tiny_params)
  common = dict(learning_rate=1e-2, warmup_fraction=0.0, weight_decay=0.1,
                grad_accum_steps=accum)
  tx = opt_lib.make_optimizer(_cfg(trainable=config_lib.STAGE_I_TRAINABLE, **common), 10)
  mask = opt_lib.trainable_mask(params, config_lib.STAGE_I_TRAINABLE)
  tx_full = opt_lib.make_optimizer(_cfg(**common), total_steps=10)
  state, full = tx.init(params), tx_full.init(params)

  # State only for the trainable leaves: Adam's mu and nu (+ accumulator) and a few counters.
  per_param = 2 + (accum > 1)
  n_leaves, size = opt_lib.count_state(state)
  n_full, size_full = opt_lib.count_state(full)
  trainable = [p for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(mask)) if m]
  counters = n_full - per_param * len(jax.tree.leaves(params))
  assert n_leaves == per_param * len(trainable) + counters
  assert size == per_param * sum(p.size for p in trainable) + counters
  assert size < size_full / 10
  masked_nodes = [x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(
      x, optax.MaskedNode)) if isinstance(x, optax.MaskedNode)]
  assert len(masked_nodes) == per_param * (len(jax.tree.leaves(params)) - len(trainable))

  update = jax.jit(tx.update)
  new = params
  for i in range(2 * accum):
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5 + i, p.dtype), params)
    upd, state = update(grads, state, new)
    new = optax.apply_updates(new, upd)
  for p, m, old, now in zip(_paths(params, jax.tree.map(lambda _: True, mask)),
                            jax.tree.leaves(mask), jax.tree.leaves(params), jax.tree.leaves(new)):
    if m:
      assert np.any(np.asarray(now) != np.asarray(old)), p
    else:
      np.testing.assert_array_equal(now, old, err_msg=p)

  # An explicit mask pytree gives the same state layout as the patterns.
  tx_tree = opt_lib.make_optimizer(_cfg(**common), 10, trainable_mask=mask)
  assert jax.tree.structure(tx_tree.init(params)) == jax.tree.structure(state)


def test_opt_state_shardings_keep_frozen_leaves_empty(tiny_params):
  from jax.sharding import NamedSharding
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  param_sh = jax.tree.map(
      lambda p: NamedSharding(mesh, jax.P('data') if p.shape[0] % 8 == 0 else jax.P()),
      tiny_params)
  cfg = _cfg(grad_accum_steps=2, trainable=config_lib.STAGE_II_TRAINABLE)
  tx = opt_lib.make_optimizer(cfg, 10)
  abstract = jax.eval_shape(tx.init, tiny_params)
  replicated = NamedSharding(mesh, jax.P())
  sh = opt_lib.opt_state_shardings(tx, abstract, param_sh, replicated)
  assert jax.tree.structure(sh) == jax.tree.structure(abstract)
  inner = sh.inner_states['trainable'].inner_state  # MultiStepsState
  w = inner.inner_opt_state[1][0].mu['decoder']['blocks']['layer_0']['moe']['w_gate']
  assert w == param_sh['decoder']['blocks']['layer_0']['moe']['w_gate']
  assert isinstance(inner.acc_grads['decoder']['embed'], optax.MaskedNode)
  assert inner.mini_step == replicated
  # Placed with these shardings, the state initialises under jit.
  state = jax.jit(tx.init, out_shardings=sh)(_real_params(tiny_params))
  assert jax.tree.structure(state) == jax.tree.structure(abstract)
