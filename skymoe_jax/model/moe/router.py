"""Top-k routing as small pure functions of fp32 router logits.

Shapes: N tokens, E experts, k chosen per token. `valid` [N] marks real (non-padding) tokens;
padding tokens are excluded from every loss and statistic.
"""
from typing import NamedTuple

import jax
import jax.numpy as jnp


class Routing(NamedTuple):
  ids: jax.Array      # [N, k] int32, chosen experts, best first
  weights: jax.Array  # [N, k] fp32, combine weights (0 for padding tokens)
  probs: jax.Array    # [N, E] fp32, softmax over all experts


def route(logits, top_k: int, renormalize: bool, valid) -> Routing:
  """Softmax over all experts, keep the top k.

  renormalize=False is the SkyMoE paper's weighting: the raw softmax probabilities of the k
  experts. renormalize=True divides them by their sum (Mixtral / DeepSpeed style).
  """
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
  weights, ids = jax.lax.top_k(probs, top_k)
  if renormalize:
    weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
  weights = weights * valid[:, None].astype(weights.dtype)
  return Routing(ids.astype(jnp.int32), weights, probs)


def _masked_mean(x, valid):
  """Mean over axis 0 of x [N, ...] counting only valid rows."""
  w = valid.astype(jnp.float32)
  w = w.reshape(w.shape + (1,) * (x.ndim - 1))
  return jnp.sum(x * w, axis=0) / jnp.maximum(jnp.sum(w), 1.0)


def expert_load(ids, num_experts: int, valid):
  """Fraction of the routed (token, slot) pairs sent to each expert: [E], sums to 1."""
  counts = jnp.sum(jax.nn.one_hot(ids, num_experts, dtype=jnp.float32), axis=1)  # [N, E]
  return _masked_mean(counts, valid) / ids.shape[1]


def load_balance_loss(routing: Routing, valid):
  """Switch-Transformer auxiliary loss E * sum_e f_e * P_e (1.0 when perfectly balanced)."""
  num_experts = routing.probs.shape[-1]
  f = expert_load(routing.ids, num_experts, valid)
  p = _masked_mean(routing.probs, valid)
  return num_experts * jnp.sum(f * p)


def z_loss(logits, valid):
  """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2."""
  lse = jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)
  return _masked_mean(lse ** 2, valid)


def router_stats(routing: Routing, valid, condition_ids, num_conditions: int):
  """Per-expert statistics for logging and the routing analytics.

  condition_ids: [N] int, each token's (task, granularity) cell flattened; returns
  `counts_by_condition` [num_conditions, E], the number of routed (token, slot) pairs.
  """
  num_experts = routing.probs.shape[-1]
  p = routing.probs
  entropy = -jnp.sum(p * jnp.log(jnp.maximum(p, 1e-20)), axis=-1)
  per_token = jnp.sum(jax.nn.one_hot(routing.ids, num_experts, dtype=jnp.float32), axis=1)
  per_token = per_token * valid[:, None].astype(jnp.float32)
  counts = jax.ops.segment_sum(per_token, condition_ids, num_segments=num_conditions)
  return {
      'load': expert_load(routing.ids, num_experts, valid),
      'mean_prob': _masked_mean(p, valid),
      'entropy': _masked_mean(entropy, valid),
      'counts_by_condition': counts,
  }
