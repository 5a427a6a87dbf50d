"""Grouped-matmul kernels for the ragged MoE backend: forward, input and weight gradient.

Two kernels, one per accelerator, each with its backward written out (custom_vjp) so that every
matmul of a training step runs only over the rows routed to each expert; the weight gradient is
never a dense [experts, d, f] product over every row.

- megablox_gmm (TPU): rows sorted by expert (group sizes). The TPU grouped-matmul kernels that
  ship with jax (jax.experimental.pallas.ops.tpu.megablox): forward gmm, input gradient gmm with
  the weights transposed, weight gradient tgmm. (tokamax's TPU ragged_dot wraps the same
  kernels but checks the process's default device, so it refuses the ahead-of-time compile for
  a TPU topology on a CPU host.)
- triton_block_matmul (GPU): rows padded to whole blocks of one expert each (the `blocks`
  layout). Our own Pallas Triton kernels: tokamax's Triton ragged_dot has no interpret mode
  (0.0.12), jax ships Mosaic-GPU ones only (no interpret either), and interpret mode is how
  these are tested on CPU.

Both take `interpret`: run the Pallas kernel in interpret mode (on CPU, for tests).
"""
import functools
import importlib

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# megablox's tiles: rows x contracting x output columns (its own default; a dimension shorter
# than its tile is taken whole, which the TPU allows).
MEGABLOX_TILE = 128


def _megablox():
  # The module (the package's own `gmm` attribute is the function of the same name).
  return importlib.import_module('jax.experimental.pallas.ops.tpu.megablox.gmm')


def _pad_rows(a, multiple):
  return jnp.pad(a, ((0, -a.shape[0] % multiple), (0, 0)))


def _in_groups(num_rows, group_sizes):
  """[num_rows, 1] bool: the row belongs to some group (rows past the last group do not)."""
  return (jnp.arange(num_rows) < jnp.sum(group_sizes))[:, None]


def megablox_weight_grad(x, d_out, group_sizes, dtype, interpret=False):
  """dW[g] = x_g^T d_out_g (megablox tgmm): each group's own rows only."""
  x, d_out = _pad_rows(x, MEGABLOX_TILE), _pad_rows(d_out, MEGABLOX_TILE)  # padding: no group
  tiling = (MEGABLOX_TILE, min(MEGABLOX_TILE, x.shape[1]), min(MEGABLOX_TILE, d_out.shape[1]))
  return _megablox().tgmm(x.T, d_out, group_sizes, dtype, tiling, interpret=interpret)


def _megablox_rows(x, w, group_sizes, transpose_w, interpret):
  """x_g @ w[g] (or w[g]^T) per group g of rows; rows past the last group come out zero (the
  kernel leaves them unwritten)."""
  m = x.shape[0]
  n = w.shape[1] if transpose_w else w.shape[2]
  tiling = (MEGABLOX_TILE, min(MEGABLOX_TILE, x.shape[1]), min(MEGABLOX_TILE, n))
  out = _megablox().gmm(_pad_rows(x, MEGABLOX_TILE), w, group_sizes, x.dtype, tiling,
                        transpose_rhs=transpose_w, interpret=interpret)[:m]
  return jnp.where(_in_groups(m, group_sizes), out, 0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def megablox_gmm(x, w, group_sizes, interpret=False):
  """Grouped matmul on TPU: x [M, K] with rows grouped by expert (group_sizes [G], in order),
  w [G, K, N] -> [M, N]; rows past the last group are zero, in the output and in x's gradient."""
  return _megablox_rows(x, w, group_sizes, False, interpret)


def _megablox_gmm_fwd(x, w, group_sizes, interpret):
  return megablox_gmm(x, w, group_sizes, interpret), (x, w, group_sizes)


def _megablox_gmm_bwd(interpret, res, d_out):
  x, w, group_sizes = res
  d_x = _megablox_rows(d_out, w, group_sizes, True, interpret)
  d_w = megablox_weight_grad(x, d_out, group_sizes, w.dtype, interpret)
  return d_x.astype(x.dtype), d_w.astype(w.dtype), None


megablox_gmm.defvjp(_megablox_gmm_fwd, _megablox_gmm_bwd)


# Triton tiles: output columns and contracting steps (the rows are the layout's blocks).
# Starting points, not tuned on hardware: 128 x 64 steps and 8 warps, common for bf16 matmuls.
TRITON_TILE_N = 128
TRITON_TILE_K = 64
TRITON_PARAMS = dict(num_warps=8, num_stages=3)


def _tile(size: int, largest: int) -> int:
  """The largest power of two <= `largest` that divides `size` (Triton tiles are powers of 2)."""
  tile = largest
  while size % tile:
    tile //= 2
  return tile


def _check_tiles(tiles, interpret):
  if not interpret and min(tiles) < 16:
    raise ValueError(f'config.model.moe.ragged_impl=triton: tiles {tiles} from the model '
                     'dimensions; the GPU kernel needs ragged_block_size, embed and mlp dims '
                     'divisible by 16')


def _block_matmul_kernel(block_expert_ref, used_ref, x_ref, w_ref, out_ref, *, tile_k,
                         transpose_w):
  """One (block, column tile): out = x_block @ w[e][:, cols] (or w[e]^T), zeros if unused.
  x_ref: all rows [B * S, K] (whole arrays, indexed here: only the loaded tiles need to be
  powers of 2)."""
  i, j = pl.program_id(0), pl.program_id(1)
  rows, tile_n = out_ref.shape
  span = pl.ds(pl.multiple_of(i * rows, rows), rows)
  cols = pl.ds(pl.multiple_of(j * tile_n, tile_n), tile_n)

  @pl.when(used_ref[i] != 0)
  def _compute():
    e = block_expert_ref[i]

    def step(s, acc):
      ks = pl.ds(pl.multiple_of(s * tile_k, tile_k), tile_k)
      if transpose_w:
        return acc + pl.dot(x_ref[span, ks], w_ref[e, cols, ks], trans_b=True)
      return acc + pl.dot(x_ref[span, ks], w_ref[e, ks, cols])

    acc = jnp.zeros(out_ref.shape, jnp.float32)
    acc = jax.lax.fori_loop(0, x_ref.shape[1] // tile_k, step, acc)
    out_ref[...] = acc.astype(out_ref.dtype)

  @pl.when(used_ref[i] == 0)
  def _zero():
    out_ref[...] = jnp.zeros(out_ref.shape, out_ref.dtype)


def _triton_blocks(blocks, w, block_expert, used, *, transpose_w, interpret):
  """out[b] = blocks[b] @ w[block_expert[b]] (w[.]^T if transpose_w) where used[b], else 0."""
  num_blocks, rows, k = blocks.shape
  n = w.shape[1] if transpose_w else w.shape[2]
  tile_n, tile_k = _tile(n, TRITON_TILE_N), _tile(k, TRITON_TILE_K)
  _check_tiles((rows, tile_n, tile_k), interpret)
  kernel = functools.partial(_block_matmul_kernel, tile_k=tile_k, transpose_w=transpose_w)
  return pl.pallas_call(
      kernel,
      out_shape=jax.ShapeDtypeStruct((num_blocks, rows, n), blocks.dtype),
      grid=(num_blocks, n // tile_n),
      in_specs=[pl.no_block_spec] * 4,
      out_specs=pl.BlockSpec((None, rows, tile_n), lambda i, j: (i, 0, j)),
      compiler_params=plgpu.CompilerParams(**TRITON_PARAMS),
      interpret=interpret,
  )(block_expert.astype(jnp.int32), used.astype(jnp.int32), blocks.reshape(-1, k), w)


def _weight_grad_kernel(first_ref, end_ref, x_ref, d_ref, out_ref, *, rows):
  """One (expert, row tile, column tile) of dW[e] = sum over e's blocks of x_b^T d_b."""
  e, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
  tile_k, tile_n = out_ref.shape
  ks = pl.ds(pl.multiple_of(i * tile_k, tile_k), tile_k)
  cols = pl.ds(pl.multiple_of(j * tile_n, tile_n), tile_n)

  def step(b, acc):
    span = pl.ds(pl.multiple_of(b * rows, rows), rows)
    return acc + pl.dot(x_ref[span, ks], d_ref[span, cols], trans_a=True)

  acc = jax.lax.fori_loop(first_ref[e], end_ref[e], step, jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = acc.astype(out_ref.dtype)


def _triton_weight_grad(blocks, d_out, block_expert, used, num_experts, dtype, interpret):
  """dW [G, K, N] from each expert's own (contiguous) blocks; experts with none get zeros."""
  num_blocks, rows, k = blocks.shape
  n = d_out.shape[-1]
  tile_k, tile_n = _tile(k, TRITON_TILE_K), _tile(n, TRITON_TILE_N)
  _check_tiles((rows, tile_n, tile_k), interpret)
  experts = jnp.arange(num_experts)
  # The used blocks are sorted by expert: expert e owns blocks [first[e], end[e]).
  counted = lambda cmp: jnp.sum(used[None, :] & cmp(block_expert[None, :], experts[:, None]),
                                axis=1).astype(jnp.int32)
  first, end = counted(jnp.less), counted(jnp.less_equal)
  return pl.pallas_call(
      functools.partial(_weight_grad_kernel, rows=rows),
      out_shape=jax.ShapeDtypeStruct((num_experts, k, n), dtype),
      grid=(num_experts, k // tile_k, n // tile_n),
      in_specs=[pl.no_block_spec] * 4,
      out_specs=pl.BlockSpec((None, tile_k, tile_n), lambda e, i, j: (e, i, j)),
      compiler_params=plgpu.CompilerParams(**TRITON_PARAMS),
      interpret=interpret,
  )(first, end, blocks.reshape(num_blocks * rows, k), d_out.reshape(num_blocks * rows, n))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def triton_block_matmul(blocks, w, block_expert, used, interpret=False):
  """Grouped matmul on GPU over row blocks: out[b] = blocks[b] @ w[block_expert[b]] if used[b],
  else 0. blocks [B, S, K] (the blocks of each expert contiguous, used ones first), w [G, K, N].
  Same contract as the CPU block loop (backends._block_matmul)."""
  return _triton_blocks(blocks, w, block_expert, used, transpose_w=False, interpret=interpret)


def _triton_block_matmul_fwd(blocks, w, block_expert, used, interpret):
  out = triton_block_matmul(blocks, w, block_expert, used, interpret)
  return out, (blocks, w, block_expert, used)


def _triton_block_matmul_bwd(interpret, res, d_out):
  blocks, w, block_expert, used = res
  d_blocks = _triton_blocks(d_out, w, block_expert, used, transpose_w=True, interpret=interpret)
  d_w = _triton_weight_grad(blocks, d_out, block_expert, used, w.shape[0], w.dtype, interpret)
  return d_blocks, d_w, None, None


triton_block_matmul.defvjp(_triton_block_matmul_fwd, _triton_block_matmul_bwd)
