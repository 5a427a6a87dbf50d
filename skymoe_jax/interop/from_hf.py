"""Hugging Face PyTorch checkpoints -> our Flax parameter trees (pure numpy, nothing on device).

Input: a state dict as name -> numpy array (`{k: v.numpy() for k, v in m.state_dict().items()}`).
Output: plain nested dicts of numpy arrays, laid out exactly as `nn.unbox(model.init(...))`:
- `clip_vision_params`: HF CLIPVisionModel -> params['vision'] (VisionTower);
- `llama_params`: HF LlamaForCausalLM -> params['decoder'] of a dense decoder (stage I).
A missing tensor or one of the wrong shape raises an error naming the tensor.
"""
import jax.numpy as jnp
import numpy as np

from skymoe_jax.model.decoder import block_period
from skymoe_jax.model.vit import num_feature_layers, resize_position_embedding


class ConversionError(ValueError):
  """A tensor the converter needs is missing from the state dict or has the wrong shape."""


class _Reader:
  """Fetches tensors by name (under a prefix), checks their shapes and casts to the param dtype."""

  def __init__(self, state_dict, prefix: str, dtype):
    self.sd, self.prefix, self.dtype = state_dict, prefix, np.dtype(jnp.dtype(dtype))

  def __call__(self, name: str, shape, prefixed: bool = True):
    """The tensor `name`, checked against `shape` (None matches any size)."""
    key = self.prefix + name if prefixed else name
    if key not in self.sd:
      raise ConversionError(f'tensor {key!r} is missing from the state dict')
    value = np.asarray(self.sd[key])
    if len(value.shape) != len(shape) or any(
        want is not None and got != want for got, want in zip(value.shape, shape)):
      raise ConversionError(f'tensor {key!r} has shape {value.shape}, expected {tuple(shape)}')
    return value.astype(self.dtype)

  def linear(self, name: str, in_shape, out_shape, bias: bool = False):
    """torch Linear `name` (weight [out, in]) -> {'kernel': [*in_shape, *out_shape](, 'bias')}."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    w = self(name + '.weight', (n_out, n_in))
    out = {'kernel': w.T.reshape(tuple(in_shape) + tuple(out_shape))}
    if bias:
      out['bias'] = self(name + '.bias', (n_out,)).reshape(tuple(out_shape))
    return out

  def layer_norm(self, name: str, dim: int, bias: bool = True):
    out = {'scale': self(name + '.weight', (dim,))}
    if bias:
      out['bias'] = self(name + '.bias', (dim,))
    return out


def _stack(trees):
  """List of identically shaped trees -> one tree with a leading stacked axis on every leaf."""
  if isinstance(trees[0], dict):
    return {k: _stack([t[k] for t in trees]) for k in trees[0]}
  return np.stack(trees)


def clip_vision_params(state_dict, model_cfg, prefix: str = 'vision_model.'):
  """HF CLIPVisionModel state dict -> the tree of params['vision'] (VisionTower).

  Only the blocks up to `feature_layer` are converted (ours are never built past it); the
  post-layernorm is unused. Position embeddings on another grid are resized bicubically.
  `prefix`: 'vision_model.' for CLIPModel state dicts and saved CLIP checkpoints; '' for the
  state dict of a transformers-5 CLIPVisionModel instance, whose keys carry no prefix.
  """
  v = model_cfg.vision
  w, p, heads = v.width, v.patch_size, v.num_heads
  dh = w // heads
  get = _Reader(state_dict, prefix, model_cfg.param_dtype)

  conv = get('embeddings.patch_embedding.weight', (w, 3, p, p))
  pos = get('embeddings.position_embedding.weight', (None, w))  # [1 + grid^2, W], any grid
  tree = {
      'patch_embed': {'kernel': conv.transpose(2, 3, 1, 0)},  # [W, 3, p, p] -> [p, p, 3, W]
      'cls_token': get('embeddings.class_embedding', (w,)),
      'pos_embed': np.asarray(resize_position_embedding(pos, v.image_size // p)).astype(get.dtype),
      'pre_norm': get.layer_norm('pre_layrnorm', w),
  }

  def layer(i):
    pre = f'encoder.layers.{i}.'
    attn = lambda n: get.linear(pre + f'self_attn.{n}_proj', (w,), (heads, dh), bias=True)
    return {
        'norm1': get.layer_norm(pre + 'layer_norm1', w),
        'query': attn('q'), 'key': attn('k'), 'value': attn('v'),
        'out': get.linear(pre + 'self_attn.out_proj', (heads, dh), (w,), bias=True),
        'norm2': get.layer_norm(pre + 'layer_norm2', w),
        'mlp': {'fc1': get.linear(pre + 'mlp.fc1', (w,), (v.mlp_dim,), bias=True),
                'fc2': get.linear(pre + 'mlp.fc2', (v.mlp_dim,), (w,), bias=True)},
    }

  blocks = [layer(i) for i in range(num_feature_layers(v.depth, v.feature_layer))]
  if model_cfg.scan_layers:
    tree['layers'] = _stack(blocks)
  else:
    tree.update({f'layer_{i}': b for i, b in enumerate(blocks)})
  return tree


def llama_params(state_dict, model_cfg, prefix: str = 'model.',
                 lm_head_key: str = 'lm_head.weight'):
  """HF LlamaForCausalLM state dict -> the tree of params['decoder'] for a dense decoder.

  `lm_head_key` is the full name of the output projection (ignored when embeddings are tied).
  Scanned layout: blocks/layer_{j}/... stacked over the blocks; unrolled: layer_{i}/... .
  """
  if model_cfg.moe.num_experts > 0 or model_cfg.lora.rank > 0:
    raise ValueError('llama_params converts a dense decoder: set config.model.moe.num_experts=0 '
                     'and config.model.lora.rank=0 (upcycle / add LoRA after converting)')
  llm = model_cfg.llm
  d, h, hkv, dh, f = llm.embed_dim, llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.mlp_dim
  get = _Reader(state_dict, prefix, model_cfg.param_dtype)

  tree = {'embed': get('embed_tokens.weight', (llm.vocab_size, d)),
          'final_norm': get.layer_norm('norm', d, bias=False)}
  if not llm.tie_embeddings:
    tree['lm_head'] = get(lm_head_key, (llm.vocab_size, d), prefixed=False).T

  def layer(i):
    pre = f'layers.{i}.'
    return {
        'attn_norm': get.layer_norm(pre + 'input_layernorm', d, bias=False),
        'attn': {'query': get.linear(pre + 'self_attn.q_proj', (d,), (h, dh)),
                 'key': get.linear(pre + 'self_attn.k_proj', (d,), (hkv, dh)),
                 'value': get.linear(pre + 'self_attn.v_proj', (d,), (hkv, dh)),
                 'out': get.linear(pre + 'self_attn.o_proj', (h, dh), (d,))},
        'ffn_norm': get.layer_norm(pre + 'post_attention_layernorm', d, bias=False),
        'mlp': {'gate': get.linear(pre + 'mlp.gate_proj', (d,), (f,)),
                'up': get.linear(pre + 'mlp.up_proj', (d,), (f,)),
                'down': get.linear(pre + 'mlp.down_proj', (f,), (d,))},
    }

  n = llm.num_layers
  if model_cfg.scan_layers:
    period = block_period(n, ())  # 1: with no MoE layers every block is a single layer
    tree['blocks'] = {f'layer_{j}': _stack([layer(i) for i in range(j, n, period)])
                      for j in range(period)}
  else:
    tree.update({f'layer_{i}': layer(i) for i in range(n)})
  return tree
