"""The LLaMA SwiGLU feed-forward block: down(silu(gate(x)) * up(x))."""
from typing import Any

import flax.linen as nn
import jax
from jax.ad_checkpoint import checkpoint_name
import jax.numpy as jnp

from skymoe_jax.model import layers


def swiglu(x, w_gate, w_up, w_down):
  """The same maths for a dense FFN and for one expert: x [..., D] -> [..., D]."""
  h = jax.nn.silu(x @ w_gate) * (x @ w_up)
  return h @ w_down


class MLP(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Named for the remat policies (layers.MLP_SAVED): the two values the backward pass needs.
    gate = checkpoint_name(
        layers.Linear((self.mlp_dim,), ('embed',), ('mlp',), name='gate', **kw)(x), 'mlp_gate')
    up = checkpoint_name(
        layers.Linear((self.mlp_dim,), ('embed',), ('mlp',), name='up', **kw)(x), 'mlp_up')
    h = nn.with_logical_constraint(jax.nn.silu(gate) * up,
                                   ('activation_batch', 'activation_length', 'activation_mlp'))
    return layers.Linear((d,), ('mlp',), ('embed',), name='down', **kw)(h)
