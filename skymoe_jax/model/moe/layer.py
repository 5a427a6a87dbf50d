"""The routed MoE feed-forward layer with SkyMoE's adaptive (task- and granularity-aware) router.

Router logits f(x) = W x + U (e_task + e_granularity): each sample's task and granularity add a
learned bias to every one of its tokens' logits. U starts at zero, so a fresh (or upcycled)
adaptive router routes exactly like the plain token router; `adaptive=False` drops U and the
embeddings altogether. `condition_scale` S multiplies the bias (S U (e_task + e_gran)): Adam moves
each weight of U by about the learning rate per step whatever its gradient, so S is how fast the
bias can grow from zero at a fine-tune's small learning rate (model.moe.condition_scale).

The condition that routes is either the sample's tags (ids: e_task[id] + e_gran[id]) or soft
distributions over tasks and granularities (model.moe.condition='predicted': the condition head
of model/skymoe.py), whose embedding is the probability-weighted mix of the tables. Ids are the
one-hot case; they keep the gather (`mix_condition`) so that tag runs compute exactly what they
did before distributions existed, on every platform and in the gradient's summation order too
(a one-hot matmul equals the gather in the forward pass, tests/test_predicted_condition.py).
The router statistics are keyed by the ids (the true tags) whatever routes.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from skymoe_jax.model import layers
from skymoe_jax.model.moe import backends, router
from skymoe_jax.model.moe import expert_parallel


def mix_condition(table, condition):
  """The condition embedding [B, C] of `condition`: ids [B] int -> table[ids] (the tag path),
  or distributions [B, N] float -> condition @ table (the soft mix, at full fp32 precision)."""
  if jnp.issubdtype(condition.dtype, jnp.integer):
    return table[condition]
  return jnp.einsum('bn,nc->bc', condition.astype(jnp.float32), table.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


class MoeFFN(nn.Module):
  num_experts: int
  top_k: int
  mlp_dim: int
  renormalize: bool = False
  backend: str = 'ragged'
  ep_strategy: str = 'ring'  # expert parallelism when a mesh is active; see parallel/
  capacity_factor: float = 1.25
  ragged_impl: str = 'auto'
  ragged_block_size: int = 128
  adaptive: bool = True
  num_tasks: int = 1
  num_granularities: int = 1
  condition_dim: int = 64
  condition_scale: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, token_mask, task_id, granularity_id, condition=None):
    """x: [B, T, D]; token_mask: [B, T] bool; task_id, granularity_id: [B] int, the tags that
    key the statistics; condition: (task, granularity) that route, each ids [B] or
    distributions [B, num_tasks] / [B, num_granularities] (None: the tags route).

    Returns (y [B, T, D], aux) where aux holds the load-balance and z losses and the router
    statistics (router.router_stats) of this layer.
    """
    b, t, d = x.shape
    e = self.num_experts
    kernel = layers.param(self, 'router', layers.fan_in_init(1), (d, e), ('embed', 'exp'),
                          self.param_dtype)
    logits = jnp.einsum('btd,de->bte', x.astype(jnp.float32), kernel.astype(jnp.float32))
    if self.adaptive:
      task_table = layers.param(self, 'task_embed', nn.initializers.normal(1.0),
                                (self.num_tasks, self.condition_dim), ('task', 'condition'),
                                self.param_dtype)
      gran_table = layers.param(self, 'granularity_embed', nn.initializers.normal(1.0),
                                (self.num_granularities, self.condition_dim),
                                ('granularity', 'condition'), self.param_dtype)
      u = layers.param(self, 'condition_proj', nn.initializers.zeros, (self.condition_dim, e),
                       ('condition', 'exp'), self.param_dtype)
      task, gran = (task_id, granularity_id) if condition is None else condition
      cond = mix_condition(task_table, task) + mix_condition(gran_table, gran)  # [B, C]
      bias = self.condition_scale * (cond.astype(jnp.float32) @ u.astype(jnp.float32))
      logits = logits + bias[:, None, :]

    experts = {
        'w_gate': layers.param(self, 'w_gate', layers.fan_in_init(1, 1), (e, d, self.mlp_dim),
                               ('exp', 'embed', 'mlp'), self.param_dtype),
        'w_up': layers.param(self, 'w_up', layers.fan_in_init(1, 1), (e, d, self.mlp_dim),
                             ('exp', 'embed', 'mlp'), self.param_dtype),
        'w_down': layers.param(self, 'w_down', layers.fan_in_init(1, 1), (e, self.mlp_dim, d),
                               ('exp', 'mlp', 'embed'), self.param_dtype),
    }
    experts = jax.tree.map(lambda w: w.astype(self.dtype), experts)

    valid = token_mask.reshape(-1)
    flat_logits = logits.reshape(b * t, e)
    routing = router.route(flat_logits, self.top_k, self.renormalize, valid)
    options = dict(capacity_factor=self.capacity_factor, ragged_impl=self.ragged_impl,
                   block_size=self.ragged_block_size)
    if self.ep_strategy != 'none' and expert_parallel.mesh_active():
      dispatch = expert_parallel.sharded_backend(self.ep_strategy, self.backend, **options)
    else:
      dispatch = backends.get_backend(self.backend, **options)
    y, num_dropped = dispatch(x.reshape(b * t, d).astype(self.dtype), routing.ids,
                              routing.weights, valid, experts)

    condition = task_id * self.num_granularities + granularity_id  # [B]
    condition = jnp.broadcast_to(condition[:, None], (b, t)).reshape(-1)
    aux = router.router_stats(routing, valid, condition,
                              self.num_tasks * self.num_granularities)
    aux['counts_by_condition'] = aux['counts_by_condition'].reshape(
        self.num_tasks, self.num_granularities, e)
    aux['load_balance_loss'] = router.load_balance_loss(routing, valid)
    aux['z_loss'] = router.z_loss(flat_logits, valid)
    aux['num_dropped'] = num_dropped
    aux['num_routed'] = jnp.sum(valid.astype(jnp.int32)) * self.top_k
    return y.reshape(b, t, d), aux


def upcycle_mlp(mlp_params, num_experts: int, fresh=None):
  """Expert weights for an MoE layer made from a dense SwiGLU FFN: each expert a copy.

  mlp_params: {'gate': {'kernel'}, 'up': {'kernel'}, 'down': {'kernel'}} of model.mlp.MLP,
  possibly with leading scanned-layer axes. Returns {'w_gate', 'w_up', 'w_down'} with the
  expert axis placed right before the kernel's own two dims.

  fresh: the MoE layer's own initial {'w_gate', 'w_up', 'w_down'}, needed only when its experts
  are wider than the FFN (model.moe.mlp_dim > llm.mlp_dim). Each expert's first hidden units
  copy the FFN; the extra ones keep their fresh gate/up weights and get a zero down-projection,
  so the layer still computes the FFN's function at the start while the extra units learn
  (copies of the FFN's units would get identical gradients and stay copies).
  """
  def tile(kernel):
    expanded = jnp.expand_dims(kernel, axis=kernel.ndim - 2)
    reps = [1] * expanded.ndim
    reps[kernel.ndim - 2] = num_experts
    return jnp.tile(expanded, reps)
  out = {'w_gate': tile(mlp_params['gate']['kernel']),
         'w_up': tile(mlp_params['up']['kernel']),
         'w_down': tile(mlp_params['down']['kernel'])}
  width = out['w_gate'].shape[-1]
  if fresh is None or fresh['w_gate'].shape[-1] == width:
    return out
  if fresh['w_gate'].shape[-1] < width:
    raise ValueError(f'experts of width {fresh["w_gate"].shape[-1]} cannot hold the FFN of '
                     f'width {width}')
  return {'w_gate': jnp.concatenate([out['w_gate'], fresh['w_gate'][..., width:]], axis=-1),
          'w_up': jnp.concatenate([out['w_up'], fresh['w_up'][..., width:]], axis=-1),
          'w_down': jnp.concatenate(
              [out['w_down'], jnp.zeros_like(fresh['w_down'][..., width:, :])], axis=-2)}
