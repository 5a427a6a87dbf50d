"""Expert parallelism: a dispatch backend wrapped in jax.shard_map over the mesh.

Experts are split over the mesh axis that the rule table gives the logical name `exp`; tokens
are split over the batch axes (`activation_batch`). Three strategies:

- ring: every device all-gathers the tokens of its expert group, runs the local backend on its
  own experts only (assignments to other devices' experts get the "no expert here" id), and a
  psum_scatter sums the partial outputs and hands each device back its own tokens. Uses only
  all_gather / psum_scatter, so it runs (and is tested) on CPU.
- all_to_all: GShard-style. Each device fills fixed-capacity buffers for every expert from its
  own tokens, an all_to_all sends each buffer to the device holding that expert, the experts
  run, and a second all_to_all brings the results back to be combined. Drops overflow like the
  capacity backend.
- ragged_all_to_all (TPU / GPU only): dropless; each (token, slot) row travels to its expert's
  device and back in ragged slices, and the experts run as grouped matmuls (ragged backend).

Expert weights sharded over `fsdp` (their `embed` dim) are all-gathered inside; weights split over
`tensor` (their `mlp` dim) give partial sums, reduced with psum.
"""
import functools
import math

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp

from skymoe_jax import registry
from skymoe_jax.model import layers
from skymoe_jax.model.moe import backends


def mesh_active() -> bool:
  return not jax.sharding.get_abstract_mesh().empty


def _axes(spec_entry):
  """A PartitionSpec entry as a tuple of mesh axis names."""
  if spec_entry is None:
    return ()
  return tuple(spec_entry) if isinstance(spec_entry, (tuple, list)) else (spec_entry,)


def _size(axes) -> int:
  mesh = jax.sharding.get_abstract_mesh()
  return math.prod(mesh.shape[a] for a in axes)


def _index(axes):
  """This device's index along the (flattened) axes, major to minor."""
  idx = 0
  for a in axes:
    idx = idx * jax.lax.axis_size(a) + jax.lax.axis_index(a)
  return idx


# Every strategy: (x, ids, weights, valid, experts, *, expert_axes, mlp_axes, num_total_experts,
# backend, capacity_factor, backend_options) -> (y, num_dropped), run inside shard_map.

def _ring(x, ids, weights, valid, experts, *, expert_axes, mlp_axes, num_total_experts, backend,
          capacity_factor, backend_options):
  local_backend = backends.get_backend(backend, capacity_factor=capacity_factor,
                                       **backend_options)
  if backend == 'capacity':  # capacity: a share of the group's tokens over ALL experts
    local_backend = functools.partial(local_backend, num_total_experts=num_total_experts)
  num_local = experts['w_gate'].shape[0]
  if expert_axes:
    gather = lambda a: jax.lax.all_gather(a, expert_axes, axis=0, tiled=True)
    x, ids, weights, valid = gather(x), gather(ids), gather(weights), gather(valid)
  local_ids = ids - _index(expert_axes) * num_local
  here = (local_ids >= 0) & (local_ids < num_local)
  ids = jnp.where(here, local_ids, num_local)  # "no expert here"
  weights = jnp.where(here, weights, 0)
  y, num_dropped = local_backend(x, ids, weights, valid, experts)
  if mlp_axes:
    y = jax.lax.psum(y, mlp_axes)
  if expert_axes:
    y = jax.lax.psum_scatter(y, expert_axes, scatter_dimension=0, tiled=True)
  return y, num_dropped


def _all_to_all(x, ids, weights, valid, experts, *, expert_axes, mlp_axes, num_total_experts,
                backend, capacity_factor, backend_options):
  del backend, backend_options  # always capacity buffers
  n, k = ids.shape
  num_local = experts['w_gate'].shape[0]
  groups = num_total_experts // num_local
  capacity = backends.expert_capacity(n, k, num_total_experts, capacity_factor)
  dispatch, kept = backends.capacity_dispatch(ids, valid, num_total_experts, capacity)
  xin = jnp.einsum('nd,nec->ecd', x, dispatch.sum(0).astype(x.dtype))  # [E, C, D]
  if expert_axes:
    # Send expert e's buffer to the device holding it: [E, C, D] -> [groups(source), E_l, C, D].
    xin = jax.lax.all_to_all(xin, expert_axes, 0, 0, tiled=True)
  # Each local expert runs once over the buffers that every source group sent it.
  xin = einops.rearrange(xin, '(g e) c d -> e (g c) d', g=groups)
  out = backends.experts_on_buffers(xin, experts)
  out = einops.rearrange(out, 'e (g c) d -> (g e) c d', g=groups)
  if expert_axes:
    out = jax.lax.all_to_all(out, expert_axes, 0, 0, tiled=True)  # back to the tokens' device
  combine = jnp.einsum('knec,nk->nec', dispatch.astype(weights.dtype), weights).astype(x.dtype)
  y = jnp.einsum('ecd,nec->nd', out, combine)
  if mlp_axes:
    y = jax.lax.psum(y, mlp_axes)
  return y, (jnp.sum(valid) * k - jnp.sum(kept)).astype(jnp.int32)


def _exclusive_cumsum(a, axis=0):
  return jnp.cumsum(a, axis=axis) - a


def _ragged_all_to_all(x, ids, weights, valid, experts, *, expert_axes, mlp_axes,
                       num_total_experts, backend, capacity_factor, backend_options):
  """Dropless: each (token, slot) row goes to the device of its expert and back, sizes ragged.

  Rows are sorted by expert, so the rows for device j are one contiguous slice. Every device
  learns the whole [source, destination, local expert] count table (one small all_gather), from
  which all offsets follow. The receive buffer holds the worst case: every row of the group.
  """
  del backend, capacity_factor  # always grouped matmuls
  ragged_impl = backend_options.get('ragged_impl', 'auto')
  block_size = backend_options.get('block_size', 128)
  if not expert_axes:  # one expert group: nothing to exchange
    return backends.ragged_backend(x, ids, weights, valid, experts, impl=ragged_impl,
                                   block_size=block_size)
  n, k = ids.shape
  d = x.shape[1]
  num_local = experts['w_gate'].shape[0]
  groups = num_total_experts // num_local
  flat = jnp.where(jnp.repeat(valid, k), ids.reshape(-1), num_total_experts)  # padding: last
  order = jnp.argsort(flat, stable=True)
  rows = x[order // k]
  counts = jnp.bincount(flat, length=num_total_experts).reshape(groups, num_local)
  table = jax.lax.all_gather(counts, expert_axes, axis=0, tiled=False)  # [src, dst, local]
  me = _index(expert_axes)
  sent = table.sum(-1)  # [src, dst] rows
  send_sizes, recv_sizes = sent[me], sent[:, me]
  input_offsets = _exclusive_cumsum(send_sizes)
  output_offsets = _exclusive_cumsum(sent, axis=0)[me]  # where my rows start on each receiver
  capacity = n * k * groups
  received = jax.lax.ragged_all_to_all(
      rows, jnp.zeros((capacity, d), x.dtype), input_offsets, send_sizes, output_offsets,
      recv_sizes, axis_name=expert_axes)
  # Received rows are source-major, each source's rows sorted by local expert.
  local_ids = jnp.repeat(jnp.tile(jnp.arange(num_local), groups), table[:, me].reshape(-1),
                         total_repeat_length=capacity)
  filled = jnp.arange(capacity) < jnp.sum(recv_sizes)
  local_ids = jnp.where(filled, local_ids, num_local)
  out, _ = backends.ragged_backend(received, local_ids[:, None], jnp.ones((capacity, 1), x.dtype),
                                   filled, experts, impl=ragged_impl, block_size=block_size)
  # Send each source's rows back to where they came from.
  returned = jax.lax.ragged_all_to_all(
      out, jnp.zeros((n * k, d), x.dtype), _exclusive_cumsum(recv_sizes), recv_sizes,
      _exclusive_cumsum(sent, axis=1)[:, me], send_sizes, axis_name=expert_axes)
  unsorted = jnp.zeros_like(returned).at[order].set(returned).reshape(n, k, d)
  y = jnp.einsum('nkd,nk->nd', unsorted, weights.astype(x.dtype))
  if mlp_axes:
    y = jax.lax.psum(y, mlp_axes)
  return y, jnp.int32(0)


# model.moe.ep_strategy; 'none' (no expert parallelism: the local backend on every device) is
# the layer's choice, not a strategy.
STRATEGIES = {'ring': _ring, 'all_to_all': _all_to_all, 'ragged_all_to_all': _ragged_all_to_all}


def sharded_backend(strategy: str, backend: str, *, capacity_factor: float, **backend_options):
  """A function with the backend signature that runs `strategy` over the active mesh.

  backend (with backend_options) is the local dispatch backend of the ring strategy;
  all_to_all always exchanges capacity buffers; ragged_all_to_all always runs grouped matmuls.
  Must be called while a mesh (jax.set_mesh) and the logical rules (nn.logical_axis_rules) are
  in force, as parallel.mesh.activate provides. num_dropped is summed over all devices.
  """
  run_strategy = registry.lookup(STRATEGIES, strategy, 'config.model.moe.ep_strategy',
                                 'expert-parallel strategy')

  def run(x, ids, weights, valid, experts):
    if strategy == 'ragged_all_to_all' and layers.target_platform() == 'cpu':
      raise NotImplementedError(
          'config.model.moe.ep_strategy=ragged_all_to_all: jax.lax.ragged_all_to_all does not '
          'run on CPU; use ring or all_to_all here (ragged_all_to_all is for TPU / GPU)')
    batch = _axes(nn.logical_to_mesh_axes(('activation_batch',))[0])
    w_spec = nn.logical_to_mesh_axes(('exp', 'embed', 'mlp'))
    expert_axes, embed_axes, mlp_axes = (_axes(a) for a in w_spec)
    down_spec = nn.logical_to_mesh_axes(('exp', 'mlp', 'embed'))
    num_total = experts['w_gate'].shape[0]
    if num_total % _size(expert_axes):
      raise ValueError(f'config.model.moe.num_experts={num_total} must be a multiple of the '
                       f'{_size(expert_axes)} devices on mesh axes {expert_axes}')
    if not set(expert_axes) <= set(batch):
      raise ValueError(f'expert axes {expert_axes} must also split the batch ({batch})')

    def body(x, ids, weights, valid, experts):
      if embed_axes:  # FSDP: gather the weights' embed dim just for this layer
        experts = {'w_gate': jax.lax.all_gather(experts['w_gate'], embed_axes, axis=1, tiled=True),
                   'w_up': jax.lax.all_gather(experts['w_up'], embed_axes, axis=1, tiled=True),
                   'w_down': jax.lax.all_gather(experts['w_down'], embed_axes, axis=2, tiled=True)}
      y, dropped = run_strategy(x, ids, weights, valid, experts, expert_axes=expert_axes,
                                mlp_axes=mlp_axes, num_total_experts=num_total, backend=backend,
                                capacity_factor=capacity_factor, backend_options=backend_options)
      return y, dropped.reshape(1)

    tokens = jax.P(batch, None)
    y, dropped = jax.shard_map(
        body,
        in_specs=(tokens, tokens, tokens, jax.P(batch),
                  {'w_gate': w_spec, 'w_up': w_spec, 'w_down': down_spec}),
        out_specs=(tokens, jax.P(batch)),
        # TPU's grouped-matmul kernels (megablox, see backends) declare outputs without
        # per-axis variance types; the transpose of shard_map sums partial gradients either way.
        check_vma=False)(x, ids, weights, valid, experts)
    return y, jnp.sum(dropped)

  return run
