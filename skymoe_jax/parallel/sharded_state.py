"""Train state created directly in its sharded layout, and the sharded train step.

The parameter tree is first built abstractly (jax.eval_shape), its shardings come from the
logical-axis rules, and init runs under jit with those out_shardings: a model larger than one
device never exists unsharded. The optimizer state follows the shardings of its parameters.
"""
import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from skymoe_jax import config_defaults
from skymoe_jax.model import factory
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.train import loss as loss_lib

BATCH_FIELDS = {'images': 4, 'tokens': 2, 'token_mask': 2, 'loss_mask': 2, 'task_id': 1,
                'granularity_id': 1}


def _check_divisible(abstract_params, shardings):
  """Every sharded dim must split evenly; the error names the parameter and the axes."""
  for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                    jax.tree.leaves(shardings)):
    for dim, axes in zip(leaf.shape, sharding.spec):
      axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
      parts = math.prod(sharding.mesh.shape[a] for a in axes)
      if dim % parts:
        raise ValueError(f'parameter {jax.tree_util.keystr(path)} of shape {leaf.shape} cannot be '
                         f'split {parts} ways over mesh axes {axes}: change config.mesh or the '
                         'model size')


def state_shardings(config, model, tx, mesh):
  """(abstract state, NamedSharding tree) for {'step', 'params', 'opt_state'}."""
  config_defaults.validate_for_mesh(config, dict(mesh.shape))
  boxed = jax.eval_shape(
      lambda: model.init(jax.random.key(0), *factory.example_inputs(config))['params'])
  params = nn.unbox(boxed)
  param_sh = mesh_lib.logical_to_sharding(boxed, mesh, config)
  _check_divisible(params, param_sh)
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  opt_state = jax.eval_shape(tx.init, params)
  opt_sh = optax.tree_map_params(tx, lambda _, s: s, opt_state, param_sh,
                                 transform_non_params=lambda _: replicated)
  abstract = {'step': jax.ShapeDtypeStruct((), jnp.int32), 'params': params,
              'opt_state': opt_state}
  return abstract, {'step': replicated, 'params': param_sh, 'opt_state': opt_sh}


def create_train_state(config, model, tx, mesh, rng):
  """The initial train state, each array created on its shards."""
  _, shardings = state_shardings(config, model, tx, mesh)

  def init(rng):
    params = nn.unbox(model.init(rng, *factory.example_inputs(config))['params'])
    return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt_state': tx.init(params)}

  with mesh_lib.activate(mesh, config):
    return jax.jit(init, out_shardings=shardings)(rng)


def batch_shardings(mesh, config):
  return {name: mesh_lib.batch_sharding(mesh, config, ndim)
          for name, ndim in BATCH_FIELDS.items()}


def make_train_step(config, model, tx, mesh) -> Callable:
  """state, batch -> (new state, metrics): loss + grads + optimizer update, sharded by the rules.

  The state is donated. A batch placed with any other sharding is moved to the expected one
  first, so the answer never depends on how the caller laid out its inputs.
  """
  _, state_sh = state_shardings(config, model, tx, mesh)
  batch_sh = batch_shardings(mesh, config)

  def step(state, batch):
    grad_fn = jax.value_and_grad(loss_lib.model_loss, has_aux=True)
    (_, metrics), grads = grad_fn(state['params'], model, batch, config.model.moe)
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    metrics['grad_norm'] = optax.global_norm(grads)
    return {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}, metrics

  jitted = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=(0,))

  def run(state, batch):
    batch = {k: jax.device_put(batch[k], batch_sh[k]) for k in BATCH_FIELDS}
    with mesh_lib.activate(mesh, config):
      return jitted(state, batch)

  run.jitted = jitted  # for lowering / AOT compilation
  return run
