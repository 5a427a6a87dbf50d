"""From stage I to stage II (SPEC section 3): merge LoRA, then sparse upcycling.

Stage I trains a dense model (LoRA on W_q/W_v + projector). Stage II's model replaces the FFN of
the chosen layers by an MoE whose experts all start as copies of that layer's stage-I FFN; the
routers start from their fresh initialisation (the task/granularity bias starts at zero); experts
wider than the FFN (model.moe.mlp_dim) keep fresh extra units that start switched off. With
renormalised top-k weights the upcycled model computes exactly what the stage-I model did, since
every expert is the same function and the weights sum to one.
"""
from typing import Dict

import flax.linen as nn
import jax
import jax.numpy as jnp

from skymoe_jax.model import lora
from skymoe_jax.model.decoder import block_period
from skymoe_jax.moe.layer import upcycle_mlp


class UpcycleError(ValueError):
  """Stage-I parameters do not fit the stage-II model; the message names the parameter."""


def decoder_layers(decoder: Dict, model_cfg) -> Dict[int, Dict]:
  """{layer index: that layer's params} from a scanned or unrolled decoder tree."""
  n = model_cfg.llm.num_layers
  if 'blocks' not in decoder:
    return {i: decoder[f'layer_{i}'] for i in range(n)}
  p = block_period(n, sorted(model_cfg.moe.layers) if model_cfg.moe.num_experts else ())
  return {i: jax.tree.map(lambda x, i=i: x[i // p], decoder['blocks'][f'layer_{i % p}'])
          for i in range(n)}


def stack_decoder_layers(layers: Dict[int, Dict], model_cfg) -> Dict:
  """Inverse of decoder_layers: the layout (scanned or not) model_cfg's decoder uses."""
  n = model_cfg.llm.num_layers
  if not model_cfg.scan_layers:
    return {f'layer_{i}': layers[i] for i in range(n)}
  p = block_period(n, sorted(model_cfg.moe.layers) if model_cfg.moe.num_experts else ())
  return {'blocks': {f'layer_{j}': jax.tree.map(lambda *xs: jnp.stack(xs),
                                                 *[layers[i] for i in range(j, n, p)])
                     for j in range(p)}}


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
  old = decoder_layers(merged['decoder'], stage1_model_cfg)
  fresh = decoder_layers(init['decoder'], stage2_model_cfg)
  moe_layers = set(stage2_model_cfg.moe.layers) if stage2_model_cfg.moe.num_experts else set()
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
  out['decoder'] = {k: v for k, v in merged['decoder'].items()
                    if k != 'blocks' and not k.startswith('layer_')}
  out['decoder'].update(stack_decoder_layers(layers, stage2_model_cfg))
  _check_same('', out, init)
  return jax.tree.map(lambda x, t: x.astype(t.dtype), out, init)
