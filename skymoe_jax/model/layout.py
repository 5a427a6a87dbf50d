"""Which decoder layers are MoE, and the parameter layout: scanned blocks <-> one tree per layer.

Layers are grouped in blocks of `block_period` consecutive layers (2 for "every other layer is
MoE"). With model.scan_layers the block is scanned: decoder layer i lives at
decoder/blocks/layer_{i % p}/... with a leading block axis, index i // p; vision block i at
vision/layers/... index i. Unrolled, they are decoder/layer_{i}/... and vision/layer_{i}/... .
The decoder, upcycling, HF conversion, the torch model, evaluation, FLOP counting and the AOT
report all read the MoE layers and this layout from here.

Plain Python over nested dicts: the stacking works on numpy arrays (conversion, on the host) and
on traced jax arrays (upcycling, under jit) alike; pass the matching `stack` function.
"""
from typing import Callable, Dict, Sequence, Tuple

import numpy as np

from skymoe_jax.config import num_feature_layers


def moe_layers(model_cfg) -> Tuple[int, ...]:
  """The decoder layers that carry an MoE FFN, sorted; () for a dense model (num_experts=0)."""
  return tuple(sorted(model_cfg.moe.layers)) if model_cfg.moe.num_experts > 0 else ()


def block_period(num_layers: int, moe: Sequence[int]) -> int:
  """Smallest p dividing num_layers such that layer i is MoE iff layer i % p is."""
  moe = set(moe)
  for p in range(1, num_layers + 1):
    if num_layers % p == 0 and all((i in moe) == (i % p in moe) for i in range(num_layers)):
      return p
  return num_layers


def decoder_period(model_cfg) -> int:
  """The decoder's scanned block length for this model config."""
  return block_period(model_cfg.llm.num_layers, moe_layers(model_cfg))


def _map(fn, *trees):
  """fn over the leaves of identically structured nested dicts."""
  if isinstance(trees[0], dict):
    return {k: _map(fn, *(t[k] for t in trees)) for k in trees[0]}
  return fn(*trees)


def param_path(path) -> str:
  """'/'-joined names of a jax key path: ('decoder', 'embed') -> 'decoder/embed'."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):  # DictKey, GetAttrKey, SequenceKey
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def decoder_layers(decoder: Dict, model_cfg) -> Dict[int, Dict]:
  """{layer index: that layer's params} from a scanned or unrolled decoder tree."""
  n = model_cfg.llm.num_layers
  if 'blocks' not in decoder:
    return {i: decoder[f'layer_{i}'] for i in range(n)}
  p = decoder_period(model_cfg)
  return {i: _map(lambda x, i=i: x[i // p], decoder['blocks'][f'layer_{i % p}'])
          for i in range(n)}


def _others(tree: Dict) -> Dict:
  return {k: v for k, v in tree.items() if not k.startswith('layer_')}


def stack_decoder(tree: Dict, model_cfg, stack: Callable = np.stack) -> Dict:
  """An unrolled decoder tree (layer_{i} and the rest) -> the layout model_cfg's decoder uses;
  the inverse of decoder_layers."""
  if not model_cfg.scan_layers:
    return tree
  n, p = model_cfg.llm.num_layers, decoder_period(model_cfg)
  blocks = {f'layer_{j}': _map(lambda *xs: stack(xs), *[tree[f'layer_{i}'] for i in range(j, n, p)])
            for j in range(p)}
  return dict(_others(tree), blocks=blocks)


def stack_vision(tree: Dict, model_cfg, stack: Callable = np.stack) -> Dict:
  """An unrolled vision tree (layer_{i} and the rest) -> the layout model_cfg's tower uses."""
  if not model_cfg.scan_layers:
    return tree
  n = num_feature_layers(model_cfg.vision.depth, model_cfg.vision.feature_layer)
  return dict(_others(tree),
              layers=_map(lambda *xs: stack(xs), *[tree[f'layer_{i}'] for i in range(n)]))


def locate(model_cfg, path: Tuple[str, ...]) -> Tuple[Tuple[str, ...], Tuple[int, ...]]:
  """An unrolled path from the params root -> (path of the stored leaf, index into it)."""
  if model_cfg.scan_layers and len(path) > 1 and path[1].startswith('layer_'):
    i = int(path[1][len('layer_'):])
    if path[0] == 'vision':
      return ('vision', 'layers') + path[2:], (i,)
    if path[0] == 'decoder':
      p = decoder_period(model_cfg)
      return ('decoder', 'blocks', f'layer_{i % p}') + path[2:], (i // p,)
  return path, ()
