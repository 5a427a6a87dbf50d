"""Shardings of the parameters and of the batch, from the logical-axis rules.

The parameter tree is built abstractly (jax.eval_shape over model.init: nothing allocated), and
each leaf's logical axis names go through the rule table to mesh axes. A dimension that does not
split evenly, or an expert count the expert axes cannot divide, fails here naming the field.
"""
import math

import flax.linen as nn
import jax

from skymoe_jax.config import ConfigError
from skymoe_jax.data import batch as batch_lib
from skymoe_jax.model import factory
from skymoe_jax.parallel import mesh as mesh_lib


def check_mesh_fits(config, mesh_shape: dict) -> None:
  """Checks that need the mesh's axis sizes ({'data': 2, 'expert': 4, ...})."""
  moe = config.model.moe
  expert_axes = dict(mesh_lib.logical_rules(config)).get('exp') or ()
  expert_axes = expert_axes if isinstance(expert_axes, tuple) else (expert_axes,)
  ways = math.prod(mesh_shape[a] for a in expert_axes)
  if moe.num_experts > 0 and moe.num_experts % ways:
    raise ConfigError(f'config.model.moe.num_experts={moe.num_experts!r}: must be a multiple of '
                      f'the {ways} devices of mesh axes {expert_axes}')


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


def param_shardings(config, mesh, model=None):
  """(abstract params, NamedSharding tree) of config's model on the mesh."""
  check_mesh_fits(config, dict(mesh.shape))
  boxed = factory.abstract_params(config, model)
  params = nn.unbox(boxed)
  shardings = mesh_lib.logical_to_sharding(boxed, mesh, config)
  _check_divisible(params, shardings)
  return params, shardings


def batch_shardings(mesh, config, names=None) -> dict:
  """{name: NamedSharding} of the batch arrays (default: the train step's), batch axis split."""
  names = batch_lib.train_fields(config) if names is None else names
  return {n: mesh_lib.batch_sharding(mesh, config, batch_lib.FIELDS[n].rank) for n in names}
