"""Rotary position embedding in the LLaMA layout (rotate the two halves of each head).

With `image_grid` = g > 0 the first g^2 positions are an image's row-major patch tokens and get
2-D rotary positions (model.llm.image_rope='2d'): the even frequencies turn by the patch's row,
the odd ones by its column, so the tokens of one column are as near each other as those of one
row (under 1-D positions a row's tokens are neighbours and a column's are g apart). The text
after the image takes position g, g + 1, ... on both axes, one past the image's last row and
column (Qwen2-VL's M-RoPE, with the two axes' frequencies interleaved so that each gets high and
low ones). Text-to-text relative positions are those of 1-D RoPE. The caller's positions stay
1-D (each token's index among the real tokens), so caches, padding and generation are unchanged.
"""
import jax.numpy as jnp


def rotary_positions(positions, image_grid: int = 0):
  """int [B, T] 1-D positions -> (row, column) positions, both [B, T] (equal to `positions`
  when image_grid is 0)."""
  if not image_grid:
    return positions, positions
  num_image = image_grid * image_grid
  text = positions - num_image + image_grid
  is_image = positions < num_image
  return (jnp.where(is_image, positions // image_grid, text),
          jnp.where(is_image, positions % image_grid, text))


def apply_rope(x, positions, theta: float = 10000.0, image_grid: int = 0):
  """x: [B, T, H, Dh]; positions: int [B, T]. Angles computed in fp32."""
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  rows, cols = rotary_positions(positions, image_grid)
  by_row = jnp.arange(dh // 2) % 2 == 0  # frequency i follows the row when i is even
  pos = jnp.where(by_row, rows[:, :, None], cols[:, :, None]).astype(jnp.float32)
  angles = pos * inv_freq  # [B, T, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : dh // 2], x32[..., dh // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
