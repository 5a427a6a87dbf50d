"""The train state {'step', 'params', 'opt_state'}, created directly in its sharded layout.

The parameter tree is first built abstractly, its shardings come from the logical-axis rules
(parallel/sharding.py), and init runs under jit with those out_shardings: a model larger than one
device never exists unsharded. The optimizer state follows the shardings of its parameters.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from skymoe_jax.model import factory
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.parallel import sharding
from skymoe_jax.training import optimizer as optimizer_lib


def state_shardings(config, model, tx, mesh):
  """(abstract state, NamedSharding tree) for {'step', 'params', 'opt_state'}."""
  params, param_sh = sharding.param_shardings(config, mesh, model)
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


def replace_params(state, params, tx, mesh, config, shardings):
  """`state` with other params (stage II's upcycled ones, imported weights) and a fresh
  optimizer state for them, on its shards."""
  with mesh_lib.activate(mesh, config):
    opt_state = jax.jit(tx.init, out_shardings=shardings['opt_state'])(params)
  return {'step': state['step'], 'params': params, 'opt_state': opt_state}
