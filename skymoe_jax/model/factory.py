"""Building the model from a config, and example inputs of the right shapes."""
import jax
import jax.numpy as jnp
import ml_collections

from skymoe_jax import config_defaults
from skymoe_jax.model.skymoe import SkyMoE


def create_model(config) -> SkyMoE:
  """Validates the config and returns the (stateless) Flax module."""
  config_defaults.validate(config)
  return SkyMoE(ml_collections.FrozenConfigDict(config.model))


def example_inputs(config, batch_size: int = 1, text_len: int = 8):
  """Arguments for SkyMoE.__call__ / init: (images, tokens, token_mask, task_id, granularity_id)."""
  v = config.model.vision
  return (jnp.zeros((batch_size, v.image_size, v.image_size, 3), jnp.float32),
          jnp.zeros((batch_size, text_len), jnp.int32),
          jnp.ones((batch_size, text_len), bool),
          jnp.zeros((batch_size,), jnp.int32),
          jnp.zeros((batch_size,), jnp.int32))


def abstract_params(config, model=None):
  """The parameter tree as ShapeDtypeStructs (with logical-axis metadata); nothing allocated."""
  model = model or create_model(config)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *example_inputs(config)))['params']
