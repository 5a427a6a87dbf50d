"""Rotary positions (model/rope.py), 1-D and with the image tokens on their patch grid.

Oracles: positions written out by hand for a 2x2 grid, a numpy loop that rotates each pair of
channels by its own angle, and the invariances that define relative positions.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from skymoe_jax import config as config_lib
from skymoe_jax.model import rope


def numpy_rope(x, angle_pos, theta):
  """x [T, Dh]; angle_pos [T, Dh/2]: the position each frequency turns by (LLaMA's halves)."""
  t, dh = x.shape
  out = np.empty_like(x, dtype=np.float64)
  for i in range(t):
    for f in range(dh // 2):
      a = angle_pos[i, f] * theta ** (-2.0 * f / dh)
      x1, x2 = x[i, f], x[i, f + dh // 2]
      out[i, f] = x1 * np.cos(a) - x2 * np.sin(a)
      out[i, f + dh // 2] = x2 * np.cos(a) + x1 * np.sin(a)
  return out


def test_grid_positions_by_hand():
  """A 2x2 grid: patches (0,0) (0,1) (1,0) (1,1), then text from 2 on both axes."""
  rows, cols = rope.rotary_positions(jnp.arange(7)[None], image_grid=2)
  assert rows.tolist() == [[0, 0, 1, 1, 2, 3, 4]]
  assert cols.tolist() == [[0, 1, 0, 1, 2, 3, 4]]
  same = rope.rotary_positions(jnp.arange(7)[None])
  assert same[0].tolist() == same[1].tolist() == [list(range(7))]


@pytest.mark.parametrize('grid', [0, 3])
def test_rotation_matches_a_numpy_loop(grid):
  t, dh, theta = 14, 8, 100.0
  x = np.random.default_rng(0).normal(size=(1, t, 1, dh)).astype(np.float32)
  pos = np.arange(t)
  if grid:  # even frequencies by the row, odd by the column; text from `grid` on
    rows = np.where(pos < grid * grid, pos // grid, pos - grid * grid + grid)
    cols = np.where(pos < grid * grid, pos % grid, pos - grid * grid + grid)
  else:
    rows = cols = pos
  angle_pos = np.stack([rows if f % 2 == 0 else cols for f in range(dh // 2)], axis=1)
  ours = rope.apply_rope(jnp.asarray(x), jnp.asarray(pos)[None], theta, grid)
  np.testing.assert_allclose(np.asarray(ours)[0, :, 0], numpy_rope(x[0, :, 0], angle_pos, theta),
                             atol=1e-5)


def _scores(q, k, positions, grid):
  """[T, T] q_i . k_j after rotation at `positions` [T]."""
  rq = rope.apply_rope(q, positions[None], 10000.0, grid)[0, :, 0]
  rk = rope.apply_rope(k, positions[None], 10000.0, grid)[0, :, 0]
  return np.asarray(rq @ rk.T)


def test_image_scores_depend_on_row_and_column_offsets_only():
  """Under 2-D positions the score of a query and a key placed at patches (r, c) and (r', c')
  is a function of (r - r', c - c'); under 1-D of (r - r') * g + (c - c'), so a step down one
  row equals g steps along it. One content vector for every token isolates the positions."""
  g, dh = 4, 16
  key_q, key_k = jax.random.split(jax.random.key(0))
  q = jnp.broadcast_to(jax.random.normal(key_q, (1, 1, 1, dh)), (1, g * g, 1, dh))
  k = jnp.broadcast_to(jax.random.normal(key_k, (1, 1, 1, dh)), (1, g * g, 1, dh))
  s2, s1 = _scores(q, k, jnp.arange(g * g), g), _scores(q, k, jnp.arange(g * g), 0)
  at = lambda r, c: r * g + c  # noqa: E731
  np.testing.assert_allclose(s2[at(1, 1), at(0, 0)], s2[at(3, 2), at(2, 1)], rtol=1e-5)
  np.testing.assert_allclose(s2[at(0, 3), at(2, 0)], s2[at(1, 3), at(3, 0)], rtol=1e-5)
  # 1-D: a step down one row is g steps along the sequence wherever it is taken.
  np.testing.assert_allclose(s1[at(1, 0), at(0, 0)], s1[at(2, 1), at(1, 1)], rtol=1e-5)
  assert abs(s2[at(1, 0), at(0, 0)] - s1[at(1, 0), at(0, 0)]) > 1e-3  # 2-D: one row, not g steps
  assert abs(s2[at(0, 1), at(0, 0)] - s2[at(1, 0), at(0, 0)]) > 1e-3  # rows and columns apart


def test_text_scores_are_those_of_1d_positions():
  """Text after the image is shifted by the same amount on both axes, so text-to-text scores
  are exactly 1-D RoPE's."""
  g, t, dh = 3, 15, 8
  key_q, key_k = jax.random.split(jax.random.key(1))
  q, k = jax.random.normal(key_q, (1, t, 1, dh)), jax.random.normal(key_k, (1, t, 1, dh))
  text = slice(g * g, t)
  np.testing.assert_allclose(_scores(q, k, jnp.arange(t), g)[text, text],
                             _scores(q, k, jnp.arange(t), 0)[text, text], atol=1e-4)


def test_config_names_a_bad_image_rope():
  config = load_config('tiny')
  config.model.llm.image_rope = '3d'
  with pytest.raises(config_lib.ConfigError, match=r'model\.llm\.image_rope'):
    config_lib.validate(config)
  config.model.llm.update(image_rope='2d', head_dim=2)
  with pytest.raises(config_lib.ConfigError, match=r'head_dim=2 >= 4'):
    config_lib.validate(config)
