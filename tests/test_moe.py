"""MoE router, dispatch backends and the MoeFFN layer against independent oracles.

Oracles: numpy (float64) re-implementations written here, hand-worked numbers, and the `loop`
backend (itself checked against numpy first). No test compares the code with its own earlier
output.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import meta

from skymoe_jax.model import mlp as mlp_lib
from skymoe_jax.model.moe import backends, grouped_matmul, router
from skymoe_jax.model.moe.layer import MoeFFN, upcycle_mlp

ATOL = 1e-5
RTOL = 1e-5


# ----------------------------------------------------------------------------------------------
# numpy oracles
# ----------------------------------------------------------------------------------------------

def np_silu(a):
  return a / (1.0 + np.exp(-a))


def np_swiglu(x, w_gate, w_up, w_down):
  return (np_silu(x @ w_gate) * (x @ w_up)) @ w_down


def np_softmax(logits):
  z = logits - logits.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_logsumexp(logits):
  m = logits.max(-1, keepdims=True)
  return (m + np.log(np.exp(logits - m).sum(-1, keepdims=True)))[..., 0]


def np_topk(probs, k):
  ids = np.argsort(-probs, axis=-1, kind='stable')[:, :k]
  return ids, np.take_along_axis(probs, ids, axis=-1)


def np_moe(x, ids, weights, experts):
  """Per token, per slot: weight * swiglu with that expert's weights, summed."""
  x = np.asarray(x, np.float64)
  ex = {n: np.asarray(w, np.float64) for n, w in experts.items()}
  y = np.zeros_like(x)
  for n in range(x.shape[0]):
    for s in range(ids.shape[1]):
      e = int(ids[n, s])
      y[n] += float(weights[n, s]) * np_swiglu(x[n], ex['w_gate'][e], ex['w_up'][e],
                                                  ex['w_down'][e])
  return y


def random_experts(rng, e, d, f):
  return {
      'w_gate': (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(np.float32),
      'w_up': (rng.standard_normal((e, d, f)) / np.sqrt(d)).astype(np.float32),
      'w_down': (rng.standard_normal((e, f, d)) / np.sqrt(f)).astype(np.float32),
  }


def to_jnp(tree):
  return jax.tree.map(jnp.asarray, tree)


def to_np(tree):
  return jax.tree.map(np.asarray, tree)


# Jitted entry points: one compile per shape instead of one per eager op (2-core CI machine).
route = jax.jit(router.route, static_argnums=(1, 2))
load_balance_loss = jax.jit(router.load_balance_loss)
z_loss = jax.jit(router.z_loss)
router_stats = jax.jit(router.router_stats, static_argnums=(3,))
expert_load = jax.jit(router.expert_load, static_argnums=(1,))
capacity_dispatch = jax.jit(backends.capacity_dispatch, static_argnums=(2, 3))
loop_backend = jax.jit(backends.loop_backend)


def capacity_backend(capacity_factor):
  return jax.jit(backends.get_backend('capacity', capacity_factor=capacity_factor))


# ----------------------------------------------------------------------------------------------
# Router
# ----------------------------------------------------------------------------------------------

def test_route_hand_values():
  # Row 0: probabilities exactly (0.5, 0.3, 0.2) by construction.
  probs0 = np.array([0.5, 0.3, 0.2])
  logits = np.stack([np.log(probs0),
                     np.array([0.0, 3.0, 1.0]),
                     np.array([1.0, -2.0, 0.5])]).astype(np.float32)
  valid = jnp.ones((3,), bool)
  raw = route(jnp.asarray(logits), 2, False, valid)
  ren = route(jnp.asarray(logits), 2, True, valid)
  # Hand: row 0 top-2 = experts (0, 1) with raw weights (0.5, 0.3), renormalised (.625, .375).
  np.testing.assert_array_equal(np.asarray(raw.ids[0]), [0, 1])
  np.testing.assert_allclose(np.asarray(raw.weights[0]), [0.5, 0.3], atol=1e-6)
  np.testing.assert_allclose(np.asarray(ren.weights[0]), [0.625, 0.375], atol=1e-6)
  # All rows against numpy.
  p = np_softmax(logits.astype(np.float64))
  ids, w = np_topk(p, 2)
  np.testing.assert_array_equal(np.asarray(raw.ids), ids)
  np.testing.assert_array_equal(np.asarray(ren.ids), ids)
  assert raw.ids.dtype == jnp.int32
  np.testing.assert_allclose(np.asarray(raw.probs), p, atol=1e-6)
  np.testing.assert_allclose(np.asarray(raw.weights), w, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ren.weights), w / w.sum(-1, keepdims=True), atol=1e-6)
  np.testing.assert_allclose(np.asarray(ren.weights).sum(-1), 1.0, atol=1e-6)
  # Hand: row 1 top-2 = experts 1 then 2.
  np.testing.assert_array_equal(np.asarray(raw.ids[1]), [1, 2])
  # k=1 renormalised is weight 1.
  one = route(jnp.asarray(logits), 1, True, valid)
  np.testing.assert_allclose(np.asarray(one.weights), 1.0, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(one.ids[:, 0]), p.argmax(-1))


def test_route_padding_weights_zero():
  logits = jnp.asarray([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]])
  valid = jnp.asarray([True, False])
  for renorm in (False, True):
    r = route(logits, 2, renorm, valid)
    assert np.all(np.asarray(r.weights[1]) == 0.0)
    assert np.all(np.asarray(r.weights[0]) > 0.0)


def test_load_balance_loss_hand():
  # 4 tokens, 2 experts, top-1. probs rows chosen directly (logits = log probs).
  probs = np.array([[0.7, 0.3], [0.6, 0.4], [0.2, 0.8], [0.9, 0.1]])
  logits = jnp.asarray(np.log(probs), jnp.float32)
  valid = jnp.ones((4,), bool)
  r = route(logits, 1, False, valid)
  # Hand: ids 0,0,1,0 -> f = (.75, .25); P = mean probs = (.6, .4);
  # loss = 2 * (.75*.6 + .25*.4) = 2 * .55 = 1.1
  f = np.array([0.75, 0.25])
  pm = probs.mean(0)
  np.testing.assert_allclose(pm, [0.6, 0.4])
  np.testing.assert_allclose(float(load_balance_loss(r, valid)), 1.1, atol=1e-6)
  np.testing.assert_allclose(2 * np.sum(f * pm), 1.1)
  np.testing.assert_allclose(np.asarray(expert_load(r.ids, 2, valid)), f, atol=1e-7)

  # Perfectly uniform routing: balanced counts and balanced mean probs -> exactly 1.0.
  uni = np.array([[0.7, 0.3], [0.3, 0.7]])
  r = route(jnp.asarray(np.log(uni), jnp.float32), 1, False, jnp.ones((2,), bool))
  np.testing.assert_allclose(float(load_balance_loss(r, jnp.ones((2,), bool))), 1.0,
                             atol=1e-6)
  # Uniform probabilities (all logits equal) give 1.0 for any top-2 choice of 4 experts.
  r = route(jnp.zeros((5, 4)), 2, False, jnp.ones((5,), bool))
  np.testing.assert_allclose(float(load_balance_loss(r, jnp.ones((5,), bool))), 1.0,
                             atol=1e-6)

  # Padding tokens are excluded: append two padding rows with extreme logits; same 1.1.
  probs_pad = np.concatenate([probs, [[0.99, 0.01], [0.01, 0.99]]])
  valid_pad = jnp.asarray([True] * 4 + [False] * 2)
  r = route(jnp.asarray(np.log(probs_pad), jnp.float32), 1, False, valid_pad)
  np.testing.assert_allclose(float(load_balance_loss(r, valid_pad)), 1.1, atol=1e-6)


def test_load_balance_loss_top2_numpy():
  rng = np.random.default_rng(0)
  logits = rng.standard_normal((7, 4)).astype(np.float32)
  valid = np.array([1, 1, 0, 1, 1, 1, 0], bool)
  r = route(jnp.asarray(logits), 2, True, jnp.asarray(valid))
  p = np_softmax(logits.astype(np.float64))
  ids, _ = np_topk(p, 2)
  f = np.zeros(4)
  for n in np.flatnonzero(valid):
    for e in ids[n]:
      f[e] += 1
  f /= f.sum()
  pm = p[valid].mean(0)
  np.testing.assert_allclose(float(load_balance_loss(r, jnp.asarray(valid))),
                             4 * np.sum(f * pm), atol=1e-6)


def test_z_loss_numpy():
  rng = np.random.default_rng(1)
  logits = (3 * rng.standard_normal((6, 5))).astype(np.float32)
  valid = np.array([1, 0, 1, 1, 0, 1], bool)
  lse = np_logsumexp(logits.astype(np.float64))
  np.testing.assert_allclose(float(z_loss(jnp.asarray(logits), jnp.asarray(valid))),
                             np.mean(lse[valid] ** 2), rtol=1e-6)
  np.testing.assert_allclose(float(z_loss(jnp.asarray(logits), jnp.ones((6,), bool))),
                             np.mean(lse ** 2), rtol=1e-6)
  # Hand: logits all zero over E experts -> lse = log E.
  np.testing.assert_allclose(float(z_loss(jnp.zeros((3, 4)), jnp.ones((3,), bool))),
                             math.log(4) ** 2, rtol=1e-6)


def test_router_stats_numpy():
  rng = np.random.default_rng(2)
  n, e, k, num_cond = 12, 4, 2, 3
  logits = rng.standard_normal((n, e)).astype(np.float32)
  valid = rng.random(n) > 0.3
  valid[0] = True
  cond = rng.integers(0, num_cond, size=n)
  r = route(jnp.asarray(logits), k, False, jnp.asarray(valid))
  stats = router_stats(r, jnp.asarray(valid), jnp.asarray(cond), num_cond)

  p = np_softmax(logits.astype(np.float64))
  ids, _ = np_topk(p, k)
  counts = np.zeros((num_cond, e))
  for i in np.flatnonzero(valid):
    for x in ids[i]:
      counts[cond[i], x] += 1
  np.testing.assert_array_equal(np.asarray(stats['counts_by_condition']), counts)
  np.testing.assert_allclose(np.asarray(stats['load']).sum(), 1.0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(stats['load']), counts.sum(0) / counts.sum(), atol=1e-6)
  np.testing.assert_allclose(np.asarray(stats['mean_prob']), p[valid].mean(0), atol=1e-6)
  ent = -(p * np.log(p)).sum(-1)
  np.testing.assert_allclose(float(stats['entropy']), ent[valid].mean(), atol=1e-6)
  # Hand: uniform probabilities over 4 experts have entropy log 4.
  r = route(jnp.zeros((2, 4)), 2, False, jnp.ones((2,), bool))
  s = router_stats(r, jnp.ones((2,), bool), jnp.zeros((2,), jnp.int32), 1)
  np.testing.assert_allclose(float(s['entropy']), math.log(4), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------

def test_loop_backend_matches_numpy():
  rng = np.random.default_rng(3)
  d, f, e = 6, 10, 3
  x = rng.standard_normal((5, d)).astype(np.float32)
  experts = random_experts(rng, e, d, f)
  ids = np.array([[0, 2], [1, 0], [2, 1], [2, 0], [1, 2]], np.int32)
  weights = np.array([[0.6, 0.3], [0.9, 0.05], [0.5, 0.5], [0.0, 0.0], [1.0, 0.2]], np.float32)
  y, dropped = loop_backend(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights),
                                     jnp.ones((5,), bool), to_jnp(experts))
  np.testing.assert_allclose(np.asarray(y), np_moe(x, ids, weights, experts), atol=ATOL)
  assert int(dropped) == 0
  # Token 3 has zero weights -> zero output.
  np.testing.assert_array_equal(np.asarray(y[3]), 0.0)


BLOCK = 4
VARIANTS = {
    'dense': dict(name='dense'),
    'ragged_blocks': dict(name='ragged', ragged_impl='blocks', block_size=BLOCK),
    'ragged_dot': dict(name='ragged', ragged_impl='ragged_dot', block_size=BLOCK),
    'ragged_batched': dict(name='ragged', ragged_impl='batched', block_size=BLOCK),
    # Capacity >= N whenever capacity_factor >= E / k: nothing is dropped.
    'capacity': dict(name='capacity', capacity_factor=8.0),
}


def _get_backend(variant):
  kw = dict(VARIANTS[variant])
  return backends.get_backend(kw.pop('name'), **kw)


def _value_and_grad(backend, top_k, renormalize):
  def loss(x, router_w, experts, bias, valid, r):
    logits = x @ router_w + bias
    routing = route(logits, top_k, renormalize, valid)
    y, dropped = backend(x, routing.ids, routing.weights, valid, experts)
    return jnp.sum(y * r), (y, routing.ids, dropped)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))


def _backend_problem(seed=4):
  rng = np.random.default_rng(seed)
  n, d, f, e = 22, 8, 12, 5
  x = rng.standard_normal((n, d)).astype(np.float32)
  router_w = rng.standard_normal((d, e)).astype(np.float32)
  # Experts 0 (first) and 3 (middle) can never be chosen: they get no tokens.
  bias = np.array([-30.0, 0.0, 0.0, -30.0, 0.0], np.float32)
  experts = random_experts(rng, e, d, f)
  valid = np.ones((n,), bool)
  valid[[5, 17]] = False
  r = rng.standard_normal((n, d)).astype(np.float32)
  return [jnp.asarray(a) for a in (x, router_w)] + [
      jax.tree.map(jnp.asarray, experts)] + [jnp.asarray(a) for a in (bias, valid, r)]


@functools.lru_cache(maxsize=None)
def _loop_reference(top_k, renormalize):
  """The oracle (loop backend, checked against numpy above), computed once per routing case."""
  out = _value_and_grad(backends.loop_backend, top_k, renormalize)(*_backend_problem())
  return to_np(out)


@pytest.mark.parametrize('variant', list(VARIANTS))
@pytest.mark.parametrize('top_k,renormalize', [(1, False), (2, True), (2, False)])
def test_backend_equals_loop(variant, top_k, renormalize):
  args = _backend_problem()
  (ref_loss, (ref_y, ref_ids, _)), ref_grads = _loop_reference(top_k, renormalize)
  (loss, (y, ids, dropped)), grads = _value_and_grad(
      _get_backend(variant), top_k, renormalize)(*args)

  counts = np.bincount(np.asarray(ids).reshape(-1), minlength=5)
  assert counts[0] == 0 and counts[3] == 0  # empty experts really occur
  if variant.startswith('ragged'):
    assert counts.max() > 2 * BLOCK  # several blocks per expert
  assert int(dropped) == 0
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref_y), atol=ATOL, rtol=RTOL)
  np.testing.assert_allclose(float(loss), float(ref_loss), atol=1e-4, rtol=RTOL)
  for name, g, rg in zip(('x', 'router'), grads[:2], ref_grads[:2]):
    np.testing.assert_allclose(np.asarray(g), np.asarray(rg), atol=ATOL, rtol=RTOL,
                               err_msg=f'grad {name}')
  for name in ('w_gate', 'w_up', 'w_down'):
    np.testing.assert_allclose(np.asarray(grads[2][name]), np.asarray(ref_grads[2][name]),
                               atol=ATOL, rtol=RTOL, err_msg=f'grad {name}')
  # Unused experts get zero gradient; padding tokens get zero output and zero x-gradient.
  for w in jax.tree.leaves(grads[2]):
    assert np.all(np.asarray(w)[[0, 3]] == 0.0)
  np.testing.assert_array_equal(np.asarray(y)[[5, 17]], 0.0)
  np.testing.assert_array_equal(np.asarray(grads[0])[[5, 17]], 0.0)


def test_loop_forward_with_router_matches_numpy():
  """The loop oracle composed with the router, against numpy end to end (top-2, raw)."""
  x, router_w, experts, bias, valid, _ = _backend_problem()
  logits = np.asarray(x, np.float64) @ np.asarray(router_w, np.float64) + np.asarray(bias)
  p = np_softmax(logits)
  ids, w = np_topk(p, 2)
  w = w * np.asarray(valid)[:, None]
  routing = route(x @ router_w + bias, 2, False, valid)
  y, _ = loop_backend(x, routing.ids, routing.weights, valid, experts)
  np.testing.assert_allclose(np.asarray(y), np_moe(x, ids, w, to_np(experts)), atol=ATOL)


def test_expert_capacity_hand():
  assert backends.expert_capacity(4, 1, 2, 0.5) == 1      # ceil(0.5 * 4 / 2) = 1
  assert backends.expert_capacity(4, 2, 3, 0.75) == 2     # ceil(0.75 * 8 / 3) = 2
  assert backends.expert_capacity(10, 2, 4, 1.25) == 7    # ceil(6.25) = 7
  assert backends.expert_capacity(8, 2, 8, 1.0) == 2      # 2 exactly
  assert backends.expert_capacity(16, 2, 8, 1.25) == 5    # ceil(5.0) = 5
  assert backends.expert_capacity(1, 1, 8, 0.1) == 1      # never below 1
  assert backends.expert_capacity(22, 2, 5, 8.0) >= 22    # the no-drop setting used above


def _capacity_problem(seed, n, e, d=4, f=6):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, d)).astype(np.float32)
  return x, random_experts(rng, e, d, f)


def test_capacity_top1_hand():
  # 4 tokens, 2 experts, top-1, capacity 1: tokens 0,1,2 -> expert 0, token 3 -> expert 1.
  x, experts = _capacity_problem(5, 4, 2)
  assert backends.expert_capacity(4, 1, 2, 0.5) == 1
  ids = np.array([[0], [0], [0], [1]], np.int32)
  weights = np.array([[0.9], [0.8], [0.7], [0.6]], np.float32)
  valid = np.ones((4,), bool)
  backend = capacity_backend(0.5)
  y, dropped = backend(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights),
                       jnp.asarray(valid), to_jnp(experts))
  y = np.asarray(y)
  assert int(dropped) == 2
  np.testing.assert_allclose(y[0], 0.9 * np_swiglu(x[0], *(experts[w][0] for w in
                                                            ('w_gate', 'w_up', 'w_down'))),
                             atol=ATOL)
  np.testing.assert_array_equal(y[1], 0.0)
  np.testing.assert_array_equal(y[2], 0.0)
  np.testing.assert_allclose(y[3], 0.6 * np_swiglu(x[3], *(experts[w][1] for w in
                                                            ('w_gate', 'w_up', 'w_down'))),
                             atol=ATOL)
  # The dispatch tensor: token 0 in slot 0 of expert 0, token 3 in slot 0 of expert 1.
  dispatch, kept = capacity_dispatch(jnp.asarray(ids), jnp.asarray(valid), 2, 1)
  expected = np.zeros((1, 4, 2, 1), np.int32)
  expected[0, 0, 0, 0] = 1
  expected[0, 3, 1, 0] = 1
  np.testing.assert_array_equal(np.asarray(dispatch), expected)
  np.testing.assert_array_equal(np.asarray(kept), [[1, 0, 0, 1]])


def test_capacity_padding_takes_no_capacity():
  # Same routing, but token 0 is padding: it takes no slot and is not counted as dropped,
  # so token 1 gets expert 0's only slot and only token 2 is dropped.
  x, experts = _capacity_problem(6, 4, 2)
  ids = np.array([[0], [0], [0], [1]], np.int32)
  weights = np.array([[0.0], [0.8], [0.7], [0.6]], np.float32)  # router gives padding weight 0
  valid = np.array([False, True, True, True])
  backend = capacity_backend(0.5)
  y, dropped = backend(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights),
                       jnp.asarray(valid), to_jnp(experts))
  y = np.asarray(y)
  assert int(dropped) == 1
  _, kept = capacity_dispatch(jnp.asarray(ids), jnp.asarray(valid), 2, 1)
  np.testing.assert_array_equal(np.asarray(kept), [[0, 1, 0, 1]])
  ew = lambda e: [experts[w][e] for w in ('w_gate', 'w_up', 'w_down')]  # noqa: E731
  np.testing.assert_array_equal(y[0], 0.0)
  np.testing.assert_allclose(y[1], 0.8 * np_swiglu(x[1], *ew(0)), atol=ATOL)
  np.testing.assert_array_equal(y[2], 0.0)
  np.testing.assert_allclose(y[3], 0.6 * np_swiglu(x[3], *ew(1)), atol=ATOL)
  # All tokens padding: nothing routed, nothing dropped.
  _, dropped = backend(jnp.asarray(x), jnp.asarray(ids), jnp.zeros_like(weights),
                       jnp.zeros((4,), bool), to_jnp(experts))
  assert int(dropped) == 0


def test_capacity_top2_slot_major_priority():
  # 4 tokens, 3 experts, top-2, capacity 2 (ceil(0.75 * 4 * 2 / 3) = 2).
  #   token: (first, second) = 0:(0,1) 1:(0,2) 2:(0,1) 3:(1,0)
  # Slot-major (all first choices, in token order, then all second choices):
  #   first:  t0->e0 pos0 keep, t1->e0 pos1 keep, t2->e0 pos2 DROP, t3->e1 pos0 keep
  #   second: t0->e1 pos1 keep, t1->e2 pos0 keep, t2->e1 pos2 DROP, t3->e0 pos2 DROP
  # (Token-major order would instead keep t2's second choice and drop t3's first.)
  x, experts = _capacity_problem(7, 4, 3)
  assert backends.expert_capacity(4, 2, 3, 0.75) == 2
  ids = np.array([[0, 1], [0, 2], [0, 1], [1, 0]], np.int32)
  weights = np.array([[0.5, 0.3], [0.6, 0.2], [0.4, 0.35], [0.7, 0.1]], np.float32)
  valid = np.ones((4,), bool)
  kept_expected = np.array([[1, 1, 0, 1], [1, 1, 0, 0]])  # [slot, token]
  dispatch, kept = capacity_dispatch(jnp.asarray(ids), jnp.asarray(valid), 3, 2)
  np.testing.assert_array_equal(np.asarray(kept), kept_expected)
  dispatch = np.asarray(dispatch)
  positions = {(s, t): tuple(np.argwhere(dispatch[s, t])[0])
               for s in range(2) for t in range(4) if kept_expected[s, t]}
  assert positions == {(0, 0): (0, 0), (0, 1): (0, 1), (0, 3): (1, 0),
                       (1, 0): (1, 1), (1, 1): (2, 0)}
  backend = capacity_backend(0.75)
  y, dropped = backend(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(weights),
                       jnp.asarray(valid), to_jnp(experts))
  assert int(dropped) == 3
  # Oracle: numpy MoE with the dropped assignments' weights zeroed.
  expected = np_moe(x, ids, weights * kept_expected.T, experts)
  np.testing.assert_allclose(np.asarray(y), expected, atol=ATOL)
  np.testing.assert_array_equal(np.asarray(y)[2], 0.0)


def test_get_backend_rejects_unknown():
  with pytest.raises(ValueError, match='backend'):
    backends.get_backend('nope')
  with pytest.raises(ValueError, match='ragged_impl'):
    backends.ragged_backend(jnp.zeros((2, 4)), jnp.zeros((2, 1), jnp.int32),
                            jnp.ones((2, 1)), jnp.ones((2,), bool),
                            to_jnp(random_experts(np.random.default_rng(0), 2, 4, 4)), impl='bad')


# ----------------------------------------------------------------------------------------------
# MoeFFN layer
# ----------------------------------------------------------------------------------------------

LAYER_BACKENDS = {
    'loop': dict(backend='loop'),
    'dense': dict(backend='dense'),
    'ragged_blocks': dict(backend='ragged', ragged_impl='blocks', ragged_block_size=4),
    'ragged_dot': dict(backend='ragged', ragged_impl='ragged_dot', ragged_block_size=4),
    'ragged_batched': dict(backend='ragged', ragged_impl='batched', ragged_block_size=4),
    'capacity': dict(backend='capacity', capacity_factor=8.0),
}


def _layer_inputs(seed=8, b=2, t=6, d=8):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  mask = np.ones((b, t), bool)
  mask[1, -2:] = False
  return x, jnp.asarray(mask)


def test_upcycle_mlp_shapes():
  k = jnp.arange(2 * 3 * 5, dtype=jnp.float32).reshape(2, 3, 5)  # scanned [L, D, F]
  out = upcycle_mlp({'gate': {'kernel': k}, 'up': {'kernel': k + 1},
                     'down': {'kernel': jnp.swapaxes(k, 1, 2)}}, 4)
  assert out['w_gate'].shape == (2, 4, 3, 5)
  assert out['w_down'].shape == (2, 4, 5, 3)
  for e in range(4):
    np.testing.assert_array_equal(np.asarray(out['w_gate'][:, e]), np.asarray(k))
    np.testing.assert_array_equal(np.asarray(out['w_up'][:, e]), np.asarray(k + 1))


def _key(seed):
  # rbg keys: each threefry random-bits kernel takes ~2 s to compile on this 2-core machine.
  return jax.random.key(seed, impl='rbg')


def _param_shapes(module, *args):
  """module.init's parameter shapes, without compiling or running anything."""
  tree = meta.unbox(jax.eval_shape(module.init, _key(0), *args))['params']
  return {name: leaf.shape for name, leaf in tree.items()}


def _random_params(module, seed, *args):
  """Params shaped like module.init's, filled with numpy normals / sqrt(fan-in)."""
  rng = np.random.default_rng(seed)
  return {name: jnp.asarray(rng.standard_normal(shape) / np.sqrt(shape[-2]), jnp.float32)
          for name, shape in _param_shapes(module, *args).items()}


UPCYCLE_E, UPCYCLE_K, UPCYCLE_F = 4, 2, 16


@functools.lru_cache(maxsize=None)
def _upcycle_setup():
  """A random dense MLP, its output, and MoeFFN params: random router, upcycled experts."""
  x, mask = _layer_inputs()
  b = x.shape[0]
  task = gran = jnp.zeros((b,), jnp.int32)
  mlp = mlp_lib.MLP(UPCYCLE_F)
  mlp_params = meta.unbox(jax.jit(mlp.init)(_key(0), x))['params']
  dense = np.asarray(jax.jit(mlp.apply)({'params': mlp_params}, x), np.float64)
  layer = MoeFFN(UPCYCLE_E, UPCYCLE_K, UPCYCLE_F, adaptive=False)
  params = _random_params(layer, 11, x, mask, task, gran)
  upcycled = upcycle_mlp(mlp_params, UPCYCLE_E)
  # The upcycled experts have exactly the MoE layer's parameter shapes.
  assert {n: w.shape for n, w in upcycled.items()} == {
      n: w.shape for n, w in params.items() if n != 'router'}
  params.update(upcycled)
  return x, mask, task, gran, dense, params


@pytest.mark.parametrize('variant', list(LAYER_BACKENDS))
def test_upcycled_layer_equals_dense_mlp(variant):
  e, top_k, f = UPCYCLE_E, UPCYCLE_K, UPCYCLE_F
  x, mask, task, gran, dense, params = _upcycle_setup()
  b, t, _ = x.shape
  m = np.asarray(mask)
  assert set(params) == {'router', 'w_gate', 'w_up', 'w_down'}

  for renormalize in (True, False):
    layer = MoeFFN(e, top_k, f, renormalize=renormalize, adaptive=False,
                   **LAYER_BACKENDS[variant])
    y, aux = jax.jit(layer.apply)({'params': params}, x, mask, task, gran)
    y = np.asarray(y, np.float64)
    if renormalize:
      expected = dense
    else:
      # Raw softmax weights: every expert is the same FFN, so y = FFN(x) * sum of top-k probs.
      probs = np_softmax(np.asarray(x, np.float64) @ np.asarray(params['router'], np.float64))
      _, w = np_topk(probs.reshape(b * t, e), top_k)
      expected = dense * w.sum(-1).reshape(b, t, 1)
      assert np.all(w.sum(-1) < 1.0)
    np.testing.assert_allclose(y[m], expected[m], atol=ATOL, rtol=RTOL)
    np.testing.assert_array_equal(y[~m], 0.0)
    assert int(aux['num_routed']) == m.sum() * top_k
    assert int(aux['num_dropped']) == 0


def test_widened_single_expert_equals_dense_mlp_and_its_new_units_learn():
  # One expert of twice the FFN's width: the dense baseline with top-2 MoE's active parameters.
  x, mask, task, gran, dense, _ = _upcycle_setup()
  f = UPCYCLE_F
  mlp_params = meta.unbox(jax.jit(mlp_lib.MLP(f).init)(_key(0), x))['params']
  layer = MoeFFN(1, 1, 2 * f, adaptive=False, backend='dense')
  fresh = _random_params(layer, 12, x, mask, task, gran)
  params = dict(fresh, **upcycle_mlp(mlp_params, 1, fresh=fresh))
  np.testing.assert_array_equal(np.asarray(params['w_gate'][0, :, :f]),
                                np.asarray(mlp_params['gate']['kernel']))
  np.testing.assert_array_equal(np.asarray(params['w_up'][0, :, f:]),
                                np.asarray(fresh['w_up'][0, :, f:]))
  np.testing.assert_array_equal(np.asarray(params['w_down'][0, f:]), 0.0)
  m = np.asarray(mask)
  y = np.asarray(jax.jit(layer.apply)({'params': params}, x, mask, task, gran)[0], np.float64)
  np.testing.assert_allclose(y[m], dense[m], atol=ATOL, rtol=RTOL)

  def loss(p):
    return jnp.sum(layer.apply({'params': p}, x, mask, task, gran)[0] ** 2)
  grad = jax.jit(jax.grad(loss))(params)
  assert np.abs(np.asarray(grad['w_down'][0, f:])).min() > 0.0  # the new units start learning
  with pytest.raises(ValueError, match='width 8 cannot hold the FFN of width 16'):
    upcycle_mlp(mlp_params, 1, fresh={k: v[..., :f // 2] if k != 'w_down' else v
                                      for k, v in fresh.items()})


def _adaptive_problem(condition_scale=1.0):
  e, top_k, f, nt, ng, c = 4, 2, 12, 3, 2, 4
  kw = dict(num_experts=e, top_k=top_k, mlp_dim=f, renormalize=True, backend='dense',
            num_tasks=nt, num_granularities=ng)
  ada = MoeFFN(adaptive=True, condition_dim=c, condition_scale=condition_scale, **kw)
  plain = MoeFFN(adaptive=False, **kw)
  return ada, plain, (e, top_k, nt, ng, c)


def test_fresh_adaptive_router_routes_like_plain():
  ada, plain, (e, top_k, nt, ng, _) = _adaptive_problem()
  x, mask = _layer_inputs(seed=9, b=3)
  task = jnp.asarray([0, 2, 1], jnp.int32)
  gran = jnp.asarray([1, 0, 1], jnp.int32)
  pa = meta.unbox(jax.jit(ada.init)(_key(2), x, mask, task, gran))['params']
  np.testing.assert_array_equal(np.asarray(pa['condition_proj']), 0.0)
  assert np.any(np.asarray(pa['task_embed']) != 0.0)
  plain_shapes = _param_shapes(plain, x, mask, task, gran)
  assert set(plain_shapes) == {'router', 'w_gate', 'w_up', 'w_down'}
  assert all(pa[n].shape == shape for n, shape in plain_shapes.items())
  pp = {name: pa[name] for name in plain_shapes}  # same router and expert weights
  ya, auxa = jax.jit(ada.apply)({'params': pa}, x, mask, task, gran)
  yp, auxp = jax.jit(plain.apply)({'params': pp}, x, mask, task, gran)
  np.testing.assert_allclose(np.asarray(ya), np.asarray(yp), atol=1e-6)
  for key in ('load', 'mean_prob', 'entropy', 'counts_by_condition', 'load_balance_loss',
              'z_loss', 'num_routed'):
    np.testing.assert_allclose(np.asarray(auxa[key]), np.asarray(auxp[key]), atol=1e-6,
                               err_msg=key)
  assert auxa['counts_by_condition'].shape == (nt, ng, e)


@pytest.mark.parametrize('scale', [1.0, 2.5])
def test_adaptive_router_condition_bias(scale):
  ada, _, (e, top_k, nt, ng, c) = _adaptive_problem(scale)
  rng = np.random.default_rng(10)
  b, t, d = 3, 5, 8
  x = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
  mask = np.ones((b, t), bool)
  mask[2, 0] = False
  mask = jnp.asarray(mask)
  task = jnp.asarray([0, 2, 1], jnp.int32)
  gran = jnp.asarray([1, 0, 1], jnp.int32)
  params = _random_params(ada, 12, x, mask, task, gran)
  params = dict(params, condition_proj=jnp.asarray(2.0 * rng.standard_normal((c, e)),
                                                   jnp.float32))
  p64 = {k: np.asarray(v, np.float64) for k, v in params.items()}
  bias = scale * (p64['task_embed'][:, None, :] + p64['granularity_embed'][None, :, :]) @ \
      p64['condition_proj']  # [nt, ng, E]

  # Per-token router probabilities: one single-token call per (token, task, gran) via vmap,
  # where aux['mean_prob'] is that token's softmax.
  def token_probs(xt, ti, gi):
    _, aux = ada.apply({'params': params}, xt[None, None], jnp.ones((1, 1), bool), ti[None],
                       gi[None])
    return aux['mean_prob']
  tokens = x.reshape(-1, d)
  grid = [(ti, gi) for ti in range(nt) for gi in range(ng)]
  probs_fn = jax.jit(jax.vmap(token_probs, in_axes=(0, None, None)))
  base_logits = np.asarray(tokens, np.float64) @ p64['router']
  log_p = {}
  for ti, gi in grid:
    pr = np.asarray(probs_fn(tokens, jnp.int32(ti), jnp.int32(gi)), np.float64)
    np.testing.assert_allclose(pr, np_softmax(base_logits + bias[ti, gi]), atol=1e-6)
    log_p[ti, gi] = np.log(pr)
  # Logit difference between two conditions = difference of their bias (up to the softmax's
  # per-token constant, removed by centring over experts).
  centre = lambda a: a - a.mean(-1, keepdims=True)  # noqa: E731
  for ti, gi in grid[1:]:
    np.testing.assert_allclose(centre(log_p[ti, gi] - log_p[0, 0]),
                               np.broadcast_to(centre(bias[ti, gi] - bias[0, 0]),
                                               log_p[0, 0].shape), atol=2e-5)
  # Different tasks really route differently for the same tokens.
  ids = {tg: np_topk(np.exp(lp), top_k)[0] for tg, lp in log_p.items()}
  assert any(not np.array_equal(ids[0, 0], ids[tg]) for tg in grid[1:])

  # Full layer against numpy: routing with the condition bias, distinct experts, stats.
  y, aux = jax.jit(ada.apply)({'params': params}, x, mask, task, gran)
  logits = (np.asarray(x, np.float64) @ p64['router']
            + bias[np.asarray(task), np.asarray(gran)][:, None, :])
  probs = np_softmax(logits).reshape(b * t, e)
  ids, w = np_topk(probs, top_k)
  m = np.asarray(mask).reshape(-1)
  w = w / w.sum(-1, keepdims=True) * m[:, None]
  expected = np_moe(np.asarray(x).reshape(b * t, d), ids, w,
                    {k: p64[k] for k in ('w_gate', 'w_up', 'w_down')})
  np.testing.assert_allclose(np.asarray(y).reshape(b * t, d), expected, atol=ATOL)
  counts = np.zeros((nt, ng, e))
  cond = np.repeat(np.stack([np.asarray(task), np.asarray(gran)], -1), t, axis=0)
  for i in np.flatnonzero(m):
    for x_id in ids[i]:
      counts[cond[i, 0], cond[i, 1], x_id] += 1
  np.testing.assert_array_equal(np.asarray(aux['counts_by_condition']), counts)
  assert int(aux['num_routed']) == m.sum() * top_k
  f_load = counts.sum((0, 1)) / counts.sum()
  np.testing.assert_allclose(np.asarray(aux['load']), f_load, atol=1e-6)
  np.testing.assert_allclose(float(aux['load_balance_loss']),
                             e * np.sum(f_load * probs[m].mean(0)), atol=1e-5)
  lse = np_logsumexp(logits.reshape(b * t, e))
  np.testing.assert_allclose(float(aux['z_loss']), np.mean(lse[m] ** 2), rtol=1e-5)


def test_megablox_weight_grad_matches_per_group_products():
  """The TPU weight gradient of the ragged_dot path (megablox tgmm, run here in Pallas'
  interpret mode): per group x_g^T d_g, with uneven and empty groups and rows in no group."""
  rng = np.random.default_rng(3)
  m, k, n = 200, 64, 96
  x = rng.standard_normal((m, k)).astype(np.float32)
  d = rng.standard_normal((m, n)).astype(np.float32)
  sizes = np.array([50, 0, 120, 13], np.int32)  # 183 of 200 rows; the last 17 in no group
  got = grouped_matmul.megablox_weight_grad(jnp.asarray(x), jnp.asarray(d), jnp.asarray(sizes),
                                       jnp.float32, interpret=True)
  ends = np.cumsum(sizes)
  want = np.stack([x[e - s:e].T @ d[e - s:e] for s, e in zip(sizes, ends)])
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-4, rtol=1e-5)
