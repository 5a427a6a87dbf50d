"""Counting a config's model: parameters (total, active per token, per part) and the model FLOPs
of a training step, from its real (abstract) parameter tree.

Nothing is allocated: the tree comes from jax.eval_shape, so even the 22B model takes seconds.
`python -m skymoe_jax.summary` prints count_params; the trainer's MFU, the AOT report and the
benchmarks use model_flops.
"""
import flax.linen as nn
import jax
import numpy as np

from skymoe_jax import config as config_lib
from skymoe_jax.model import factory, layout

EXPERT_WEIGHTS = ('w_gate', 'w_up', 'w_down')


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def count_params(config) -> dict:
  params = nn.unbox(factory.abstract_params(config))
  m = config.model
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  expert_params = sum(int(np.prod(x.shape)) for path, x in leaves
                      if getattr(path[-1], 'key', None) in EXPERT_WEIGHTS)
  lora_params = sum(int(np.prod(x.shape)) for path, x in leaves
                    if any(str(getattr(p, 'key', '')).endswith('_lora') for p in path))
  total = _count(params)
  num_experts = m.moe.num_experts
  # A token runs through top_k of the num_experts experts of each MoE layer.
  inactive = expert_params * (num_experts - m.moe.top_k) // num_experts if num_experts else 0
  return {
      'total_params': total,
      'active_params_per_token': total - inactive,
      'vision_params': _count(params['vision']),
      'projector_params': _count(params['projector']),
      'llm_params': _count(params['decoder']),
      'expert_params': expert_params,
      'lora_params': lora_params,
      'vision_tokens': config_lib.vision_tokens(m),
      'llm_layers': m.llm.num_layers,
      'moe_layers': list(layout.moe_layers(m)),
      'num_experts': num_experts,
      'top_k': m.moe.top_k if num_experts else 0,
      'param_bytes': int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))),
  }


def model_flops(config, batch_size: int, seq_len: int) -> dict:
  """FLOPs of one training step (forward + backward) that the model itself needs.

  MaxText-style convention (maxtext_utils.calculate_tflops_training_per_device): a weight
  applied to a token costs 2 FLOPs forward and 4 backward, so 6 x params x tokens, plus the
  attention scores and weighted sums, which have no parameters:
    weights   = 6 B [S N_llm + Nv (N_proj + N_patch) + (Nv + 1) N_vit]
    attention = 12 B [L S^2 H d_head + L_vit (Nv + 1)^2 W_vit]
  B batch, S sequence (image + text tokens), Nv image tokens (+1: the ViT's CLS token).
  N_llm: the decoder's parameters a token uses (count_params' active count: top_k of the experts),
  without the input embedding table (a gather, no matmul). N_proj: projector; N_patch: patch
  embedding; N_vit: the rest of the vision tower without the position table (an add) and the CLS
  token. Norm scales and the router's per-sample task embeddings are counted as if they were
  matmul weights (well under 0.01% of the total for the 7B model).
  Attention is per layer 2 matmuls (QK^T, PV) of 2 S^2 H d_head FLOPs forward, x3 with the
  backward; it is counted IN FULL, not halved for the causal mask, because this model computes
  the whole masked S x S score matrix (MaxText's current convention halves the causal term; the
  halved figure is attention / 2). Rematerialisation's recomputed forward is not model FLOPs.
  """
  m = config.model
  s = count_params(config)
  params = nn.unbox(factory.abstract_params(config))
  vision = params['vision']
  n_patch = _count(vision['patch_embed'])
  n_vit = s['vision_params'] - n_patch - _count(vision['pos_embed']) - _count(vision['cls_token'])
  n_proj = s['projector_params']
  n_embed_table = 0 if m.llm.tie_embeddings else _count(params['decoder']['embed'])
  n_llm = s['active_params_per_token'] - s['vision_params'] - n_proj - n_embed_table
  nv = s['vision_tokens']
  llm, vit = m.llm, m.vision
  vit_layers = config_lib.num_feature_layers(vit.depth, vit.feature_layer)
  weights = 6 * batch_size * (seq_len * n_llm + nv * (n_proj + n_patch) + (nv + 1) * n_vit)
  attention = 12 * batch_size * (llm.num_layers * seq_len ** 2 * llm.num_heads * llm.head_dim
                                 + vit_layers * (nv + 1) ** 2 * vit.width)
  return {'model_flops': weights + attention, 'weight_flops': weights,
          'attention_flops': attention, 'llm_active_params_no_embed': n_llm,
          'vision_params_per_token': n_vit, 'patch_embed_params': n_patch,
          'projector_params': n_proj, 'active_params_per_token': s['active_params_per_token'],
          'total_params': s['total_params']}
