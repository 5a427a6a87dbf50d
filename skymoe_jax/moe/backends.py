"""Interchangeable ways to send tokens to their experts and combine the results.

Every backend has one signature:

  backend(x, ids, weights, valid, experts) -> (y, num_dropped)

  x: [N, D] tokens; ids, weights: [N, k] from the router; valid: [N] bool (padding tokens take
  no expert capacity); experts: {'w_gate': [E, D, F], 'w_up': [E, D, F], 'w_down': [E, F, D]}.
  y: [N, D] = sum over the k slots of weight * expert(x); num_dropped: int32 count of valid
  (token, slot) pairs that no expert computed (non-zero only for `capacity`).

An id equal to E (one past the last expert) means "no expert here": expert parallelism uses it
for assignments to experts held by another device. Such a slot must have weight 0; it is
neither computed nor counted as dropped.
"""
import functools
import math

import jax
import jax.numpy as jnp

from skymoe_jax.model.mlp import swiglu

BACKENDS = ('loop', 'dense', 'ragged', 'capacity')
RAGGED_IMPLS = ('auto', 'ragged_dot', 'blocks')


def target_platform() -> str:
  """The platform being compiled for: the active mesh's devices (e.g. TPU when compiling ahead
  of time on a CPU host), else this process's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def _expert(experts, e):
  return experts['w_gate'][e], experts['w_up'][e], experts['w_down'][e]


def loop_backend(x, ids, weights, valid, experts):
  """Reference: for each of the k slots, each token runs through its own expert's weights."""
  del valid
  y = jnp.zeros_like(x)
  for slot in range(ids.shape[1]):
    per_token = jax.vmap(lambda xn, e: swiglu(xn, *_expert(experts, e)))(x, ids[:, slot])
    y = y + weights[:, slot, None].astype(x.dtype) * per_token
  return y, jnp.int32(0)


def _combine_matrix(ids, weights, num_experts):
  """[N, E] weight of each expert in each token's output (0 for experts not chosen)."""
  return jnp.einsum('nk,nke->ne', weights, jax.nn.one_hot(ids, num_experts, dtype=weights.dtype))


def dense_backend(x, ids, weights, valid, experts):
  """Every expert on every token, masked by the combine weights: simple, E/k times the FLOPs."""
  del valid
  num_experts = experts['w_gate'].shape[0]
  h = jax.nn.silu(jnp.einsum('nd,edf->enf', x, experts['w_gate']))
  h = h * jnp.einsum('nd,edf->enf', x, experts['w_up'])
  out = jnp.einsum('enf,efd->end', h, experts['w_down'])
  combine = _combine_matrix(ids, weights, num_experts).astype(x.dtype)
  return jnp.einsum('end,ne->nd', out, combine), jnp.int32(0)


def _grouped_matmul_ragged_dot(xs, w, group_sizes, block_size):
  del block_size
  return jax.lax.ragged_dot(xs, w, group_sizes)


def _grouped_matmul_blocks(xs, w, group_sizes, block_size):
  """Grouped matmul without ragged_dot: pad each group to whole blocks, one expert a block.

  xs: [M, K] rows sorted by group; w: [G, K, F]; group_sizes: [G]. Loops over blocks with
  lax.map so no per-block copy of the weights is ever materialised.
  """
  m, _ = xs.shape
  g = w.shape[0]
  padded_sizes = -(-group_sizes // block_size) * block_size
  padded_ends = jnp.cumsum(padded_sizes)
  padded_starts = padded_ends - padded_sizes
  starts = jnp.cumsum(group_sizes) - group_sizes
  num_blocks = -(-(m + g * (block_size - 1)) // block_size)
  # Where each sorted row lands in the padded layout; rows past the last group (ids == G, "no
  # expert here") land out of range and are dropped.
  row_group = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(m), side='right')
  in_group = row_group < g
  row_group = jnp.minimum(row_group, g - 1)
  row_dest = jnp.where(in_group, padded_starts[row_group] + jnp.arange(m) - starts[row_group],
                       num_blocks * block_size)
  padded = jnp.zeros((num_blocks * block_size, xs.shape[1]), xs.dtype).at[row_dest].set(
      xs, mode='drop')
  block_group = jnp.minimum(
      jnp.searchsorted(padded_ends, jnp.arange(num_blocks) * block_size, side='right'), g - 1)
  blocks = padded.reshape(num_blocks, block_size, -1)
  out = jax.lax.map(lambda args: args[0] @ w[args[1]], (blocks, block_group))
  return jnp.take(out.reshape(num_blocks * block_size, -1), row_dest, axis=0, mode='fill',
                  fill_value=0)


def ragged_backend(x, ids, weights, valid, experts, *, impl='auto', block_size=128):
  """Dropless: sort (token, slot) pairs by expert, grouped matmuls, unsort, combine."""
  del valid
  if impl not in RAGGED_IMPLS:
    raise ValueError(f'config.model.moe.ragged_impl={impl!r} not in {RAGGED_IMPLS}')
  if impl == 'auto':
    # ragged_dot is about 9x slower than the block loop on CPU (measured, jax 0.10).
    impl = 'blocks' if target_platform() == 'cpu' else 'ragged_dot'
  matmul = {'ragged_dot': _grouped_matmul_ragged_dot, 'blocks': _grouped_matmul_blocks}[impl]
  n, k = ids.shape
  num_experts = experts['w_gate'].shape[0]
  flat_ids = ids.reshape(-1)
  order = jnp.argsort(flat_ids, stable=True)
  xs = x[order // k]
  group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
  h = jax.nn.silu(matmul(xs, experts['w_gate'], group_sizes, block_size))
  h = h * matmul(xs, experts['w_up'], group_sizes, block_size)
  ys = matmul(h, experts['w_down'], group_sizes, block_size)
  # Rows with no local expert (id == E) are left out of the groups: zero them whatever the
  # grouped matmul left there.
  ys = jnp.where((flat_ids[order] < num_experts)[:, None], ys, 0)
  unsorted = jnp.zeros_like(ys).at[order].set(ys).reshape(n, k, -1)
  return jnp.einsum('nkd,nk->nd', unsorted, weights.astype(x.dtype)), jnp.int32(0)


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
  """Slots per expert: capacity_factor times an even share of the N * k assignments."""
  return max(1, math.ceil(capacity_factor * num_tokens * top_k / num_experts))


def capacity_dispatch(ids, valid, num_experts: int, capacity: int):
  """GShard / DeepSpeed slot assignment: [k, N, E, C] one-hot dispatch tensor and kept mask.

  Priority goes slot-major: every token's first choice before any second choice, each in token
  order. An assignment past its expert's capacity is dropped (the token keeps its residual).
  """
  n, k = ids.shape
  onehot = jax.nn.one_hot(ids.T, num_experts, dtype=jnp.int32)  # [k, N, E]
  onehot = onehot * valid[None, :, None].astype(jnp.int32)
  flat = onehot.reshape(k * n, num_experts)
  position = (jnp.cumsum(flat, axis=0) - 1) * flat  # place in the chosen expert's buffer
  kept = flat * (position < capacity)
  dispatch = kept[..., None] * jax.nn.one_hot(position, capacity, dtype=jnp.int32)
  return dispatch.reshape(k, n, num_experts, capacity), kept.sum(-1).reshape(k, n)


def experts_on_buffers(xin, experts):
  """Each expert's FFN on its own buffer: xin [E, C, D] -> [E, C, D]."""
  h = jax.nn.silu(jnp.einsum('ecd,edf->ecf', xin, experts['w_gate']))
  h = h * jnp.einsum('ecd,edf->ecf', xin, experts['w_up'])
  return jnp.einsum('ecf,efd->ecd', h, experts['w_down'])


def capacity_backend(x, ids, weights, valid, experts, *, capacity_factor=1.25,
                     num_total_experts=None):
  """Fixed-size expert buffers; assignments over capacity are dropped and counted.

  Each buffer holds expert_capacity(N, k, num_total_experts, capacity_factor) slots, where
  num_total_experts (default: the experts given) is the model's expert count: under expert
  parallelism this device holds only some of them.
  """
  n, k = ids.shape
  num_experts = experts['w_gate'].shape[0]
  capacity = expert_capacity(n, k, num_total_experts or num_experts, capacity_factor)
  dispatch, kept = capacity_dispatch(ids, valid, num_experts, capacity)
  dispatch_nec = dispatch.sum(0).astype(x.dtype)  # a token picks an expert at most once
  combine_nec = jnp.einsum('knec,nk->nec', dispatch.astype(weights.dtype), weights).astype(x.dtype)
  out = experts_on_buffers(jnp.einsum('nd,nec->ecd', x, dispatch_nec), experts)
  y = jnp.einsum('ecd,nec->nd', out, combine_nec)
  assigned = jnp.sum(valid[:, None] & (ids < num_experts))
  return y, (assigned - jnp.sum(kept)).astype(jnp.int32)


def get_backend(name: str, *, capacity_factor=1.25, ragged_impl='auto', block_size=128):
  """The backend `config.model.moe.backend` names, with its options bound."""
  if name == 'loop':
    return loop_backend
  if name == 'dense':
    return dense_backend
  if name == 'ragged':
    return functools.partial(ragged_backend, impl=ragged_impl, block_size=block_size)
  if name == 'capacity':
    return functools.partial(capacity_backend, capacity_factor=capacity_factor)
  raise ValueError(f'config.model.moe.backend={name!r} not in {BACKENDS}')
