"""Sharded == unsharded on 8 forced CPU devices: meshes, rules, expert parallelism, train step."""
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

from conftest import load_config
from skymoe_jax.model import factory
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.parallel import sharding
from skymoe_jax.training import state as state_lib
from skymoe_jax.training import step as step_lib
from skymoe_jax.training import loss as loss_lib

BATCH = 8
TEXT = 6


def _batch(config, seed=0, batch=BATCH):
  """A random training batch of `batch` rows, TEXT text tokens, some padding."""
  rng = np.random.default_rng(seed)
  v = config.model.vision
  mask = np.ones((batch, TEXT), bool)
  mask[1, :2] = False  # some padding
  return {
      'images': rng.normal(size=(batch, v.image_size, v.image_size, 3)).astype(np.float32),
      'tokens': rng.integers(0, config.model.llm.vocab_size, (batch, TEXT)).astype(np.int32),
      'token_mask': mask,
      'loss_mask': mask & (np.arange(TEXT) >= 2),
      'task_id': rng.integers(0, 5, batch).astype(np.int32),
      'granularity_id': rng.integers(0, 3, batch).astype(np.int32),
  }


def _configured(mesh_sizes, strategy='ring', backend='ragged'):
  config = load_config('tiny')
  config.mesh.update(dict(data=1, fsdp=1, expert=1, tensor=1))
  config.mesh.update(mesh_sizes)
  config.model.moe.update(ep_strategy=strategy, backend=backend, capacity_factor=8.0)
  return config


@pytest.fixture(scope='module')
def reference():
  """Unsharded (no mesh) params, loss, metrics and gradients of the tiny model."""
  config = _configured({}, strategy='none')
  model = factory.create_model(config)
  batch = _batch(config)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), *factory.example_inputs(
      config)))['params'])()
  grad_fn = jax.jit(jax.value_and_grad(
      lambda p, b: loss_lib.model_loss(p, model, b, config), has_aux=True))
  (loss, metrics), grads = grad_fn(params, batch)
  return params, batch, loss, metrics, grads


MESHES = [
    (dict(expert=4), 'ring', 'ragged'),
    (dict(data=2, expert=4), 'ring', 'ragged'),
    (dict(data=2, fsdp=2, expert=2), 'ring', 'ragged'),
    (dict(tensor=2, expert=2), 'ring', 'dense'),
    (dict(data=2, expert=4), 'all_to_all', 'capacity'),
    (dict(data=2, fsdp=2, expert=2), 'all_to_all', 'capacity'),
    (dict(tensor=2, expert=2), 'all_to_all', 'capacity'),
]


@pytest.mark.parametrize('mesh_sizes, strategy, backend', MESHES)
def test_sharded_loss_and_grads_equal_unsharded(reference, mesh_sizes, strategy, backend):
  params, batch, ref_loss, ref_metrics, ref_grads = reference
  config = _configured(mesh_sizes, strategy, backend)
  model = factory.create_model(config)
  mesh = mesh_lib.create_mesh(config)
  boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), *factory.example_inputs(config))[
      'params'])
  sharded_params = jax.device_put(params, mesh_lib.logical_to_sharding(boxed, mesh, config))
  sharded_batch = jax.device_put(batch, sharding.batch_shardings(mesh, config))
  grad_fn = jax.jit(jax.value_and_grad(
      lambda p, b: loss_lib.model_loss(p, model, b, config), has_aux=True))
  with mesh_lib.activate(mesh, config):
    (loss, metrics), grads = grad_fn(sharded_params, sharded_batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics['expert_load'], ref_metrics['expert_load'], atol=1e-6)
  assert float(metrics['dropped_fraction']) == 0.0
  jax.tree.map(lambda g, r: np.testing.assert_allclose(g, r, atol=2e-5, rtol=1e-4), grads,
               ref_grads)
  # The expert weights really are split over the expert axis.
  w = sharded_params['decoder']['blocks']['layer_0']['moe']['w_gate']
  assert w.sharding.spec[1] == 'expert'


def test_capacity_drops_are_counted_across_devices(reference):
  """A tight capacity drops assignments; the all_to_all count equals a per-device numpy count."""
  params, batch, *_ = reference
  config = _configured(dict(data=2, expert=4), 'all_to_all', 'capacity')
  config.model.moe.capacity_factor = 0.5
  model = factory.create_model(config)
  mesh = mesh_lib.create_mesh(config)
  with mesh_lib.activate(mesh, config):
    _, aux = jax.jit(model.apply)({'params': params}, batch['images'], batch['tokens'],
                                  batch['token_mask'], batch['task_id'], batch['granularity_id'])
  dropped = np.asarray(aux['moe']['num_dropped'])
  assert (dropped > 0).all() and (dropped < np.asarray(aux['moe']['num_routed'])).all()


def _train_losses(config, params, steps=2, wrong_sharding_steps=()):
  model = factory.create_model(config)
  mesh = mesh_lib.create_mesh(config)
  # SGD: updates linear in the gradients (Adam's m / sqrt(v) blows up float noise in ~0 grads).
  tx = optax.sgd(0.1, momentum=0.9)
  state = state_lib.create_train_state(config, model, tx, mesh, jax.random.key(1))
  _, state_sh = state_lib.state_shardings(config, model, tx, mesh)
  params = jax.device_get(params)  # host copy: the step donates (deletes) its input state
  state = dict(state, params=jax.device_put(params, state_sh['params']),
               opt_state=jax.device_put(tx.init(params), state_sh['opt_state']))
  step = step_lib.make_train_step(config, model, tx, mesh)
  losses = []
  for i in range(steps):
    batch = _batch(config, seed=i)
    if i in wrong_sharding_steps:  # fields split over their last axis: a mismatched layout
      batch = {k: jax.device_put(v, jax.sharding.NamedSharding(
          mesh, jax.P(*([None] * (v.ndim - 1)), 'expert') if v.shape[-1] % 4 == 0 else jax.P()))
               for k, v in batch.items()}
    state, metrics = step(state, batch)
    losses.append(float(metrics['loss']))
  return losses, state


def test_sharded_train_step_matches_single_device(reference):
  params = reference[0]
  single, single_state = _train_losses(_configured(dict(data=1)), params)
  # The second sharded step gets inputs laid out some other way: the step reshards them.
  sharded, sharded_state_ = _train_losses(_configured(dict(data=2, expert=4)), params,
                                          wrong_sharding_steps=(1,))
  np.testing.assert_allclose(sharded, single, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               jax.device_get(sharded_state_['params']), jax.device_get(single_state['params']))
  assert int(sharded_state_['step']) == 2


# Every parameter's PartitionSpec for the tiny config on fsdp=2 x expert=2 x tensor=2
# (scanned layers add a leading unsharded 'layers' axis).
GOLDEN_SPECS = {
    "['decoder']['blocks']['layer_0']['attn']['key']['kernel']": (None, 'fsdp', 'tensor', None),
    "['decoder']['blocks']['layer_0']['attn']['out']['kernel']": (None, 'tensor', None, 'fsdp'),
    "['decoder']['blocks']['layer_0']['attn']['query']['kernel']": (None, 'fsdp', 'tensor', None),
    "['decoder']['blocks']['layer_0']['attn']['query_lora']['a']": (None, 'fsdp', None),
    "['decoder']['blocks']['layer_0']['attn']['query_lora']['b']": (None, None, 'tensor', None),
    "['decoder']['blocks']['layer_0']['attn']['value']['kernel']": (None, 'fsdp', 'tensor', None),
    "['decoder']['blocks']['layer_0']['attn']['value_lora']['a']": (None, 'fsdp', None),
    "['decoder']['blocks']['layer_0']['attn']['value_lora']['b']": (None, None, 'tensor', None),
    "['decoder']['blocks']['layer_0']['attn_norm']['scale']": (None, None),
    "['decoder']['blocks']['layer_0']['ffn_norm']['scale']": (None, None),
    "['decoder']['blocks']['layer_0']['moe']['condition_proj']": (None, None, 'expert'),
    "['decoder']['blocks']['layer_0']['moe']['granularity_embed']": (None, None, None),
    "['decoder']['blocks']['layer_0']['moe']['router']": (None, 'fsdp', 'expert'),
    "['decoder']['blocks']['layer_0']['moe']['task_embed']": (None, None, None),
    "['decoder']['blocks']['layer_0']['moe']['w_down']": (None, 'expert', 'tensor', 'fsdp'),
    "['decoder']['blocks']['layer_0']['moe']['w_gate']": (None, 'expert', 'fsdp', 'tensor'),
    "['decoder']['blocks']['layer_0']['moe']['w_up']": (None, 'expert', 'fsdp', 'tensor'),
    "['decoder']['blocks']['layer_1']['attn']['key']['kernel']": (None, 'fsdp', 'tensor', None),
    "['decoder']['blocks']['layer_1']['attn']['out']['kernel']": (None, 'tensor', None, 'fsdp'),
    "['decoder']['blocks']['layer_1']['attn']['query']['kernel']": (None, 'fsdp', 'tensor', None),
    "['decoder']['blocks']['layer_1']['attn']['query_lora']['a']": (None, 'fsdp', None),
    "['decoder']['blocks']['layer_1']['attn']['query_lora']['b']": (None, None, 'tensor', None),
    "['decoder']['blocks']['layer_1']['attn']['value']['kernel']": (None, 'fsdp', 'tensor', None),
    "['decoder']['blocks']['layer_1']['attn']['value_lora']['a']": (None, 'fsdp', None),
    "['decoder']['blocks']['layer_1']['attn']['value_lora']['b']": (None, None, 'tensor', None),
    "['decoder']['blocks']['layer_1']['attn_norm']['scale']": (None, None),
    "['decoder']['blocks']['layer_1']['ffn_norm']['scale']": (None, None),
    "['decoder']['blocks']['layer_1']['mlp']['down']['kernel']": (None, 'tensor', 'fsdp'),
    "['decoder']['blocks']['layer_1']['mlp']['gate']['kernel']": (None, 'fsdp', 'tensor'),
    "['decoder']['blocks']['layer_1']['mlp']['up']['kernel']": (None, 'fsdp', 'tensor'),
    "['decoder']['embed']": ('tensor', 'fsdp'),
    "['decoder']['final_norm']['scale']": (None,),
    "['decoder']['lm_head']": ('fsdp', 'tensor'),
    "['projector']['fc1']['bias']": ('tensor',),
    "['projector']['fc1']['kernel']": (None, 'tensor'),
    "['projector']['fc2']['bias']": ('fsdp',),
    "['projector']['fc2']['kernel']": ('tensor', 'fsdp'),
    "['vision']['cls_token']": ('fsdp',),
    "['vision']['layers']['key']['bias']": (None, 'tensor', None),
    "['vision']['layers']['key']['kernel']": (None, 'fsdp', 'tensor', None),
    "['vision']['layers']['mlp']['fc1']['bias']": (None, 'tensor'),
    "['vision']['layers']['mlp']['fc1']['kernel']": (None, 'fsdp', 'tensor'),
    "['vision']['layers']['mlp']['fc2']['bias']": (None, 'fsdp'),
    "['vision']['layers']['mlp']['fc2']['kernel']": (None, 'tensor', 'fsdp'),
    "['vision']['layers']['norm1']['bias']": (None, None),
    "['vision']['layers']['norm1']['scale']": (None, None),
    "['vision']['layers']['norm2']['bias']": (None, None),
    "['vision']['layers']['norm2']['scale']": (None, None),
    "['vision']['layers']['out']['bias']": (None, 'fsdp'),
    "['vision']['layers']['out']['kernel']": (None, 'tensor', None, 'fsdp'),
    "['vision']['layers']['query']['bias']": (None, 'tensor', None),
    "['vision']['layers']['query']['kernel']": (None, 'fsdp', 'tensor', None),
    "['vision']['layers']['value']['bias']": (None, 'tensor', None),
    "['vision']['layers']['value']['kernel']": (None, 'fsdp', 'tensor', None),
    "['vision']['patch_embed']['kernel']": (None, None, None, 'fsdp'),
    "['vision']['pos_embed']": (None, 'fsdp'),
    "['vision']['pre_norm']['bias']": (None,),
    "['vision']['pre_norm']['scale']": (None,),
}


def test_golden_partition_specs_and_nothing_large_replicated():
  config = _configured(dict(fsdp=2, expert=2, tensor=2))
  model = factory.create_model(config)
  mesh = mesh_lib.create_mesh(config)
  abstract, shardings = state_lib.state_shardings(config, model, optax.adamw(1e-3), mesh)
  specs = {jax.tree_util.keystr(path): tuple(s.spec) + (None,) * (len(leaf.shape) - len(s.spec))
           for (path, leaf), s in zip(
               jax.tree_util.tree_flatten_with_path(abstract['params'])[0],
               jax.tree.leaves(shardings['params']))}
  assert specs == GOLDEN_SPECS
  for (path, leaf), s in zip(jax.tree_util.tree_flatten_with_path(abstract['params'])[0],
                             jax.tree.leaves(shardings['params'])):
    if np.prod(leaf.shape) >= 1024:
      assert any(a is not None for a in s.spec), f'{jax.tree_util.keystr(path)} is replicated'
  # Adam moments follow their parameters.
  mu = shardings['opt_state'][0].mu
  assert mu['decoder']['embed'].spec == shardings['params']['decoder']['embed'].spec


def test_mesh_errors_name_the_problem():
  with pytest.raises(ValueError, match='needs 16 devices'):
    mesh_lib.create_mesh(_configured(dict(data=4, expert=4)))
  config = _configured(dict(expert=8))  # tiny has 4 experts
  model = factory.create_model(config)
  with pytest.raises(ValueError, match=r'config.model.moe.num_experts=4: must be a multiple '):
    state_lib.state_shardings(config, model, optax.adamw(1e-3),
                                  mesh_lib.create_mesh(config))
  config = _configured(dict(tensor=8))  # tiny has 2 KV heads
  model = factory.create_model(config)
  with pytest.raises(ValueError, match=r"\['attn'\]\['key'\]\['kernel'\].*cannot be split 8 ways"):
    state_lib.state_shardings(config, model, optax.adamw(1e-3),
                                  mesh_lib.create_mesh(config))
  config = _configured(dict(data=-1, expert=2))
  assert mesh_lib.create_mesh(config).shape == {'data': 4, 'fsdp': 1, 'expert': 2, 'tensor': 1}


def test_ragged_all_to_all_is_refused_on_cpu(reference):
  params, batch, *_ = reference
  config = _configured(dict(data=2, expert=4), 'ragged_all_to_all')
  model = factory.create_model(config)
  mesh = mesh_lib.create_mesh(config)
  with mesh_lib.activate(mesh, config), pytest.raises(NotImplementedError,
                                                      match='ragged_all_to_all does not run on CPU'):
    jax.jit(model.apply)({'params': params}, batch['images'], batch['tokens'],
                         batch['token_mask'], batch['task_id'], batch['granularity_id'])
