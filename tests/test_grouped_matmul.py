"""The grouped-matmul kernels (model/moe/grouped_matmul.py) against the XLA reference.

On CPU every kernel runs in Pallas' interpret mode: the GPU one (Pallas Triton) and the TPU one
(megablox gmm / tgmm). On its own accelerator the kernel-level tests run the real kernel (e.g.
`pytest tests/test_grouped_matmul.py -k triton` on a GPU). Oracles: plain XLA matmuls per block
or per group (jax.lax.ragged_dot), the `loop` MoE backend, and the single-device train step with
that backend.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from skymoe_jax import registry
from skymoe_jax.model import factory
from skymoe_jax.model.moe import backends, expert_parallel, grouped_matmul
from skymoe_jax.parallel import mesh as mesh_lib
from test_moe import BLOCK, _backend_problem, _loop_reference, _value_and_grad, random_experts
from test_sharding import _configured, _train_losses

KERNELS = ('triton', 'megablox')
# The model-level checks below use test_moe's small dims (tiles the GPU cannot run): CPU only.
cpu_only = pytest.mark.skipif(jax.default_backend() != 'cpu',
                              reason="the kernels' interpret-mode checks inside the model")


def _interpret(kernel):
  """Interpret unless this process runs on the kernel's own accelerator."""
  return jax.default_backend() != backends.KERNEL_PLATFORMS[kernel]


def _assert_close_tree(got, want, atol, rtol=1e-5):
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=atol, rtol=rtol,
                               err_msg=jax.tree_util.keystr(path))


def _value_and_grads(fn, cotangent):
  """jit(value and gradient w.r.t. the two array arguments) of sum(fn(a, w) * cotangent)."""
  loss = lambda a, w: jnp.sum(fn(a, w) * cotangent)
  return jax.jit(lambda a, w: (fn(a, w), jax.grad(loss, argnums=(0, 1))(a, w)))


@pytest.mark.parametrize('k,n,dtype,atol,rtol', [(64, 96, jnp.float32, 1e-5, 1e-5),
                                                 (48, 80, jnp.float32, 1e-5, 1e-5),
                                                 (64, 96, jnp.bfloat16, 5e-2, 2e-2)])
def test_triton_block_matmul_equals_xla(k, n, dtype, atol, rtol):
  """Blocks of uneven experts (expert 1 has none), unused blocks at the end, tiles of the
  contracting and output dims both whole (64, 96 = 3 x 32) and the smallest (48, 80: 16)."""
  rng = np.random.default_rng(0)
  num_blocks, rows, num_experts = 7, 16, 4
  blocks = jnp.asarray(rng.standard_normal((num_blocks, rows, k)), dtype)
  w = jnp.asarray(rng.standard_normal((num_experts, k, n)) / np.sqrt(k), dtype)
  block_expert = jnp.asarray([0, 0, 2, 3, 3, 3, 3])  # unused blocks carry the last expert
  used = jnp.asarray([1, 1, 1, 1, 1, 0, 0], bool)
  cotangent = jnp.asarray(rng.standard_normal((num_blocks, rows, n)), dtype)

  def xla(a, w):  # in float32 from the same (rounded) inputs
    out = jnp.einsum('bsk,bkn->bsn', a.astype(jnp.float32), w[block_expert].astype(jnp.float32))
    return jnp.where(used[:, None, None], out, 0)

  interpret = _interpret('triton')
  kernel = lambda a, w: grouped_matmul.triton_block_matmul(a, w, block_expert, used, interpret)
  (out, (d_a, d_w)) = _value_and_grads(kernel, cotangent)(blocks, w)
  want = _value_and_grads(xla, cotangent.astype(jnp.float32))(blocks, w)
  assert out.dtype == d_a.dtype == d_w.dtype == dtype
  f32 = lambda a: np.asarray(a.astype(jnp.float32))
  _assert_close_tree([f32(a) for a in (out, d_a, d_w)], (want[0], *want[1]), atol, rtol)
  np.testing.assert_array_equal(f32(out)[5:], 0.0)    # unused blocks: zeros
  np.testing.assert_array_equal(f32(d_a)[5:], 0.0)
  np.testing.assert_array_equal(f32(d_w)[1], 0.0)     # an expert with no rows
  # The weight gradient comes only from each expert's own blocks: expert 0 from blocks 0-1.
  np.testing.assert_allclose(f32(d_w)[0], np.einsum('bsk,bsn->kn', f32(blocks)[:2],
                                                    f32(cotangent)[:2]), atol=atol, rtol=rtol)


def test_megablox_gmm_equals_ragged_dot():
  """Uneven and empty groups, rows past the last group (zero output, zero input gradient), and
  a row count that is no multiple of the kernel's 128-row tile."""
  rng = np.random.default_rng(1)
  m, k, n = 200, 64, 96
  sizes = jnp.asarray([50, 0, 120, 13], jnp.int32)  # 183 of 200 rows
  x = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((4, k, n)) / np.sqrt(k), jnp.float32)
  cotangent = rng.standard_normal((m, n)).astype(np.float32)
  in_groups = (np.arange(m) < 183)[:, None]

  def xla(x, w):
    return jnp.where(in_groups, jax.lax.ragged_dot(x, w, sizes), 0)

  kernel = lambda x, w: grouped_matmul.megablox_gmm(x, w, sizes, _interpret('megablox'))
  out, (d_x, d_w) = _value_and_grads(kernel, cotangent)(x, w)
  want = _value_and_grads(xla, cotangent)(x, w)
  _assert_close_tree((out, d_x, d_w), (want[0], *want[1]), atol=1e-4)
  np.testing.assert_array_equal(np.asarray(out)[183:], 0.0)
  np.testing.assert_array_equal(np.asarray(d_x)[183:], 0.0)
  np.testing.assert_array_equal(np.asarray(d_w)[1], 0.0)


@cpu_only
@pytest.mark.parametrize('impl', KERNELS)
def test_ragged_backend_kernel_equals_loop(impl):
  """The whole ragged backend with the kernel: router, dispatch, SwiGLU experts, combine, and
  the gradients of x, the router and every expert weight (test_moe's problem: empty experts,
  several blocks per expert, padding tokens)."""
  backend = backends.get_backend('ragged', ragged_impl=impl, block_size=BLOCK)
  (ref_loss, (ref_y, _, _)), ref_grads = _loop_reference(2, True)
  (loss, (y, _, dropped)), grads = _value_and_grad(backend, 2, True)(*_backend_problem())
  assert int(dropped) == 0
  np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-4, rtol=1e-5)
  _assert_close_tree((y, grads), (ref_y, ref_grads), atol=1e-5)


def test_auto_picks_the_kernel_of_the_target_platform():
  resolve = backends.resolve_ragged_impl
  assert [resolve('auto', p) for p in ('cpu', 'gpu', 'tpu')] == ['blocks', 'triton', 'megablox']
  assert resolve('triton', 'gpu') == 'triton' and resolve('megablox', 'cpu') == 'megablox'
  assert resolve('blocks', 'tpu') == 'blocks'
  with pytest.raises(registry.ConfigError, match=r"ragged_impl='triton': a gpu kernel, but "
                     r'this compiles for tpu'):
    resolve('triton', 'tpu')
  with pytest.raises(registry.ConfigError, match=r"ragged_impl='megablox': a tpu kernel"):
    resolve('megablox', 'gpu')
  with pytest.raises(registry.UnknownChoiceError, match='ragged_impl'):
    resolve('gmm', 'gpu')


@pytest.mark.parametrize('dtype', [jnp.bfloat16, jnp.float32])
def test_triton_kernels_lower_for_cuda(dtype):
  """Lowered for CUDA on this CPU machine (Pallas writes the Triton IR itself): the forward, the
  input-gradient and the weight-gradient kernels are three Triton custom calls, and the
  weight gradient has no XLA dot at all."""
  num_blocks, rows, k, n, num_experts = 6, 16, 64, 96, 4

  def forward_and_grads(blocks, w, block_expert, used):
    out, pullback = jax.vjp(
        lambda a, w: grouped_matmul.triton_block_matmul(a, w, block_expert, used), blocks, w)
    return out, pullback(jnp.ones_like(out))

  shape = lambda *s: jax.ShapeDtypeStruct(s, dtype)
  hlo = jax.jit(forward_and_grads).trace(
      shape(num_blocks, rows, k), shape(num_experts, k, n),
      jax.ShapeDtypeStruct((num_blocks,), jnp.int32),
      jax.ShapeDtypeStruct((num_blocks,), bool)).lower(lowering_platforms=('cuda',)).as_text()
  assert hlo.count('__gpu$xla.gpu.triton') == 3
  assert 'stablehlo.dot_general' not in hlo


def test_megablox_kernels_lower_for_tpu():
  """Lowered for TPU here: forward gmm, input-gradient gmm (weights transposed) and weight-
  gradient tgmm are three Mosaic custom calls, and no XLA dot remains."""
  m, k, n, num_experts = 256, 128, 256, 4

  def forward_and_grads(x, w, sizes):
    out, pullback = jax.vjp(lambda x, w: grouped_matmul.megablox_gmm(x, w, sizes), x, w)
    return out, pullback(jnp.ones_like(out))

  shape = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
  hlo = jax.jit(forward_and_grads).trace(
      shape(m, k), shape(num_experts, k, n), jax.ShapeDtypeStruct((num_experts,), jnp.int32)
  ).lower(lowering_platforms=('tpu',)).as_text()
  assert hlo.count('stablehlo.custom_call @tpu_custom_call') == 3
  assert 'stablehlo.dot_general' not in hlo


def test_triton_refuses_tiles_the_gpu_cannot_run():
  blocks = jnp.zeros((2, 16, 24))  # 24 contracting: an 8-wide tile
  w = jnp.zeros((2, 24, 32))
  with pytest.raises(ValueError, match='ragged_impl=triton: tiles .* divisible by 16'):
    grouped_matmul.triton_block_matmul(blocks, w, jnp.zeros((2,), jnp.int32),
                                       jnp.ones((2,), bool), False)


def _expert_parallel_problem(seed=5):
  """32 tokens (4 per device), 4 experts of which expert 2 is never chosen, 4 padding tokens."""
  rng = np.random.default_rng(seed)
  n, d, f, e = 32, 16, 32, 4
  x = rng.standard_normal((n, d)).astype(np.float32)
  router_w = rng.standard_normal((d, e)).astype(np.float32)
  bias = np.array([0.0, 0.0, -30.0, 0.0], np.float32)
  valid = np.ones((n,), bool)
  valid[[3, 9, 20, 31]] = False
  r = rng.standard_normal((n, d)).astype(np.float32)
  return [jnp.asarray(a) for a in (x, router_w)] + [
      jax.tree.map(jnp.asarray, random_experts(rng, e, d, f))] + [
          jnp.asarray(a) for a in (bias, valid, r)]


@cpu_only
@pytest.mark.parametrize('impl', KERNELS)
@pytest.mark.parametrize('mesh_sizes', [dict(data=2, expert=4), dict(data=2, fsdp=2, expert=2)])
def test_kernel_under_expert_parallelism_equals_loop(impl, mesh_sizes):
  """The kernel inside the ring strategy's shard_map on 8 devices: each device runs its own
  experts over the gathered tokens; the custom_vjp gradients are per-device partial sums
  (data-parallel copies of an expert, FSDP-gathered weights) that shard_map's transpose adds
  up (check_vma=False). Loss, outputs and every gradient as the unsharded loop backend's."""
  args = _expert_parallel_problem()
  want = _value_and_grad(backends.loop_backend, 2, True)(*args)
  config = _configured(mesh_sizes)
  mesh = mesh_lib.create_mesh(config)
  sharded = expert_parallel.sharded_backend('ring', 'ragged', capacity_factor=1.25,
                                            ragged_impl=impl, block_size=BLOCK)
  with mesh_lib.activate(mesh, config):
    got = _value_and_grad(sharded, 2, True)(*args)
  (loss, (y, _, dropped)), grads = got
  (ref_loss, (ref_y, _, _)), ref_grads = want
  assert int(dropped) == 0
  np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-4, rtol=1e-5)
  _assert_close_tree((y, grads), (ref_y, ref_grads), atol=1e-5)
  assert np.all(np.asarray(grads[2]['w_gate'])[2] == 0.0)  # the expert no token chose


@pytest.fixture(scope='module')
def loop_train_step():
  """Two SGD steps of the tiny model on one device with the loop (reference) MoE backend."""
  config = _configured(dict(data=1), 'none', 'loop')
  model_params = _initial_params(config)
  return model_params, _train_losses(config, model_params)


def _initial_params(config):
  model = factory.create_model(config)
  return jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), *factory.example_inputs(
      config)))['params'])()


@cpu_only
@pytest.mark.slow  # ~50 s per kernel on 2 CPU cores: compiling the whole train step
@pytest.mark.parametrize('impl', KERNELS)
def test_sharded_train_step_with_kernel_equals_loop(loop_train_step, impl):
  """The kernel inside the sharded train step on 8 devices (data 2 x expert 4, ring): each
  device runs its own expert's rows, the custom_vjp gradients are per-device partial sums that
  shard_map adds up (check_vma=False). Two steps: losses and updated params as the reference."""
  params, (ref_losses, ref_state) = loop_train_step
  config = _configured(dict(data=2, expert=4), 'ring', 'ragged')
  config.model.moe.ragged_impl = impl
  losses, state = _train_losses(config, params)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5),
               jax.device_get(state['params']), jax.device_get(ref_state['params']))
