"""Vision-to-language projector: LLaVA-1.5's 2-layer MLP with (exact) GELU."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from skymoe_jax.model import layers


class Projector(nn.Module):
  out_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.Linear((self.out_dim,), ('vision_embed',), ('mlp',), name='fc1', **kw)(x)
    h = jax.nn.gelu(h, approximate=False)
    return layers.Linear((self.out_dim,), ('mlp',), ('embed',), name='fc2', **kw)(h)
