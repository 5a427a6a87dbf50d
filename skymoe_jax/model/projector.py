"""Vision-to-language projector: LLaVA-1.5's 2-layer MLP with (exact) GELU, optionally followed by
a fixed 2-D position table on its output tokens (model.vision.token_posemb)."""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skymoe_jax.model import layers
from skymoe_jax.model.vit import sincos_2d


def token_position_table(grid: int, width: int) -> np.ndarray:
  """[grid^2, width] (row-major patches): the 2-D sin-cos table at unit RMS (each sin/cos pair
  has sin^2 + cos^2 = 1), the same at every step: training cannot wash it out."""
  return np.sqrt(2.0) * sincos_2d(grid, width)[1:]


class Projector(nn.Module):
  out_dim: int
  token_posemb: str = 'none'  # model.vision.token_posemb, checked by config.validate
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [B, N, vision width] patch features, N = grid^2 row-major -> [B, N, out_dim]."""
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.Linear((self.out_dim,), ('vision_embed',), ('mlp',), name='fc1', **kw)(x)
    h = jax.nn.gelu(h, approximate=False)
    y = layers.Linear((self.out_dim,), ('mlp',), ('embed',), name='fc2', **kw)(h)
    if self.token_posemb == 'sincos2d':
      grid = int(round(np.sqrt(x.shape[1])))
      y = y + jnp.asarray(token_position_table(grid, self.out_dim), y.dtype)
    return y
