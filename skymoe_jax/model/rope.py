"""Rotary position embedding in the LLaMA layout (rotate the two halves of each head)."""
import jax.numpy as jnp


def apply_rope(x, positions, theta: float = 10000.0):
  """x: [B, T, H, Dh]; positions: int [B, T]. Angles computed in fp32."""
  dh = x.shape[-1]
  inv_freq = 1.0 / (theta ** (jnp.arange(0, dh, 2, dtype=jnp.float32) / dh))
  angles = positions.astype(jnp.float32)[:, :, None] * inv_freq  # [B, T, Dh/2]
  cos = jnp.cos(angles)[:, :, None, :]
  sin = jnp.sin(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : dh // 2], x32[..., dh // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)
