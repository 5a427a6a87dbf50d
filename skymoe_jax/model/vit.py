"""CLIP-style vision transformer (ViT-L/14 in the paper), returning patch features for the LLM.

Patch embedding (no bias), a CLS token, learned position embeddings, a LayerNorm before the
blocks, pre-LN blocks with quick-GELU. Features come from `feature_layer` (-2: the penultimate
block, LLaVA-1.5's choice) with CLS dropped; blocks past that layer would never be used, so they
are not built. Position embeddings are stored at the configured grid and resized bicubically
(PyTorch's kernel, so converted CLIP checkpoints behave as in PyTorch) for other input sizes.
"""
from typing import Any

import einops
import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from skymoe_jax.config import num_feature_layers
from skymoe_jax.model import attention_kernels, layers


def cubic_resize_matrix(in_size: int, out_size: int, a: float = -0.75) -> np.ndarray:
  """[out, in] matrix of PyTorch's bicubic interpolation (align_corners=False, edges clamped)."""
  def kernel(d):
    d = abs(d)
    if d <= 1:
      return (a + 2) * d ** 3 - (a + 3) * d ** 2 + 1
    if d < 2:
      return a * d ** 3 - 5 * a * d ** 2 + 8 * a * d - 4 * a
    return 0.0
  scale = in_size / out_size
  m = np.zeros((out_size, in_size), np.float64)
  for i in range(out_size):
    src = (i + 0.5) * scale - 0.5
    base = int(np.floor(src))
    frac = src - base
    for j in range(-1, 3):
      m[i, min(max(base + j, 0), in_size - 1)] += kernel(j - frac)
  return m.astype(np.float32)


def sincos_2d(grid: int, width: int) -> np.ndarray:
  """[1 + grid^2, width]: a zero CLS row, then per patch (row-major) sin/cos of its row and column
  at width/4 geometric frequencies each (the fixed 2-D table from-scratch ViTs use)."""
  if width % 4:
    raise ValueError(f'a 2-D sin-cos position table needs a width divisible by 4, got {width}')
  omega = 1.0 / 10000 ** (np.arange(width // 4) / (width // 4))
  y, x = np.mgrid[:grid, :grid]
  ay, ax = y.reshape(-1, 1) * omega, x.reshape(-1, 1) * omega
  table = np.concatenate([np.sin(ay), np.cos(ay), np.sin(ax), np.cos(ax)], axis=1)
  return np.concatenate([np.zeros((1, width)), table]).astype(np.float32)


def resize_position_embedding(pos, new_grid: int):
  """pos: [1 + g*g, W] (CLS first) -> [1 + new_grid^2, W]; identity when the grid is unchanged."""
  old_grid = int(round(np.sqrt(pos.shape[0] - 1)))
  if old_grid * old_grid != pos.shape[0] - 1:
    raise ValueError(f'position embedding of {pos.shape[0]} rows is not 1 + a square grid')
  if new_grid == old_grid:
    return pos
  m = cubic_resize_matrix(old_grid, new_grid)
  grid = pos[1:].reshape(old_grid, old_grid, -1).astype(jnp.float32)
  grid = jnp.einsum('ih,jw,hwc->ijc', m, m, grid).reshape(new_grid * new_grid, -1)
  return jnp.concatenate([pos[:1], grid.astype(pos.dtype)], axis=0)


class VisionMLP(nn.Module):
  mlp_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kw = dict(use_bias=True, dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.Linear((self.mlp_dim,), ('embed',), ('mlp',), name='fc1', **kw)(x)
    return layers.Linear((x.shape[-1],), ('mlp',), ('embed',), name='fc2', **kw)(
        layers.quick_gelu(h))


class VisionLayer(nn.Module):
  """One pre-LN transformer block; scanned, so it returns (carry, None)."""
  num_heads: int
  mlp_dim: int
  eps: float = 1e-5
  attention_impl: str = 'xla'  # a name in attention_kernels.CHOICES
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, _=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    head_dim = width // self.num_heads
    h = layers.LayerNorm(self.eps, name='norm1', **kw)(x)
    proj = lambda name: layers.Linear((self.num_heads, head_dim), ('embed',), ('heads', 'head_dim'),
                                      use_bias=True, name=name, **kw)(h)
    q, k, v = proj('query'), proj('key'), proj('value')
    full = attention_kernels.AttentionMask(None, causal=False)  # every token sees every token
    out = attention_kernels.attend(self.attention_impl, q, k, v, full)
    x = x + layers.Linear((width,), ('heads', 'head_dim'), ('embed',), use_bias=True, name='out',
                          **kw)(out)
    x = nn.with_logical_constraint(x, ('activation_batch', 'activation_length', 'activation_embed'))
    x = x + VisionMLP(self.mlp_dim, name='mlp', **kw)(layers.LayerNorm(self.eps, name='norm2', **kw)(x))
    return x, None


class VisionTower(nn.Module):
  image_size: int
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  feature_layer: int = -2
  eps: float = 1e-5
  scan_layers: bool = True
  remat_policy: str = 'none'
  attention_impl: str = 'xla'
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  # The learned position embeddings' start: 'normal' (CLIP's, small noise) or 'sincos2d' (the
  # 2-D sin-cos table, so a tower trained from scratch knows where each patch is from step 0).
  posemb_init: str = 'normal'

  @nn.compact
  def __call__(self, images):
    """images: [B, H, W, 3] normalised pixels -> [B, (H/p)*(W/p), width] patch features."""
    b, h, w, _ = images.shape
    p = self.patch_size
    if h != w or h % p:
      raise ValueError(f'images must be square multiples of the patch size {p}, got {h}x{w}')
    grid = h // p
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Row-major patches, each [p, p, c]: the order of CLIP's conv patch embedding.
    patches = einops.rearrange(images, 'b (gh ph) (gw pw) c -> b (gh gw) ph pw c', ph=p, pw=p)
    x = layers.Linear((self.width,), ('patch_h', 'patch_w', 'channels'), ('embed',),
                      name='patch_embed', **kw)(patches)
    x = nn.with_logical_constraint(x, ('activation_batch', 'activation_length', 'activation_embed'))
    cls = layers.param(self, 'cls_token', nn.initializers.normal(0.02), (self.width,), ('embed',),
                       self.param_dtype)
    stored_grid = self.image_size // p
    if self.posemb_init == 'sincos2d':
      pos_init = lambda key, shape, dtype: jnp.asarray(sincos_2d(stored_grid, shape[1]), dtype)
    elif self.posemb_init == 'normal':
      pos_init = nn.initializers.normal(0.02)
    else:
      raise ValueError(f"posemb_init must be 'normal' or 'sincos2d', got {self.posemb_init!r}")
    pos = layers.param(self, 'pos_embed', pos_init,
                       (1 + stored_grid * stored_grid, self.width), ('positions', 'embed'),
                       self.param_dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.width)), x], axis=1)
    x = x + resize_position_embedding(pos, grid).astype(x.dtype)[None]
    x = layers.LayerNorm(self.eps, name='pre_norm', **kw)(x)

    n = num_feature_layers(self.depth, self.feature_layer)
    block = layers.maybe_remat(VisionLayer, self.remat_policy)
    args = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, eps=self.eps,
                attention_impl=self.attention_impl, **kw)
    if self.scan_layers:
      x, _ = nn.scan(block, variable_axes={'params': 0}, split_rngs={'params': True},
                     length=n, metadata_params={nn.PARTITION_NAME: 'layers'})(
                         name='layers', **args)(x, None)
    else:
      for i in range(n):
        x, _ = block(name=f'layer_{i}', **args)(x)
    return x[:, 1:]
