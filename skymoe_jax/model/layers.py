"""Small building blocks shared by the vision tower and the decoder.

Every parameter is created through `param` so that it carries logical axis names; the mesh rules
(one table in the config) map those names to mesh axes. Model code never names a mesh axis.
"""
from typing import Any, Sequence

import flax.linen as nn
import einops
import jax
from jax import ad_checkpoint
import jax.numpy as jnp
import numpy as np

from skymoe_jax import registry

Dtype = Any


def target_platform() -> str:
  """The platform being compiled for: the active mesh's devices (e.g. TPU when compiling ahead
  of time on a CPU host), else this process's default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else mesh.abstract_device
  return device.platform if device is not None else jax.default_backend()


def param(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str], dtype):
  """Creates a parameter whose metadata names one logical axis per dimension."""
  if len(axes) != len(shape):
    raise ValueError(f'{name}: {len(shape)} dims but logical axes {axes}')
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def fan_in_init(num_in_dims: int, num_batch_dims: int = 0):
  """Lecun-normal over the `num_in_dims` input dims of a kernel shaped [*batch, *in, *out]."""
  in_axis = tuple(range(num_batch_dims, num_batch_dims + num_in_dims))
  def init(key, shape, dtype=jnp.float32):
    out_axis = tuple(range(num_batch_dims + num_in_dims, len(shape)))
    batch_axis = tuple(range(num_batch_dims))
    return nn.initializers.variance_scaling(
        1.0, 'fan_in', 'truncated_normal', in_axis=in_axis, out_axis=out_axis,
        batch_axis=batch_axis)(key, shape, dtype)
  return init


class Linear(nn.Module):
  """y = x @ W (+ b), contracting the last `len(in_axes)` dims of x into `features`.

  Kernels are [*in_dims, *features], so multi-head projections keep their head axis
  (e.g. query: [embed, heads, head_dim]) and can be sharded by name.
  """
  features: Sequence[int]
  in_axes: Sequence[str]
  out_axes: Sequence[str]
  use_bias: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    n_in = len(self.in_axes)
    kernel_shape = tuple(x.shape[-n_in:]) + tuple(self.features)
    kernel = param(self, 'kernel', fan_in_init(n_in), kernel_shape,
                   tuple(self.in_axes) + tuple(self.out_axes), self.param_dtype)
    x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
    y = jax.lax.dot_general(
        x, kernel, ((tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = param(self, 'bias', nn.initializers.zeros, tuple(self.features), self.out_axes,
                   self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class RMSNorm(nn.Module):
  """LLaMA RMSNorm: statistics in fp32, scale applied in the compute dtype."""
  eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = param(self, 'scale', nn.initializers.ones, (x.shape[-1],), ('norm',), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with logically named scale and bias; statistics in fp32."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = param(self, 'scale', nn.initializers.ones, (d,), ('norm',), self.param_dtype)
    bias = param(self, 'bias', nn.initializers.zeros, (d,), ('norm',), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale + bias).astype(self.dtype)


def quick_gelu(x):
  """CLIP's activation: x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def attend(q, k, v, mask):
  """Grouped-query attention with fp32 softmax.

  q: [B, T, H, Dh]; k, v: [B, S, Hkv, Dh] with H a multiple of Hkv; mask: bool, broadcastable
  to [B, T, S] (True = may attend). Returns [B, T, H, Dh] in q's dtype.
  """
  dh = q.shape[-1]
  q = einops.rearrange(q, 'b t (k g) d -> b t k g d', k=k.shape[2])  # g query heads per kv head
  logits = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32)
  logits = logits / np.sqrt(dh).astype(np.float32)
  logits = jnp.where(mask[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
  return einops.rearrange(out, 'b t k g d -> b t (k g) d')


# Values the model names with jax.ad_checkpoint.checkpoint_name (an identity: no number changes)
# for the remat policies below to save. A value the backward pass needs and no policy saves is
# recomputed from the layer's input.
ATTENTION_SAVED = ('query_proj', 'key_proj', 'value_proj', 'attention_context', 'attention_out')
MLP_SAVED = ('mlp_gate', 'mlp_up')  # the dense FFN's down output is needed by no gradient
PROJECTIONS_SAVED = ATTENTION_SAVED + MLP_SAVED

# The MoE's expert matmuls, saved by primitive (they sit in model/moe/backends.py, behind one
# dispatch signature): ragged_dot, and the kernels with their own gradient (custom_vjp: the
# grouped matmuls, the attention kernel). An expert matmul's output is the largest activation of
# a MoE layer ([tokens x top_k, mlp_dim]) and its recomputation the largest remat cost.
EXPERT_MATMUL_PRIMITIVES = ('ragged_dot_general', 'custom_vjp_call')


def _save(names=(), primitives=(), offload_names=(), offload_primitives=()):
  """A remat policy: keep the named values `names` and the outputs of `primitives` in device
  memory, move `offload_names` / `offload_primitives` to pinned host memory and back for the
  backward pass, recompute everything else."""
  keep, keep_ops = frozenset(names), frozenset(primitives)
  move, move_ops = frozenset(offload_names), frozenset(offload_primitives)
  to_host = ad_checkpoint.Offloadable(src='device', dst='pinned_host')

  def policy(prim, *_, **params):
    key, kept, moved = ((params['name'], keep, move) if prim.name == 'name'  # checkpoint_name
                        else (prim.name, keep_ops, move_ops))
    if key in kept:
      return ad_checkpoint.Saveable
    return to_host if key in moved else ad_checkpoint.Recompute
  return policy


# config.model.remat_policy: what the backward pass of each decoder / vision layer recomputes,
# from the most memory and least recomputation to the least memory. Compiled FLOPs and memory of
# the 7B model under each: docs/scaling.md.
REMAT_POLICIES = {
    'none': None,  # no rematerialisation: every activation kept
    # Projections and MoE experts kept; recomputed: norms, RoPE, activations, the attention core.
    'save_proj_experts': _save(PROJECTIONS_SAVED, EXPERT_MATMUL_PRIMITIVES),
    # The same with the experts' outputs in host memory (moved over PCIe, not recomputed).
    'save_proj_offload_experts': _save(PROJECTIONS_SAVED,
                                       offload_primitives=EXPERT_MATMUL_PRIMITIVES),
    'save_proj': _save(PROJECTIONS_SAVED),  # the MoE layers recomputed
    'save_attention': _save(ATTENTION_SAVED),  # the FFNs and MoE layers recomputed
    'offload_proj': _save(offload_names=PROJECTIONS_SAVED),  # projections to host and back
    'full': jax.checkpoint_policies.nothing_saveable,  # only the layer's input kept
    'dots': jax.checkpoint_policies.checkpoint_dots,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # Chosen by the mesh from config.model.remat_auto (parallel/mesh.py remat_policy) before the
    # model is built. Unresolved (a forward-only use, where remat changes nothing: counting
    # parameters, evaluation) it runs as 'full', the policy that needs the least memory.
    'auto': jax.checkpoint_policies.nothing_saveable,
}


def maybe_remat(block_cls, policy_name: str):
  """Wraps a layer class in nn.remat with a named policy ('none' leaves it as is)."""
  policy = registry.lookup(REMAT_POLICIES, policy_name, 'config.model.remat_policy',
                           'remat policy')
  if policy_name == 'none':
    return block_cls
  return nn.remat(block_cls, policy=policy, prevent_cse=False)
