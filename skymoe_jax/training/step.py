"""The sharded train step: loss, gradients and the optimizer update, under the mesh's rules."""
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.parallel import sharding
from skymoe_jax.training import loss as loss_lib
from skymoe_jax.training import optimizer as optimizer_lib
from skymoe_jax.training import state as state_lib


def _all_finite(tree):
  """One boolean: no NaN or Inf in any floating-point leaf of tree."""
  flags = [jnp.isfinite(x).all() for x in jax.tree.leaves(tree)
           if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(flags)) if flags else jnp.bool_(True)


def make_train_step(config, model, tx, mesh) -> Callable:
  """state, batch -> (new state, metrics): loss + grads + optimizer update, sharded by the rules.

  The state is donated. A batch placed with any other sharding is moved to the expected one
  first, so the answer never depends on how the caller laid out its inputs. A step whose loss
  or gradient is not finite, or whose update leaves a parameter or optimizer moment that is not
  finite (a learning rate large enough to overflow them), changes nothing: metrics['finite'] is
  False and the caller stops. So every state the step returns is finite, and a checkpoint of
  it is too.
  Frozen parameters (config.optimizer.trainable) get zero updates; the gradient norm is over
  the trainable ones, and XLA drops the unused gradients of the frozen ones.
  """
  _, state_sh = state_lib.state_shardings(config, model, tx, mesh)
  batch_sh = sharding.batch_shardings(mesh, config)
  patterns = tuple(config.optimizer.trainable)

  def step(state, batch):
    grad_fn = jax.value_and_grad(loss_lib.model_loss, has_aux=True)
    (_, metrics), grads = grad_fn(state['params'], model, batch, config)
    trainable = optimizer_lib.trainable_mask(grads, patterns)
    metrics['grad_norm'] = optax.global_norm(
        jax.tree.map(lambda g, m: g if m else None, grads, trainable))
    updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
    params = optax.apply_updates(state['params'], updates)
    new = {'step': state['step'] + 1, 'params': params, 'opt_state': opt_state}
    finite = (jnp.isfinite(metrics['loss']) & jnp.isfinite(metrics['grad_norm']) &
              _all_finite((params, opt_state)))
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
