"""The optimizer: AdamW with warm-up + cosine schedule, clipping, accumulation and a trainable mask.

Layout of the transformation (outermost first):

  partition({'trainable': MultiSteps(chain(clip_by_global_norm, adamw(schedule))),
             'frozen': set_to_zero()}, labels)

- Frozen parameters go through `set_to_zero`, whose state is empty, and inside the trainable
  branch they are masked out (optax.MaskedNode). So a frozen parameter holds no optimizer state
  at all: stage I of the 7B model keeps Adam moments for the LoRA adapters and the projector
  only, not for 7B frozen weights. Its update is exactly zero, so it never changes.
- Gradient accumulation uses optax.MultiSteps: every call of the train step is one micro-batch;
  the running mean of the gradients lives in the optimizer state (trainable leaves only) and
  AdamW steps on the k-th call, returning zero updates before it. The train step itself stays
  one forward/backward, and clipping and the schedule see the accumulated (full-batch) gradient
  and count optimizer steps, not micro-batches.
- The schedule follows the HF/optax convention: linear warm-up from 0 (the first update has
  learning rate 0), then cosine decay to min_lr_ratio * learning_rate at total_steps.

Parameters are selected by regexes over '/'-joined paths ('decoder/blocks/layer_0/attn/
query_lora/a'), matched in full. config.STAGE_I_TRAINABLE / STAGE_II_TRAINABLE are the paper's
recipe for the model's real parameter names; config.optimizer_defaults() lists the settings.
"""
import math
import re
from typing import Callable, Optional, Sequence, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from skymoe_jax.model.layout import param_path

TRAINABLE, FROZEN = 'trainable', 'frozen'


def learning_rate_schedule(opt_cfg, total_steps: int) -> optax.Schedule:
  """Optimizer step -> learning rate. total_steps counts optimizer steps (after accumulation)."""
  peak = float(opt_cfg.learning_rate)
  end = peak * float(opt_cfg.min_lr_ratio)
  warmup = int(round(float(opt_cfg.warmup_fraction) * total_steps))
  decay = max(total_steps - warmup, 1)

  def schedule(count):
    count = jnp.asarray(count, jnp.float32)
    ramp = peak * count / max(warmup, 1)
    progress = jnp.clip((count - warmup) / decay, 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(math.pi * progress))
    return jnp.where(count < warmup, ramp, cosine)

  return schedule


def _is_boxed(x):
  return isinstance(x, nn.meta.AxisMetadata)


def trainable_mask(params, patterns: Sequence[str], strict: bool = True):
  """Pytree of bool like params: True where the parameter's path fully matches a pattern.

  No patterns means everything is trainable. With strict, a pattern that matches no
  parameter is an error (a typo would otherwise silently freeze the whole model).
  params may be arrays, ShapeDtypeStructs or boxed (nn.Partitioned) leaves.
  """
  if not patterns:
    return jax.tree.map(lambda _: True, params, is_leaf=_is_boxed)
  compiled = [re.compile(p) for p in patterns]
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_boxed)
  paths = [param_path(path) for path, _ in leaves]
  if strict:
    for pattern in compiled:
      if not any(pattern.fullmatch(p) for p in paths):
        raise ValueError(f'config.optimizer.trainable pattern {pattern.pattern!r} matches no '
                         f'parameter; paths look like {paths[:3]}')
  return treedef.unflatten([any(c.fullmatch(p) for c in compiled) for p in paths])


def _labels(mask):
  return jax.tree.map(lambda m: TRAINABLE if m else FROZEN, mask)


def make_optimizer(opt_cfg, total_steps: int,
                   trainable_mask: Optional[Union[object, Callable]] = None
                   ) -> optax.GradientTransformation:
  """The full transformation for total_steps optimizer steps.

  trainable_mask: a pytree of bool like the params (see trainable_mask()), or a function
  params -> such a pytree; None uses opt_cfg.trainable. With every parameter trainable there is
  no partition at all.
  """
  tx = optax.adamw(learning_rate_schedule(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2,
                   eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay)
  if opt_cfg.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip_norm), tx)
  if opt_cfg.grad_accum_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=int(opt_cfg.grad_accum_steps))

  mask = trainable_mask
  if mask is None:
    if not opt_cfg.trainable:
      return tx
    patterns = tuple(opt_cfg.trainable)
    # Lenient here: optax.tree_map_params calls the labels with a placeholder, not params.
    mask = lambda params: _mask_fn(params, patterns)  # noqa: E731
  labels = (lambda params: _labels(mask(params))) if callable(mask) else _labels(mask)
  return optax.partition({TRAINABLE: tx, FROZEN: optax.set_to_zero()}, labels)


def _mask_fn(params, patterns):
  return trainable_mask(params, patterns, strict=False)


def opt_state_shardings(tx, opt_state, param_shardings, other):
  """Shardings for an (abstract) opt_state: param-shaped parts follow their parameters.

  Like optax.tree_map_params, but keeps the empty MaskedNode of a frozen parameter empty (plain
  tree_map_params fails on them); every non-parameter leaf (counts) gets `other`.
  """
  masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
  return optax.tree_map_params(
      tx, lambda p, s: p if masked(p) else s, opt_state, param_shardings,
      transform_non_params=lambda _: other, is_leaf=masked)


def count_state(opt_state) -> tuple:
  """(number of array leaves, total elements) of an optimizer state."""
  leaves = jax.tree.leaves(opt_state)
  return len(leaves), sum(math.prod(x.shape) for x in leaves)


def for_run(config):
  """The optimizer of a training run: config.optimizer over the run's update steps."""
  o = config.optimizer
  return make_optimizer(o, max(config.train.total_steps // o.grad_accum_steps, 1))
