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

Some backends carry their own gradients (custom_vjp), which return per-device partial sums
inside shard_map; expert parallelism runs them with check_vma=False, where shard_map's
transpose adds those partials up.
"""
import functools
import math

import jax
import jax.numpy as jnp

from skymoe_jax import registry
from skymoe_jax.model import layers
from skymoe_jax.model.mlp import swiglu
from skymoe_jax.model.moe import grouped_matmul


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


def _sorted_layout(ids, num_experts: int, block_size: int):
  """Where each (token, slot) pair goes when the pairs are grouped by expert.

  ids: [N, k]. Returns (order, rank, group_sizes, padded_pos, num_rows):
    order [N*k]: the pairs sorted by expert (stable), as flat pair indices;
    rank [N*k]: each pair's row in that sorted order (the inverse permutation);
    group_sizes [E]: pairs per expert (pairs with id == E, "no expert here", are in none);
    padded_pos [N*k]: each pair's row when every group is padded to whole blocks of
      block_size rows (num_rows in all; out of range for id == E).
  """
  flat_ids = ids.reshape(-1)
  m = flat_ids.shape[0]
  order = jnp.argsort(flat_ids, stable=True)
  rank = jnp.zeros((m,), jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32))
  group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
  starts = jnp.cumsum(group_sizes) - group_sizes
  padded_sizes = -(-group_sizes // block_size) * block_size
  padded_starts = jnp.cumsum(padded_sizes) - padded_sizes
  # Worst case: every group leaves block_size - 1 rows of its last block empty.
  num_rows = -(-(m + num_experts * (block_size - 1)) // block_size) * block_size
  safe_ids = jnp.minimum(flat_ids, num_experts - 1)
  padded_pos = jnp.where(flat_ids < num_experts,
                         padded_starts[safe_ids] + rank - starts[safe_ids], num_rows)
  return order, rank, group_sizes, padded_pos, num_rows


@jax.custom_vjp
def _block_matmul(blocks, w, block_expert, used):
  """Grouped matmul over row blocks: out[b] = blocks[b] @ w[block_expert[b]] if used[b], else 0.

  blocks: [B, S, K]; w: [G, K, F]. A loop over blocks (lax.map) with the unused ones skipped
  (lax.cond), so the work follows the rows actually routed. The backward pass is written out
  (_block_matmul_bwd): autodiff of the loop would add a full-size [G, K, F] zero-padded
  gradient per block, which costs more than the matmuls themselves.
  """
  def one(args):
    rows, e, u = args
    return jax.lax.cond(u, jnp.matmul,
                        lambda r, we: jnp.zeros((r.shape[0], we.shape[1]), r.dtype), rows, w[e])
  return jax.lax.map(one, (blocks, block_expert, used))


def _block_matmul_fwd(blocks, w, block_expert, used):
  return _block_matmul(blocks, w, block_expert, used), (blocks, w, block_expert, used)


def _block_matmul_bwd(res, d_out):
  blocks, w, block_expert, used = res
  d_blocks = _block_matmul(d_out, jnp.swapaxes(w, 1, 2), block_expert, used)

  def accumulate(b, d_w):
    rows, d_rows = blocks[b], d_out[b]
    update = jax.lax.cond(used[b], lambda: rows.T @ d_rows,
                          lambda: jnp.zeros(w.shape[1:], rows.dtype))
    return d_w.at[block_expert[b]].add(update.astype(w.dtype))  # one expert's slice, in place
  d_w = jax.lax.fori_loop(0, blocks.shape[0], accumulate, jnp.zeros_like(w))
  return d_blocks, d_w, None, None


_block_matmul.defvjp(_block_matmul_fwd, _block_matmul_bwd)


def _swiglu_stacked(x, gate_up, w_down, matmul):
  """SwiGLU with gate and up stacked as one [.., D, 2F] weight: one pass over the rows for both."""
  f = w_down.shape[-2]
  h = matmul(x, gate_up)
  return matmul(jax.nn.silu(h[..., :f]) * h[..., f:], w_down)


def _stack_gate_up(experts):
  return jnp.concatenate([experts['w_gate'], experts['w_up']], axis=-1)


@jax.custom_vjp
def _grouped_matmul(x, w, group_sizes):
  """jax.lax.ragged_dot (rows of x grouped by w's leading axis) with the weight gradient on TPU
  taken by megablox (grouped_matmul.megablox_weight_grad); elsewhere the same maths as autodiff's."""
  return jax.lax.ragged_dot(x, w, group_sizes)


def _grouped_matmul_fwd(x, w, group_sizes):
  return _grouped_matmul(x, w, group_sizes), (x, w, group_sizes)


def _grouped_matmul_bwd(res, d_out):
  x, w, group_sizes = res
  d_x = jax.lax.ragged_dot(d_out, jnp.swapaxes(w, 1, 2), group_sizes)
  if layers.target_platform() == 'tpu':
    d_w = grouped_matmul.megablox_weight_grad(x, d_out, group_sizes, w.dtype)
  else:
    d_w = jax.vjp(lambda w: jax.lax.ragged_dot(x, w, group_sizes), w)[1](d_out)[0]
  return d_x.astype(x.dtype), d_w.astype(w.dtype), None


_grouped_matmul.defvjp(_grouped_matmul_fwd, _grouped_matmul_bwd)


def _experts_ragged_dot(x_sorted, experts, group_sizes):
  """Each expert's SwiGLU on its contiguous group of rows, via jax.lax.ragged_dot. Rows past the
  last group (id == E) come out as zeros."""
  return _swiglu_stacked(x_sorted, _stack_gate_up(experts), experts['w_down'],
                         lambda a, w: _grouped_matmul(a, w, group_sizes))


def _block_experts(group_sizes, num_blocks: int, block_size: int):
  """With every group padded to whole blocks: each block's expert, and whether it holds rows."""
  padded_ends = jnp.cumsum(-(-group_sizes // block_size) * block_size)
  block_starts = jnp.arange(num_blocks) * block_size
  block_expert = jnp.searchsorted(padded_ends, block_starts, side='right')
  return jnp.minimum(block_expert, group_sizes.shape[0] - 1), block_starts < padded_ends[-1]


def _swiglu_separate(x, experts, matmul):
  """SwiGLU with gate and up as two grouped matmuls: stacking them would copy [E, D, 2F] every
  step and split its gradient again, which costs more than reading the rows twice (measured on
  CPU for the block loop)."""
  h = jax.nn.silu(matmul(x, experts['w_gate'])) * matmul(x, experts['w_up'])
  return matmul(h, experts['w_down'])


def _experts_megablox(x_sorted, experts, group_sizes):
  """Each expert's SwiGLU on its contiguous group of rows with the TPU grouped-matmul kernels
  (megablox gmm forward and input gradient, tgmm weight gradient). Rows past the last group
  come out as zeros."""
  interpret = layers.target_platform() == 'cpu'  # tests: the kernels in Pallas' interpret mode
  return _swiglu_separate(x_sorted, experts,
                          lambda a, w: grouped_matmul.megablox_gmm(a, w, group_sizes, interpret))


def _experts_in_blocks(x_padded, experts, group_sizes, block_size, block_matmul):
  """Groups padded to whole blocks, one expert per block: block_matmul(blocks, w, block_expert,
  used) runs each used block through its expert and leaves the empty ones zero.

  x_padded: [R, D] with R a multiple of block_size, sized for the worst case.
  """
  num_blocks = x_padded.shape[0] // block_size
  block_expert, used = _block_experts(group_sizes, num_blocks, block_size)
  matmul = lambda a, w: block_matmul(a, w, block_expert, used)
  blocks = x_padded.reshape(num_blocks, block_size, -1)
  return _swiglu_separate(blocks, experts, matmul).reshape(x_padded.shape[0], -1)


def _experts_blocks(x_padded, experts, group_sizes, block_size):
  """The same without ragged_dot: a loop over the blocks that skips the empty ones
  (_block_matmul)."""
  return _experts_in_blocks(x_padded, experts, group_sizes, block_size, _block_matmul)


def _experts_triton(x_padded, experts, group_sizes, block_size):
  """The same blocks through the GPU grouped-matmul kernels (Pallas Triton: forward, input and
  weight gradient), one program per (block, column tile), the empty blocks written as zeros."""
  interpret = layers.target_platform() == 'cpu'  # tests: the kernels in Pallas' interpret mode
  matmul = lambda a, w, e, u: grouped_matmul.triton_block_matmul(a, w, e, u, interpret)
  return _experts_in_blocks(x_padded, experts, group_sizes, block_size, matmul)


def _experts_batched(x_padded, experts, group_sizes, block_size):
  """The same blocks as one batched matmul: each block gets a copy of its expert's weights
  ([blocks, D, F] gathered), no loop. Memory for launch count: for accelerators, where a loop
  of small matmuls costs a kernel launch per block. Empty blocks compute on zero rows."""
  num_blocks = x_padded.shape[0] // block_size
  block_expert, _ = _block_experts(group_sizes, num_blocks, block_size)
  per_block = lambda w: jnp.take(w, block_expert, axis=0)
  out = _swiglu_stacked(x_padded.reshape(num_blocks, block_size, -1),
                        per_block(_stack_gate_up(experts)), per_block(experts['w_down']),
                        lambda a, w: jnp.einsum('bsk,bkf->bsf', a, w))
  return out.reshape(x_padded.shape[0], -1)


# The grouped-matmul implementations of the ragged backend (model.moe.ragged_impl). ragged_dot
# and megablox take the rows sorted by expert (SORTED_IMPLS), the others the rows padded to whole
# blocks. The kernels run on their own accelerator (KERNEL_PLATFORMS), and on CPU in Pallas'
# interpret mode (tests).
RAGGED_IMPLS = {'ragged_dot': _experts_ragged_dot, 'blocks': _experts_blocks,
                'batched': _experts_batched, 'megablox': _experts_megablox,
                'triton': _experts_triton}
SORTED_IMPLS = ('ragged_dot', 'megablox')
KERNEL_PLATFORMS = {'megablox': 'tpu', 'triton': 'gpu'}
# What 'auto' picks per platform (other platforms: ragged_dot). On CPU the block loop: ragged_dot
# is about 9x slower there (measured, jax 0.10), the kernels only interpret.
AUTO_RAGGED_IMPLS = {'cpu': 'blocks', 'gpu': 'triton', 'tpu': 'megablox'}


def resolve_ragged_impl(impl: str, platform: str) -> str:
  """The implementation that `impl` (config.model.moe.ragged_impl) runs when compiling for
  `platform`: 'auto' resolved, a kernel on another accelerator refused."""
  if impl == 'auto':
    return AUTO_RAGGED_IMPLS.get(platform, 'ragged_dot')
  registry.lookup(RAGGED_IMPLS, impl, 'config.model.moe.ragged_impl', 'ragged implementation')
  kernel_platform = KERNEL_PLATFORMS.get(impl, platform)
  if platform not in (kernel_platform, 'cpu'):
    raise registry.ConfigError(f'config.model.moe.ragged_impl={impl!r}: a {kernel_platform} '
                               f'kernel, but this compiles for {platform} (auto picks for you)')
  return impl


def ragged_backend(x, ids, weights, valid, experts, *, impl='auto', block_size=128):
  """Dropless: group the (token, slot) pairs by expert, run each group through its expert,
  gather each pair's output back and combine. The rows move by gathers (their gradients are
  the scatter-adds); only integer indices are scattered."""
  del valid
  impl = resolve_ragged_impl(impl, layers.target_platform())
  experts_fn = RAGGED_IMPLS[impl]
  n, k = ids.shape
  num_experts = experts['w_gate'].shape[0]
  order, rank, group_sizes, padded_pos, num_rows = _sorted_layout(ids, num_experts, block_size)
  if impl in SORTED_IMPLS:
    x_sorted = jnp.take(x, order // k, axis=0)
    out = experts_fn(x_sorted, experts, group_sizes)
    # Rows with no local expert (id == E) sit past the groups: zero them whatever ragged_dot
    # left there (megablox already has).
    out = jnp.where((jnp.arange(n * k) < jnp.sum(group_sizes))[:, None], out, 0)
    pair_out = jnp.take(out, rank, axis=0)
  else:
    # Each padded row's source token; empty rows read out of range and get zeros.
    source = jnp.full((num_rows,), n, jnp.int32).at[padded_pos].set(
        jnp.arange(n * k, dtype=jnp.int32) // k, mode='drop')
    x_padded = jnp.take(x, source, axis=0, mode='fill', fill_value=0)
    out = experts_fn(x_padded, experts, group_sizes, block_size)
    pair_out = jnp.take(out, padded_pos, axis=0, mode='fill', fill_value=0)
  return jnp.einsum('nkd,nk->nd', pair_out.reshape(n, k, -1), weights.astype(x.dtype)), \
      jnp.int32(0)


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


BACKENDS = {'loop': loop_backend, 'dense': dense_backend, 'ragged': ragged_backend,
            'capacity': capacity_backend}


def get_backend(name: str, *, capacity_factor=1.25, ragged_impl='auto', block_size=128):
  """The backend `config.model.moe.backend` names, with its options bound."""
  backend = registry.lookup(BACKENDS, name, 'config.model.moe.backend', 'MoE backend')
  options = {'ragged': dict(impl=ragged_impl, block_size=block_size),
             'capacity': dict(capacity_factor=capacity_factor)}.get(name)
  return functools.partial(backend, **options) if options else backend
