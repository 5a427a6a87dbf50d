"""Attention implementations by name (`config.model.attention_impl`) and the mask they share.

  'xla'             layers.attend: the reference (einsums, fp32 softmax over a [B, T, S] mask)
  'splash'          TPU: Pallas splash attention (jax.experimental.pallas.ops.tpu), a fused
                    flash kernel with its own backward; padding goes in as segment ids
  'cudnn'           GPU: cuDNN flash attention through jax.nn.dot_product_attention (bf16/fp16)
  'tokamax_triton'  GPU: tokamax's Pallas-Triton flash attention
  'tokamax_mosaic'  GPU (sm90 / sm100): tokamax's Pallas Mosaic-GPU flash attention
  'auto'            picked when traced, by the platform being compiled for (`layers.target_platform`:
                    the mesh's devices, so an ahead-of-time compile for TPU on a CPU host gets
                    'splash'): TPU -> splash, GPU -> cudnn for bf16/fp16, else (CPU) xla.

On CPU, splash runs in Pallas interpret mode (slow; what the tests use); the GPU kernels do not
run on CPU at all. The KV-cache path (generation) always uses xla: its queries start at a cache
slot other than 0 and its keys are the cache slots, which the kernels' masks do not describe.

Every implementation computes what the reference computes for every query that may see at
least one real key: in SkyMoE every query, since the image tokens come first. A query that sees
none (leading padding in a decoder without image tokens; never read: its keys and values are
masked out of every other query) gets some finite value: the reference spreads it evenly over
all keys, splash over the padding at or before it.

Splash needs the sequence in whole blocks: the length is padded to a multiple of 128 with
padding keys (segment 0), and the block is the largest of 512, 256, 128 that divides it.
The 7B decoder (1296 image + 752 text tokens = 2048) runs unpadded in blocks of 512; the
ViT-L/14 tower at 504 px (1 + 36*36 = 1297 tokens) is padded to 1408 (8.6% more) in blocks of
128.
"""
import functools
import math
import time
from typing import Any, Callable, Optional

from absl import flags as absl_flags
import flax.linen as nn
import flax.struct
import jax
from jax.experimental.pallas.ops.tpu import splash_attention as splash
import jax.numpy as jnp
import numpy as np

from skymoe_jax import registry
from skymoe_jax.model import layers

SPLASH_LANES = 128  # splash's sequence blocks are whole multiples of the TPU's 128 lanes
SPLASH_BLOCKS = (512, 256, 128)  # largest first
FIELD = 'config.model.attention_impl'


@flax.struct.dataclass
class AttentionMask:
  """Which key slots each query may see, as kernels take it (no [B, T, S] array).

  Query t sits in slot query_offset + t; it may see slot s when key_mask[b, s] (None: every
  slot is real) and, if causal, s <= query_offset + t. Without a KV cache the T tokens are
  slots 0..T-1 (query_offset None, key_mask = the token mask); only the xla reference takes
  a cache's query_offset (None is no pytree leaf, so it stays None through scan and remat).
  """
  key_mask: Optional[jax.Array]  # [B, S] bool: slots that hold real tokens
  query_offset: Any = None  # the first query's slot (the KV cache's write index); None: 0
  causal: bool = flax.struct.field(pytree_node=False, default=True)

  def dense(self, num_queries: int, num_keys: int):
    """The same mask as a bool array broadcastable to [B, T, S] (what the xla reference reads)."""
    if not self.causal:
      if self.key_mask is None:
        return jnp.ones((1, num_queries, num_keys), bool)
      return self.key_mask[:, None, :]
    offset = 0 if self.query_offset is None else self.query_offset
    query_slot = offset + jnp.arange(num_queries)
    causal = jnp.arange(num_keys)[None, :] <= query_slot[:, None]  # [T, S]
    if self.key_mask is None:
      return causal[None]
    return causal[None] & self.key_mask[:, None, :]


def xla_attention(q, k, v, mask: AttentionMask):
  """The reference; q: [B, T, H, Dh], k, v: [B, S, Hkv, Dh]."""
  return layers.attend(q, k, v, mask.dense(q.shape[1], k.shape[1]))


def _kernel_platform(name: str, platforms, mask: AttentionMask) -> str:
  if mask.query_offset is not None:
    raise ValueError(f'{FIELD}={name!r}: a KV cache (queries past slot 0) takes the xla path')
  platform = layers.target_platform()
  if platform not in platforms:
    raise NotImplementedError(f'{FIELD}={name!r} runs on {"/".join(platforms)}, not on '
                              f'{platform}; use auto or xla here')
  return platform


def _per_shard(kernel: Callable, q, k, v, key_mask):
  """kernel(q, k, v, key_mask) on each device's share of the batch and heads.

  A fused kernel is one custom call that the SPMD partitioner cannot split, so under a mesh it
  runs inside shard_map: batch over `activation_batch`'s mesh axes, heads over `heads`' (key
  and value heads over `kv_heads`', which must be the same axes, so every device holds whole
  groups of query heads with their key/value head). Sequences stay whole on each device. A
  batch or head count those axes do not divide (model.init's example batch of one) is not split.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return kernel(q, k, v, key_mask)
  batch, heads, kv_heads = (nn.logical_to_mesh_axes((name,))[0]
                            for name in ('activation_batch', 'heads', 'kv_heads'))
  if heads != kv_heads:
    raise ValueError(f'{FIELD}: the fused attention kernels need the logical axes heads '
                     f'({heads}) and kv_heads ({kv_heads}) on the same mesh axes '
                     f'(config.mesh.rules)')

  def divides(axes, *sizes):
    ways = math.prod(mesh.shape[a] for a in ((axes,) if isinstance(axes, str) else axes or ()))
    return all(n % ways == 0 for n in sizes)
  batch = batch if divides(batch, q.shape[0]) else None
  heads = kv_heads = heads if divides(heads, q.shape[2], k.shape[2]) else None
  q_spec, kv_spec = jax.P(batch, None, heads, None), jax.P(batch, None, kv_heads, None)
  mask_spec = None if key_mask is None else jax.P(batch, None)
  # Pallas and cuDNN custom calls declare no per-axis variance types (see expert_parallel).
  return jax.shard_map(kernel, in_specs=(q_spec, kv_spec, kv_spec, mask_spec),
                       out_specs=q_spec, check_vma=False)(q, k, v, key_mask)


def splash_blocks(length: int):
  """(padded length, block size) splash runs a sequence of `length` tokens with."""
  padded = -(-length // SPLASH_LANES) * SPLASH_LANES
  return padded, next(b for b in SPLASH_BLOCKS if padded % b == 0)


def _splash_kernel(num_heads: int, length: int, block: int, causal: bool, interpret: bool):
  shape = (length, length)
  head_mask = splash.CausalMask(shape) if causal else splash.FullMask(shape)
  sizes = splash.BlockSizes(
      block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
      block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
  return splash.make_splash_mha(splash.MultiHeadMask([head_mask] * num_heads),
                                block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                interpret=interpret)


def splash_attention(q, k, v, mask: AttentionMask):
  """Pallas splash attention; padding (the batch's and the block padding) as segment ids.

  Keys: real tokens are segment 1, padding segment 0. Queries: segment 1 when the static mask
  (causal or full) lets them see some real key, as the reference's masked softmax does, else
  segment 0, so that they see padding instead of nothing (an empty row divides by zero, and
  its NaN would reach the other rows through the next layer's keys).
  """
  platform = _kernel_platform('splash', ('tpu', 'cpu'), mask)
  interpret = platform == 'cpu'
  t, s = q.shape[1], k.shape[1]
  if t != s:
    raise ValueError(f'{FIELD}=splash: self-attention only, got {t} queries and {s} keys')
  padded, block = splash_blocks(t)
  causal = mask.causal

  def run(q, k, v, key_mask):
    num_heads = q.shape[2]
    kernel = _splash_kernel(num_heads, padded, block, causal, interpret)
    pad = lambda a: jnp.pad(a, ((0, 0), (0, padded - t), (0, 0), (0, 0)))
    # Splash takes [heads, length, head_dim] per example and does not scale the logits.
    q = pad(q * jnp.asarray(1.0 / np.sqrt(q.shape[-1]), q.dtype)).transpose(0, 2, 1, 3)
    k, v = (pad(a).transpose(0, 2, 1, 3) for a in (k, v))
    if key_mask is None and padded == t:
      out = jax.vmap(kernel)(q, k, v)
    else:
      real = jnp.ones((q.shape[0], t), bool) if key_mask is None else key_mask
      kv_ids = jnp.pad(real.astype(jnp.int32), ((0, 0), (0, padded - t)))
      if causal:  # query t sees a real key when one sits at or before t
        q_ids = (jnp.cumsum(kv_ids, axis=1) > 0).astype(jnp.int32)
      else:
        q_ids = jnp.broadcast_to(jnp.max(kv_ids, axis=1, keepdims=True), kv_ids.shape)
      out = jax.vmap(kernel)(q, k, v, splash.SegmentIds(q=q_ids, kv=kv_ids))
    return out.transpose(0, 2, 1, 3)[:, :t]

  return _per_shard(run, q, k, v, mask.key_mask)


def _key_padding(key_mask, t: int, s: int):
  """[B, 1, T, S] bool: real keys only (the causal part is the kernel's is_causal)."""
  return jnp.broadcast_to(key_mask[:, None, None, :], (key_mask.shape[0], 1, t, s))


def cudnn_attention(q, k, v, mask: AttentionMask, implementation: str = 'cudnn'):
  """cuDNN flash attention (jax.nn.dot_product_attention), bf16/fp16 only.

  cuDNN's own padding mask takes sequence lengths, which cannot say "padding in the middle";
  the key padding goes in as a boolean mask instead (cuDNN adds it as a bias), so any padding
  pattern is exact. implementation='xla' runs jax's reference of the same call (tests).
  """
  _kernel_platform('cudnn', ('gpu',) if implementation == 'cudnn' else ('gpu', 'cpu'), mask)
  t, s = q.shape[1], k.shape[1]

  def run(q, k, v, key_mask):
    padding = None if key_mask is None else _key_padding(key_mask, t, s)
    return jax.nn.dot_product_attention(q, k, v, mask=padding, is_causal=mask.causal,
                                        implementation=implementation)

  return _per_shard(run, q, k, v, mask.key_mask)


def tokamax_attention(q, k, v, mask: AttentionMask, implementation: str):
  """tokamax.dot_product_attention; the key padding as a [B, 1, 1, S] boolean mask that its
  kernels broadcast block by block. implementation='xla': tokamax's reference (tests)."""
  _kernel_platform(f'tokamax_{implementation.split("_")[0]}',
                   ('gpu',) if implementation != 'xla' else ('gpu', 'cpu'), mask)
  import tokamax  # pylint: disable=g-import-not-at-top  # only when used: a heavy import
  # tokamax reads its options as absl flags and parses sys.argv itself when nobody has (a
  # process that is not an absl app, e.g. pytest, would fail on its own arguments): defaults.
  if not absl_flags.FLAGS.is_parsed():
    absl_flags.FLAGS.mark_as_parsed()

  def run(q, k, v, key_mask):
    padding = None if key_mask is None else key_mask[:, None, None, :]
    return tokamax.dot_product_attention(q, k, v, mask=padding, is_causal=mask.causal,
                                         implementation=implementation)

  return _per_shard(run, q, k, v, mask.key_mask)


IMPLEMENTATIONS = {
    'xla': xla_attention,
    'splash': splash_attention,
    'cudnn': cudnn_attention,
    'tokamax_triton': functools.partial(tokamax_attention, implementation='triton'),
    'tokamax_mosaic': functools.partial(tokamax_attention, implementation='mosaic_gpu'),
}


def auto_choice(dtype) -> str:
  """What 'auto' runs for inputs of `dtype` on the platform being compiled for."""
  platform = layers.target_platform()
  if platform == 'tpu':
    return 'splash'
  if platform == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return 'cudnn'
  return 'xla'


def auto_attention(q, k, v, mask: AttentionMask):
  return IMPLEMENTATIONS[auto_choice(q.dtype)](q, k, v, mask)


CHOICES = {'auto': auto_attention, **IMPLEMENTATIONS}


def get(name: str) -> Callable:
  """The implementation `name` (config.model.attention_impl) names."""
  return registry.lookup(CHOICES, name, FIELD, 'attention implementation')


def attend(name: str, q, k, v, mask: AttentionMask):
  """Attention by the implementation `name`. q: [B, T, H, Dh]; k, v: [B, S, Hkv, Dh] with H a
  multiple of Hkv. Returns [B, T, H, Dh] in q's dtype.

  Queries that start past slot 0 (a KV cache: mask.query_offset set) take the xla reference.
  """
  fn = get(name)
  return (xla_attention if mask.query_offset is not None else fn)(q, k, v, mask)


def benchmark(names=('xla', 'cudnn', 'tokamax_triton', 'tokamax_mosaic'), batch=4,
              length=2048, num_heads=32, num_kv_heads=32, head_dim=128, dtype='bfloat16',
              steps=10, causal=True) -> dict:
  """Milliseconds per forward + backward of each implementation on this process's devices, at a
  7B-like shape with the last 10% of every row padding; a failing implementation reports its
  error instead. For the accelerator check scripts, e.g.

    python -c "from skymoe_jax.model import attention_kernels as a; print(a.benchmark())"
  """
  rng = np.random.default_rng(0)
  make = lambda heads: jnp.asarray(rng.normal(size=(batch, length, heads, head_dim)), dtype)
  q, k, v = make(num_heads), make(num_kv_heads), make(num_kv_heads)
  mask = AttentionMask(jnp.broadcast_to(jnp.arange(length) < int(0.9 * length),
                                        (batch, length)), causal=causal)
  results = {}
  for name in names:
    fn = get(name)
    loss = lambda q, k, v: jnp.sum(fn(q, k, v, mask).astype(jnp.float32))
    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    try:
      jax.block_until_ready(step(q, k, v))
      start = time.perf_counter()
      for _ in range(steps):
        out = step(q, k, v)
      jax.block_until_ready(out)
      results[name] = round((time.perf_counter() - start) / steps * 1e3, 3)
    except Exception as e:  # pylint: disable=broad-except  # report, keep timing the others
      results[name] = f'{type(e).__name__}: {str(e).splitlines()[0][:200]}'
  return results
