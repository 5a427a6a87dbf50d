"""Checkpoints: exact round trip, restore onto another mesh, keep-last-N, intervals, mismatches."""
import json
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import load_config
from skymoe_jax import config as config_lib
from skymoe_jax.model import factory
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax import workdir as ckpt_lib
from skymoe_jax.training import state as state_lib
from skymoe_jax.training import optimizer as opt_lib

DATA_STATE = {'next_step': 3, 'seed': 0, 'shard_offsets': [5, 7]}


def _setup(mesh_sizes, trainable=()):
  config = load_config('tiny')
  config.mesh.update(dict(data=1, fsdp=1, expert=1, tensor=1))
  config.mesh.update(mesh_sizes)
  opt_cfg = config_lib.optimizer_defaults()
  opt_cfg.update(learning_rate=1e-2, warmup_fraction=0.0, grad_accum_steps=2,
                 trainable=trainable)
  return config, factory.create_model(config), opt_lib.make_optimizer(opt_cfg, 10), \
      mesh_lib.create_mesh(config)


def _filled(abstract, shardings):
  """A state with distinct values in every leaf (moments and counters too), made on the host
  and placed with the given shardings: the train state's real layout without compiling an init
  or an update (compiles dominate this file's time on a 2-core machine)."""
  leaves, treedef = jax.tree.flatten(abstract)
  out = []
  for i, x in enumerate(leaves):
    if np.issubdtype(x.dtype, np.floating):
      out.append(np.sin(np.arange(x.size) * 0.37 + i).reshape(x.shape).astype(x.dtype))
    else:
      out.append(np.full(x.shape, i + 1, x.dtype))
  return jax.device_put(treedef.unflatten(out), shardings)


def _assert_equal_trees(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                  err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope='module')
def saved(tmp_path_factory):
  """A tiny-model train state on data=8 (every leaf made distinct), saved at step 3."""
  config, model, tx, mesh = _setup(dict(data=8))
  state = _filled(*state_lib.state_shardings(config, model, tx, mesh))
  host = jax.device_get(state)
  directory = tmp_path_factory.mktemp('ckpt')
  with ckpt_lib.Checkpointer(directory, save_interval_steps=1) as ckpt:
    assert ckpt.save(3, state, DATA_STATE)
    ckpt.wait()
  return directory, host


def test_round_trip_is_exact(saved):
  directory, host = saved
  config, model, tx, mesh = _setup(dict(data=8))
  abstract, shardings = state_lib.state_shardings(config, model, tx, mesh)
  with ckpt_lib.Checkpointer(directory) as ckpt:  # a fresh manager, as after a restart
    assert ckpt.latest_step() == 3
    state, data = ckpt.restore(None, ckpt_lib.abstract_like(abstract, shardings))
  assert data == DATA_STATE
  _assert_equal_trees(state, host)
  assert isinstance(state['opt_state'], optax.MultiStepsState)  # accumulator included
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert x.sharding == s


def test_restore_onto_a_different_mesh(saved):
  directory, host = saved
  config, model, tx, mesh = _setup(dict(data=2, fsdp=2, expert=2))
  abstract, shardings = state_lib.state_shardings(config, model, tx, mesh)
  with ckpt_lib.Checkpointer(directory) as ckpt:
    state, data = ckpt.restore(3, ckpt_lib.abstract_like(abstract, shardings))
  assert data == DATA_STATE
  _assert_equal_trees(state, host)
  for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings)):
    assert x.sharding == s
  w_gate = state['params']['decoder']['blocks']['layer_0']['moe']['w_gate']
  assert w_gate.sharding.spec[1] == 'expert' and w_gate.sharding.mesh.shape['fsdp'] == 2
  mu = state['opt_state'].inner_opt_state[1][0].mu['decoder']['blocks']['layer_0']['moe']
  assert mu['w_gate'].sharding.spec == w_gate.sharding.spec


def test_frozen_state_round_trip_and_mismatch_names_the_paths(tmp_path):
  """Stage I: frozen leaves hold no state; adding or dropping a parameter is named on restore."""
  config, model, tx, mesh = _setup(dict(data=2, expert=4), config_lib.STAGE_I_TRAINABLE)
  abstract, shardings = state_lib.state_shardings(config, model, tx, mesh)
  state = _filled(abstract, shardings)
  assert any(isinstance(x, optax.MaskedNode) for x in jax.tree.leaves(
      state['opt_state'], is_leaf=lambda x: isinstance(x, optax.MaskedNode)))
  host = jax.device_get(state)
  target = ckpt_lib.abstract_like(abstract, shardings)
  with ckpt_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(2, state, {'next_step': 2})
    restored, data = ckpt.restore(2, target)
    _assert_equal_trees(restored, host)
    assert data == {'next_step': 2}

    replicated = shardings['step']
    extra = jax.tree.map(lambda x: x, target)
    extra['params']['projector']['fc3'] = jax.ShapeDtypeStruct((4,), jnp.float32,
                                                               sharding=replicated)
    missing = jax.tree.map(lambda x: x, target)
    del missing['params']['decoder']['lm_head']
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r'missing from the checkpoint: params/projector/fc3'):
      ckpt.restore(2, extra)
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r'not in the target: params/decoder/lm_head'):
      ckpt.restore(2, missing)
    reshaped = jax.tree.map(lambda x: x, target)
    reshaped['params']['decoder']['embed'] = jax.ShapeDtypeStruct((128, 64), jnp.float32,
                                                                  sharding=replicated)
    with pytest.raises(ckpt_lib.CheckpointMismatchError,
                       match=r'params/decoder/embed \(256, 64\) \(saved\) vs \(128, 64\)'):
      ckpt.restore(2, reshaped)
    unsharded = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)
    with pytest.raises(ValueError, match='has no sharding'):
      ckpt.restore(2, unsharded)


def _small_state(mesh, value=0.0):
  sh = jax.sharding.NamedSharding(mesh, jax.P('data'))
  return {'step': jnp.zeros((), jnp.int32),
          'params': {'w': jax.device_put(jnp.full((8, 4), value), sh)}}


def test_interval_force_and_keep_last_n(tmp_path):
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  with ckpt_lib.Checkpointer(tmp_path, save_interval_steps=2, max_to_keep=2) as ckpt:
    did = [ckpt.save(s, _small_state(mesh, s), {'next_step': s}) for s in range(1, 8)]
    assert did == [False, True, False, True, False, True, False]
    ckpt.wait()
    assert ckpt.all_steps() == [4, 6]  # 2 deleted: only the last two kept
    assert ckpt.save(7, _small_state(mesh, 7), {'next_step': 7}, force=True)
    assert not ckpt.save(7, _small_state(mesh, 7), {'next_step': 7}, force=True)  # exists
    ckpt.wait()
    assert ckpt.all_steps() == [6, 7]
  assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [6, 7]


def test_async_save_survives_donation_then_restores(tmp_path):
  mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
  state = _small_state(mesh, 1.5)
  expected = jax.device_get(state)
  step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=(0,))
  ckpt = ckpt_lib.Checkpointer(tmp_path, async_save=True)
  try:
    assert ckpt.save(1, state, {'next_step': 1})
    state = step(state)  # the train step donates the buffers while the write may still run
    ckpt.wait()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    restored, data = ckpt.restore(1, target)
  finally:
    ckpt.close()
  _assert_equal_trees(restored, expected)
  assert data == {'next_step': 1}


def test_read_config_gives_newer_fields_their_defaults(tmp_path):
  """A workdir written before a field existed still loads (chat, export, evaluate read it):
  the missing field takes base_config's default; data.sources entries get nothing added."""
  config = load_config('tiny')
  saved = json.loads(config.to_json_best_effort())
  del saved['model']['attention_impl']
  del saved['mesh']['tensor']
  (tmp_path / ckpt_lib.CONFIG_FILE).write_text(json.dumps(saved))
  read = ckpt_lib.read_config(tmp_path)
  assert read.model.attention_impl == config_lib.base_config().model.attention_impl
  assert read.mesh.tensor == config_lib.base_config().mesh.tensor
  assert read.model.moe.num_experts == config.model.moe.num_experts  # saved values kept
  assert read.data.sources.to_dict() == config.data.sources.to_dict()
