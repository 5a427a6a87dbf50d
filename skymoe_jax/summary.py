"""Prints one JSON object describing a config's model, from its real (abstract) parameter tree.

  python -m skymoe_jax.summary --config=configs/skymoe_7b.py [--config.model.moe.num_experts=4]

Nothing is allocated: the tree comes from jax.eval_shape, so even the 22B model takes seconds.
"""
import json

from absl import app
from absl import flags
import flax.linen as nn
import jax
import numpy as np
from ml_collections import config_flags

from skymoe_jax import config_defaults
from skymoe_jax.model import factory

EXPERT_WEIGHTS = ('w_gate', 'w_up', 'w_down')


def _count(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def summarize(config) -> dict:
  params = nn.unbox(factory.abstract_params(config))
  m = config.model
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  expert_params = sum(int(np.prod(x.shape)) for path, x in leaves
                      if getattr(path[-1], 'key', None) in EXPERT_WEIGHTS)
  lora_params = sum(int(np.prod(x.shape)) for path, x in leaves
                    if any(str(getattr(p, 'key', '')).endswith('_lora') for p in path))
  total = _count(params)
  num_experts = m.moe.num_experts
  moe_layers = sorted(m.moe.layers) if num_experts > 0 else []
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
      'vision_tokens': config_defaults.vision_tokens(m),
      'llm_layers': m.llm.num_layers,
      'moe_layers': moe_layers,
      'num_experts': num_experts,
      'top_k': m.moe.top_k if num_experts else 0,
      'param_bytes': int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(params))),
  }


def main(argv):
  del argv
  print(json.dumps(summarize(flags.FLAGS.config)))


if __name__ == '__main__':
  # Defined here, not at import: other entry points import summarize and define --config too.
  config_flags.DEFINE_config_file('config', None, 'Config file.', lock_config=True)
  app.run(main)
