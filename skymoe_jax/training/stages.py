"""From stage I to stage II (docs/design.md section 3): merge LoRA, then sparse upcycling.

Stage I trains a dense model (LoRA on W_q/W_v + projector). Stage II's model replaces the FFN of
the chosen layers by an MoE whose experts all start as copies of that layer's stage-I FFN; the
routers start from their fresh initialisation (the task/granularity bias starts at zero); experts
wider than the FFN (model.moe.mlp_dim) keep fresh extra units that start switched off. With
renormalised top-k weights the upcycled model computes exactly what the stage-I model did, since
every expert is the same function and the weights sum to one. Parameters stage I does not
have outside the decoder (the condition head of model.moe.condition='predicted') start fresh
too: its condition is a soft mix that a zero condition projection ignores at first.
"""
from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from skymoe_jax.model import layout, lora
from skymoe_jax.model.moe.layer import upcycle_mlp


# Top-level parameters only a stage-II model has; upcycling takes them from its fresh init.
STAGE_II_ONLY = ('condition_head',)


class UpcycleError(ValueError):
  """Stage-I parameters do not fit the stage-II model; the message names the parameter."""


def _check_same(path: str, source, target):
  """Raises UpcycleError unless `source` has exactly target's tree structure and shapes."""
  src = dict(jax.tree_util.tree_flatten_with_path(source)[0])
  dst = dict(jax.tree_util.tree_flatten_with_path(target)[0])
  for key in sorted(set(src) | set(dst), key=str):
    name = path + jax.tree_util.keystr(key)
    if key not in src:
      raise UpcycleError(f'{name}: in the stage-II model, missing from the stage-I params')
    if key not in dst:
      raise UpcycleError(f'{name}: in the stage-I params, not in the stage-II model')
    if src[key].shape != dst[key].shape:
      raise UpcycleError(f'{name}: stage-I shape {src[key].shape} != stage-II '
                         f'{dst[key].shape}')


def upcycle(stage1_params: Dict, stage1_model_cfg, stage2_init: Dict, stage2_model_cfg
            ) -> Dict:
  """Stage-II params: stage-I weights (LoRA merged) everywhere, MoE experts copied from the
  stage-I FFN of their layer, routers taken from `stage2_init` (a fresh stage-II init)."""
  merged = lora.merge_lora(nn.unbox(stage1_params), stage1_model_cfg.lora.alpha)
  init = nn.unbox(stage2_init)
  old = layout.decoder_layers(merged['decoder'], stage1_model_cfg)
  fresh = layout.decoder_layers(init['decoder'], stage2_model_cfg)
  moe_layers = set(layout.moe_layers(stage2_model_cfg))
  layers = {}
  for i, target in fresh.items():
    layer = dict(old[i])
    if 'mlp' not in layer:
      raise UpcycleError(f'decoder layer {i}: stage-I params have no dense mlp to upcycle')
    if i in moe_layers:
      mlp = layer.pop('mlp')
      router = {k: v for k, v in target['moe'].items() if not k.startswith('w_')}
      try:
        experts = upcycle_mlp(mlp, stage2_model_cfg.moe.num_experts, fresh=target['moe'])
      except ValueError as e:
        raise UpcycleError(f'decoder/layer_{i}/moe: {e} (model.moe.mlp_dim)') from e
      layer['moe'] = dict(router, **experts)
    _check_same(f'decoder/layer_{i}', layer, target)
    layers[i] = layer
  out = {k: v for k, v in merged.items() if k != 'decoder'}
  out.update({k: v for k, v in init.items() if k in STAGE_II_ONLY and k not in merged})
  unrolled = {k: v for k, v in merged['decoder'].items()
              if k != 'blocks' and not k.startswith('layer_')}
  unrolled.update({f'layer_{i}': layer for i, layer in layers.items()})
  out['decoder'] = layout.stack_decoder(unrolled, stage2_model_cfg, stack=jnp.stack)
  _check_same('', out, init)
  return jax.tree.map(lambda x, t: x.astype(t.dtype), out, init)
