"""Building the model from a config, its example inputs, and the checks of its named choices."""
import jax
import jax.numpy as jnp
import ml_collections

from skymoe_jax import config as config_lib
from skymoe_jax import registry
from skymoe_jax.data import batch as batch_lib
from skymoe_jax.model import attention_kernels, layers
from skymoe_jax.model.moe import backends, expert_parallel
from skymoe_jax.model.skymoe import SkyMoE


def validate(config) -> None:
  """config.validate plus the model's named choices, each checked by the registry that owns it
  (a ConfigError names the field). Called before anything is built."""
  config_lib.validate(config)
  m = config.model
  registry.lookup(layers.REMAT_POLICIES, m.remat_policy, 'config.model.remat_policy',
                  'remat policy')
  attention_kernels.get(m.attention_impl)
  moe = m.moe
  if moe.num_experts > 0:
    backends.get_backend(moe.backend)
    if moe.ragged_impl != 'auto':
      registry.lookup(backends.RAGGED_IMPLS, moe.ragged_impl, 'config.model.moe.ragged_impl',
                      'ragged implementation')
    if moe.ep_strategy != 'none':
      registry.lookup(expert_parallel.STRATEGIES, moe.ep_strategy,
                      'config.model.moe.ep_strategy', 'expert-parallel strategy')


def create_model(config) -> SkyMoE:
  """Validates the config and returns the (stateless) Flax module."""
  validate(config)
  return SkyMoE(ml_collections.FrozenConfigDict(config.model))


def example_inputs(config, batch_size: int = 1, text_len: int = 8):
  """Arguments for SkyMoE.__call__ / init (batch.MODEL_INPUTS): zeros, every token real."""
  specs = batch_lib.shapes(config, batch_size, batch_lib.MODEL_INPUTS, text_len)
  return tuple((jnp.ones if name == 'token_mask' else jnp.zeros)(shape, dtype)
               for name, (shape, dtype) in specs.items())


def abstract_params(config, model=None):
  """The parameter tree as ShapeDtypeStructs (with logical-axis metadata); nothing allocated."""
  model = model or create_model(config)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(config)))['params']
