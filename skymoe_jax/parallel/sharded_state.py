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
from skymoe_jax.train import optimizer as optimizer_lib

BATCH_FIELDS = {'images': 4, 'tokens': 2, 'token_mask': 2, 'loss_mask': 2, 'task_id': 1,
                'granularity_id': 1}
# Only with the contrastive loss (config.train.contrastive_weight > 0).
CONTRASTIVE_FIELDS = {'local_images': 4, 'pair_index': 1}


def batch_fields(config) -> dict:
  """Name -> rank of the batch arrays the train step takes."""
  if config.train.contrastive_weight > 0:
    return {**BATCH_FIELDS, **CONTRASTIVE_FIELDS}
  return dict(BATCH_FIELDS)


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
  opt_sh = optimizer_lib.opt_state_shardings(tx, opt_state, param_sh, replicated)
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
          for name, ndim in batch_fields(config).items()}


def make_train_step(config, model, tx, mesh) -> Callable:
  """state, batch -> (new state, metrics): loss + grads + optimizer update, sharded by the rules.

  The state is donated. A batch placed with any other sharding is moved to the expected one
  first, so the answer never depends on how the caller laid out its inputs. A step whose loss
  or gradient is not finite changes nothing (metrics['finite'] is False; the caller stops).
  Frozen parameters (config.optimizer.trainable) get zero updates; the gradient norm is over
  the trainable ones, and XLA drops the unused gradients of the frozen ones.
  """
  _, state_sh = state_shardings(config, model, tx, mesh)
  batch_sh = batch_shardings(mesh, config)
  patterns = tuple(config.optimizer.trainable)

  def step(state, batch):
    grad_fn = jax.value_and_grad(loss_lib.model_loss, has_aux=True)
    (_, metrics), grads = grad_fn(state['params'], model, batch, config)
    trainable = optimizer_lib.trainable_mask(grads, patterns)
    metrics['grad_norm'] = optax.global_norm(
        jax.tree.map(lambda g, m: g if m else None, grads, trainable))
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    finite = jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm'])
    new = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
    new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, state)
    metrics['finite'] = finite
    metrics['learning_rate'] = optimizer_lib.learning_rate_schedule(
        config.optimizer, max(config.train.total_steps // config.optimizer.grad_accum_steps, 1)
    )(state['step'] // config.optimizer.grad_accum_steps)
    return new, metrics

  jitted = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=(0,))

  def run(state, batch):
    batch = {k: jax.device_put(batch[k], batch_sh[k]) for k in batch_sh}
    with mesh_lib.activate(mesh, config):
      return jitted(state, batch)

  run.jitted = jitted  # for lowering / AOT compilation
  return run
