"""Hugging Face PyTorch checkpoints <-> our Flax parameter trees (pure numpy, nothing on device).

One name table serves both directions. `llava_table(model_cfg)` lists every tensor of the model
as an `Entry`: its Hugging Face name, our parameter path in the *unrolled* layout
(`layer_{i}` per vision block / decoder layer, one expert at a time), our shape, and how the two
layouts differ (`kind`). `to_hf` / `from_hf_array` apply that difference; model/layout.py's
`locate` maps an unrolled path onto the scanned layout (a stacked leaf plus an index), and its
`stack_vision` / `stack_decoder` stack unrolled trees back. The export (to_torch.py) walks the same table.

Names follow the LLaVA checkpoint convention that LlavaForConditionalGeneration loads
(`vision_tower.vision_model.*` = CLIP, `multi_modal_projector.linear_{1,2}`,
`language_model.model.*` + `language_model.lm_head.weight` = LLaMA); MoE layers use Mixtral's
`block_sparse_moe.{gate, experts.{e}.w1/w2/w3}` plus our adaptive router's
`block_sparse_moe.{task_embed, granularity_embed, condition_proj}.weight`, and a model that
predicts its router's condition (model.moe.condition='predicted') has its condition head as
`condition_head.{weight, bias}` (a Linear from the embedding width to num_tasks +
num_granularities logits).

Input: a state dict as name -> numpy array, or `open_checkpoint(path)` for a folder or file
(safetensors, read tensor by tensor through the safetensors library, one file or sharded with an
index; or torch .bin loaded with weights_only=True; GGUF lives in gguf.py). Output: plain nested
dicts of numpy arrays, laid out exactly as `nn.unbox(model.init)`:
- `clip_vision_params`: HF CLIPVisionModel -> params['vision'] (VisionTower);
- `llama_params`: HF LlamaForCausalLM -> params['decoder'] of a dense decoder (stage I);
- `llava_params`: our own export (or any LLaVA checkpoint of the same shapes) -> all params.
A missing tensor or one of the wrong shape raises an error naming the tensor; a damaged file,
a CheckpointFileError naming the file (and the tensor, where the reader can tell): the library
validates a safetensors header on opening, tensors whose byte ranges overlap (two names, one
set of weights) included. A tensor with NaN or infinite values is read but logged by name.

What the tensor shapes cannot show - the RoPE base, the norm epsilon, how the width splits into
heads, tied embeddings, extra layers - comes from the checkpoint's config.json (`llama_fields`,
`clip_fields`; GGUF metadata in gguf.py) and `check_fields` refuses a disagreement with the
config, naming both values and the config field to set: an import adopts nothing silently.
"""
import json
import math
import os
import pathlib
from typing import Dict, Iterator, List, Mapping, NamedTuple, Optional, Tuple

from absl import logging
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import safetensors

from skymoe_jax.config import num_feature_layers
from skymoe_jax.interop import export_format
from skymoe_jax.model import layout
from skymoe_jax.model.skymoe import predicts_condition
from skymoe_jax.model.vit import resize_position_embedding


class ConversionError(ValueError):
  """A tensor the converter needs is missing from the state dict or has the wrong shape."""


class CheckpointFileError(ConversionError):
  """A checkpoint file is truncated or malformed; the message names the file (and tensor)."""


class ConfigMismatchError(ConversionError):
  """The checkpoint's own config (config.json, GGUF metadata) disagrees with ours; the message
  names the checkpoint's value, the config field and its value."""


# ------------------------------------------------------------------------------- name table


class Entry(NamedTuple):
  """One tensor, as Hugging Face names it and as we store it.

  kind: same (identical array), linear (our kernel [*in, *out] <-> torch weight [out, in], with
  `n_in` leading input dims), flat (our [*out] bias <-> a flat vector), conv (patch kernel
  [p, p, 3, W] <-> Conv2d [W, 3, p, p]), ones / zeros (an HF-only constant we do not keep;
  path is None). expert: index into our leading expert axis (shape is then one expert's).
  """
  name: str
  path: Optional[Tuple[str, ...]]
  shape: Tuple[int, ...]
  kind: str = 'same'
  n_in: int = 1
  expert: Optional[int] = None


def hf_shape(e: Entry) -> Tuple[int, ...]:
  """The shape of the Hugging Face tensor of an entry."""
  if e.kind == 'linear':
    return (math.prod(e.shape[e.n_in:]), math.prod(e.shape[:e.n_in]))
  if e.kind == 'flat':
    return (math.prod(e.shape),)
  if e.kind == 'conv':
    p, q, c, w = e.shape
    return (w, c, p, q)
  return tuple(e.shape)


def to_hf(e: Entry, a: np.ndarray) -> np.ndarray:
  """Our array (one expert's slice for expert entries) -> the HF tensor, C-contiguous."""
  if e.kind == 'linear':
    a = a.reshape(hf_shape(e)[::-1]).T
  elif e.kind == 'flat':
    a = a.reshape(-1)
  elif e.kind == 'conv':
    a = a.transpose(3, 2, 0, 1)
  return np.ascontiguousarray(a)


def from_hf_array(e: Entry, t: np.ndarray) -> np.ndarray:
  """The HF tensor -> our array; inverse of to_hf (transposes and reshapes only: bit-exact)."""
  if e.kind == 'linear':
    return t.T.reshape(e.shape)
  if e.kind == 'flat':
    return t.reshape(e.shape)
  if e.kind == 'conv':
    return t.transpose(2, 3, 1, 0)
  return t


def _linear(name, path, in_shape, out_shape, bias=False, expert=None):
  """Entries of a torch nn.Linear `name` whose kernel is our `path`/kernel [*in, *out]."""
  shape = tuple(in_shape) + tuple(out_shape)
  out = [Entry(name + '.weight', path + ('kernel',), shape, 'linear', len(in_shape), expert)]
  if bias:
    out.append(Entry(name + '.bias', path + ('bias',), tuple(out_shape), 'flat'))
  return out


def _norm(name, path, dim, bias=True):
  out = [Entry(name + '.weight', path + ('scale',), (dim,))]
  if bias:
    out.append(Entry(name + '.bias', path + ('bias',), (dim,)))
  return out


def clip_vision_table(model_cfg, prefix: str = 'vision_model.', hf_only: bool = False
                      ) -> List[Entry]:
  """CLIPVisionModel names -> params['vision'] paths (blocks up to feature_layer only).

  hf_only adds the post-layernorm that HF's CLIPVisionModel has and we never use (as identity).
  """
  v = model_cfg.vision
  w, p, heads = v.width, v.patch_size, v.num_heads
  dh = w // heads
  grid = v.image_size // p
  t = [Entry(prefix + 'embeddings.patch_embedding.weight', ('patch_embed', 'kernel'),
             (p, p, 3, w), 'conv'),
       Entry(prefix + 'embeddings.class_embedding', ('cls_token',), (w,)),
       Entry(prefix + 'embeddings.position_embedding.weight', ('pos_embed',),
             (1 + grid * grid, w))]
  t += _norm(prefix + 'pre_layrnorm', ('pre_norm',), w)
  for i in range(num_feature_layers(v.depth, v.feature_layer)):
    pre, at = f'{prefix}encoder.layers.{i}.', (f'layer_{i}',)
    t += _norm(pre + 'layer_norm1', at + ('norm1',), w)
    for ours, theirs in (('query', 'q'), ('key', 'k'), ('value', 'v')):
      t += _linear(pre + f'self_attn.{theirs}_proj', at + (ours,), (w,), (heads, dh), bias=True)
    t += _linear(pre + 'self_attn.out_proj', at + ('out',), (heads, dh), (w,), bias=True)
    t += _norm(pre + 'layer_norm2', at + ('norm2',), w)
    t += _linear(pre + 'mlp.fc1', at + ('mlp', 'fc1'), (w,), (v.mlp_dim,), bias=True)
    t += _linear(pre + 'mlp.fc2', at + ('mlp', 'fc2'), (v.mlp_dim,), (w,), bias=True)
  if hf_only:
    t += [Entry(prefix + 'post_layernorm.weight', None, (w,), 'ones'),
          Entry(prefix + 'post_layernorm.bias', None, (w,), 'zeros')]
  return t


def projector_table(model_cfg, prefix: str = 'multi_modal_projector.') -> List[Entry]:
  d, vw = model_cfg.llm.embed_dim, model_cfg.vision.width
  return (_linear(prefix + 'linear_1', ('fc1',), (vw,), (d,), bias=True) +
          _linear(prefix + 'linear_2', ('fc2',), (d,), (d,), bias=True))


def llama_table(model_cfg, prefix: str = 'model.', lm_head_name: str = 'lm_head.weight'
                ) -> List[Entry]:
  """LlamaForCausalLM names (Mixtral names in MoE layers) -> params['decoder'] paths.

  LoRA adapters are not listed: an exported model has them merged (lora.merge_lora).
  """
  llm, m = model_cfg.llm, model_cfg.moe
  d, h, hkv, dh, f = llm.embed_dim, llm.num_heads, llm.num_kv_heads, llm.head_dim, llm.mlp_dim
  t = [Entry(prefix + 'embed_tokens.weight', ('embed',), (llm.vocab_size, d))]
  moe = set(layout.moe_layers(model_cfg))
  for i in range(llm.num_layers):
    pre, at = f'{prefix}layers.{i}.', (f'layer_{i}',)
    t += _norm(pre + 'input_layernorm', at + ('attn_norm',), d, bias=False)
    t += _linear(pre + 'self_attn.q_proj', at + ('attn', 'query'), (d,), (h, dh))
    t += _linear(pre + 'self_attn.k_proj', at + ('attn', 'key'), (d,), (hkv, dh))
    t += _linear(pre + 'self_attn.v_proj', at + ('attn', 'value'), (d,), (hkv, dh))
    t += _linear(pre + 'self_attn.o_proj', at + ('attn', 'out'), (h, dh), (d,))
    t += _norm(pre + 'post_attention_layernorm', at + ('ffn_norm',), d, bias=False)
    if i in moe:
      fe, e = m.mlp_dim or f, m.num_experts
      moe_at, sparse = at + ('moe',), pre + 'block_sparse_moe.'
      t.append(Entry(sparse + 'gate.weight', moe_at + ('router',), (d, e), 'linear'))
      if m.adaptive:
        c = m.condition_dim
        t += [Entry(sparse + 'task_embed.weight', moe_at + ('task_embed',), (m.num_tasks, c)),
              Entry(sparse + 'granularity_embed.weight', moe_at + ('granularity_embed',),
                    (m.num_granularities, c)),
              Entry(sparse + 'condition_proj.weight', moe_at + ('condition_proj',), (c, e),
                    'linear')]
      for x in range(e):
        ex = f'{sparse}experts.{x}.'
        t += [Entry(ex + 'w1.weight', moe_at + ('w_gate',), (d, fe), 'linear', 1, x),
              Entry(ex + 'w3.weight', moe_at + ('w_up',), (d, fe), 'linear', 1, x),
              Entry(ex + 'w2.weight', moe_at + ('w_down',), (fe, d), 'linear', 1, x)]
    else:
      t += _linear(pre + 'mlp.gate_proj', at + ('mlp', 'gate'), (d,), (f,))
      t += _linear(pre + 'mlp.up_proj', at + ('mlp', 'up'), (d,), (f,))
      t += _linear(pre + 'mlp.down_proj', at + ('mlp', 'down'), (f,), (d,))
  t += _norm(prefix + 'norm', ('final_norm',), d, bias=False)
  if not llm.tie_embeddings:
    t.append(Entry(lm_head_name, ('lm_head',), (d, llm.vocab_size), 'linear'))
  return t


def condition_head_table(model_cfg, name: str = 'condition_head') -> List[Entry]:
  """The condition head of a model that predicts its router's condition, else nothing: one
  Linear, embed_dim -> num_tasks + num_granularities (task logits first), with a bias."""
  if not predicts_condition(model_cfg):
    return []
  m = model_cfg.moe
  return _linear(name, ('condition_head',), (model_cfg.llm.embed_dim,),
                 (m.num_tasks + m.num_granularities,), bias=True)


def _under(part: str, table: List[Entry]) -> List[Entry]:
  return [e._replace(path=None if e.path is None else (part,) + e.path) for e in table]


def llava_table(model_cfg, hf_only: bool = True) -> List[Entry]:
  """Every tensor of the whole model, with paths from the params root ('vision', ...)."""
  return (_under('vision', clip_vision_table(model_cfg, 'vision_tower.vision_model.', hf_only)) +
          _under('projector', projector_table(model_cfg)) +
          _under('decoder', llama_table(model_cfg, 'language_model.model.',
                                        'language_model.lm_head.weight')) +
          condition_head_table(model_cfg))


def get_path(tree, path):
  for key in path:
    if key not in tree:
      raise ConversionError(f'parameter {"/".join(path)} is missing from the parameter tree')
    tree = tree[key]
  return tree


def _set_path(tree, path, value):
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


# ------------------------------------------------------------------------------ reading


class _Reader:
  """Fetches tensors by name, checks their shapes and casts to the param dtype."""

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
    value = value.astype(self.dtype)
    warn_non_finite(key, value)
    return value

  def entry(self, e: Entry, any_rows: bool = False) -> np.ndarray:
    """Our array of an entry; any_rows accepts any leading size (position grids)."""
    want = hf_shape(e)
    if any_rows:
      want = (None,) + want[1:]
    return from_hf_array(e, self(e.name, want))


def warn_non_finite(name: str, value: np.ndarray) -> None:
  """Logs a warning naming a tensor that holds NaN or infinite values (after the cast to the
  param dtype, which can overflow): a damaged checkpoint would otherwise train on silently."""
  finite = np.isfinite(value)
  if not finite.all():
    bad = int(value.size - np.count_nonzero(finite))
    logging.warning('tensor %r: %d of %d values are not finite (NaN or inf) in %s: the '
                    'checkpoint is damaged, or was cast to a dtype that cannot hold it', name,
                    bad, value.size, value.dtype)


def read_table(state_dict, table: List[Entry], dtype, prefix: str = '',
               positions_to: Optional[int] = None) -> Dict:
  """The unrolled tree of a table's entries (experts stacked along their leading axis).

  positions_to: the grid to resize a CLIP position embedding to (any stored grid accepted).
  """
  get = _Reader(state_dict, prefix, dtype)
  tree, experts = {}, {}
  for e in table:
    if e.path is None:
      continue
    if e.path[-1] == 'pos_embed' and positions_to is not None:
      value = np.asarray(resize_position_embedding(get.entry(e, any_rows=True), positions_to))
      _set_path(tree, e.path, value.astype(get.dtype))
    elif e.expert is not None:
      experts.setdefault(e.path, []).append(get.entry(e))
    else:
      _set_path(tree, e.path, get.entry(e))
  for path, slices in experts.items():
    _set_path(tree, path, np.stack(slices))
  return tree


def clip_vision_params(state_dict, model_cfg, prefix: str = 'vision_model.'):
  """HF CLIPVisionModel state dict -> the tree of params['vision'] (VisionTower).

  Only the blocks up to `feature_layer` are converted (ours are never built past it); the
  post-layernorm is unused. Position embeddings on another grid are resized bicubically.
  `prefix`: 'vision_model.' for CLIPModel state dicts and saved CLIP checkpoints; '' for the
  state dict of a transformers-5 CLIPVisionModel instance, whose keys carry no prefix.
  """
  v = model_cfg.vision
  tree = read_table(state_dict, clip_vision_table(model_cfg, prefix), model_cfg.param_dtype,
                    positions_to=v.image_size // v.patch_size)
  return layout.stack_vision(tree, model_cfg)


def llama_params(state_dict, model_cfg, prefix: str = 'model.',
                 lm_head_key: str = 'lm_head.weight'):
  """HF LlamaForCausalLM state dict -> the tree of params['decoder'] for a dense decoder.

  `lm_head_key` is the full name of the output projection (ignored when embeddings are tied).
  Scanned layout: blocks/layer_{j}/... stacked over the blocks; unrolled: layer_{i}/... .
  """
  if model_cfg.moe.num_experts > 0 or model_cfg.lora.rank > 0:
    raise ValueError('llama_params converts a dense decoder: set config.model.moe.num_experts=0 '
                     'and config.model.lora.rank=0 (upcycle / add LoRA after converting)')
  tree = read_table(state_dict, llama_table(model_cfg, prefix, lm_head_key),
                    model_cfg.param_dtype)
  return layout.stack_decoder(tree, model_cfg)


def llava_params(state_dict, model_cfg, dtype=None) -> Dict:
  """A LLaVA-named checkpoint (our export: any MoE layers, routers and condition head) -> the
  whole params tree of model_cfg without LoRA adapters (an export has them merged).

  dtype: of the returned arrays (default model_cfg.param_dtype); the stored grid of the
  position embedding must be the configured one (the export writes it so).
  """
  tree = read_table(state_dict, llava_table(model_cfg), dtype or model_cfg.param_dtype)
  params = {'vision': layout.stack_vision(tree['vision'], model_cfg),
            'projector': tree['projector'],
            'decoder': layout.stack_decoder(tree['decoder'], model_cfg)}
  if 'condition_head' in tree:
    params['condition_head'] = tree['condition_head']
  return params


# ------------------------------------------------------------------------ checkpoint files

# The safetensors library's header errors, as what they usually mean for a file on disk.
_SAFETENSORS_HINTS = {'file not fully covered': 'truncated, or not a safetensors file',
                      'invalid header length': 'truncated, or not a safetensors file',
                      'header too large': 'not a safetensors file',
                      'header too small': 'too short for a safetensors file',
                      'invalid offset': "tensors' byte ranges overlap or leave gaps: a damaged "
                                        'or hand-made header'}


def safetensors_error(path, error, name: Optional[str] = None) -> CheckpointFileError:
  """The library's SafetensorError as a CheckpointFileError naming the file (and tensor)."""
  reason = str(error)
  hint = next((h for key, h in _SAFETENSORS_HINTS.items() if key in reason), None)
  where = f'{path}: tensor {name!r}' if name is not None else str(path)
  return CheckpointFileError(f'{where}: {reason}' + (f' ({hint})' if hint else ''))


class SafetensorsFile(Mapping):
  """A .safetensors file read lazily through the safetensors library.

  `safe_open` validates the header against the file size when the file is opened (a truncated or
  malformed file fails here, before any conversion starts); each tensor is then read from disk
  only when asked for, so the file is never held as a whole. The pread backend rather than a
  memory map: a file cut short after opening raises an error naming the tensor instead of
  killing the process with SIGBUS. bfloat16 tensors come back as ml_dtypes.bfloat16 arrays, bit
  for bit.
  """

  def __init__(self, path):
    self.path = pathlib.Path(path)
    try:
      self._file = safetensors.safe_open(self.path, framework='numpy', backend='pread')
      self._names = self._file.offset_keys()
      self.metadata = self._file.metadata() or {}
    except safetensors.SafetensorError as e:
      raise safetensors_error(self.path, e) from None
    self._known = frozenset(self._names)

  def __getitem__(self, name) -> np.ndarray:
    if name not in self._known:
      raise KeyError(name)
    try:
      return self._file.get_tensor(name)
    except safetensors.SafetensorError as e:
      raise safetensors_error(self.path, e, name) from None

  def __contains__(self, name) -> bool:  # without reading the tensor, as Mapping's would
    return name in self._known

  def __iter__(self) -> Iterator[str]:
    return iter(self._names)

  def __len__(self):
    return len(self._names)


def _torch_to_numpy(t) -> np.ndarray:
  import torch  # pylint: disable=import-outside-toplevel
  t = t.detach().cpu().contiguous()
  if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
    return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return t.numpy()


def load_torch_bin(path) -> Dict[str, np.ndarray]:
  """A torch .bin state dict via torch.load(weights_only=True): the restricted unpickler that
  only rebuilds tensors and plain containers, never arbitrary objects."""
  import torch  # pylint: disable=import-outside-toplevel
  path = pathlib.Path(path)
  try:
    try:  # memory-mapped: tensors are read from disk as they are converted
      sd = torch.load(path, map_location='cpu', weights_only=True, mmap=True)
    except RuntimeError as e:
      if 'mmap' not in str(e):  # only the legacy (non-zip) format cannot be mapped
        raise
      sd = torch.load(path, map_location='cpu', weights_only=True)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointFileError(f'{path}: cannot be read as a torch state dict '
                              f'({type(e).__name__}: {str(e).splitlines()[0][:200]})') from None
  if isinstance(sd, dict) and isinstance(sd.get('state_dict'), dict):
    sd = sd['state_dict']
  if not isinstance(sd, dict):
    raise CheckpointFileError(f'{path}: holds a {type(sd).__name__}, not a state dict')
  out = {}
  for name, t in sd.items():
    if not isinstance(t, torch.Tensor):
      raise CheckpointFileError(f'{path}: entry {name!r} is a {type(t).__name__}, not a tensor')
    out[name] = _torch_to_numpy(t)
  return out


class Checkpoint(Mapping):
  """Name -> numpy array over the files of one checkpoint, each opened when first needed."""

  def __init__(self, files: Dict[str, pathlib.Path], opener, opened: Optional[Dict] = None):
    self._where, self._open, self._cache = files, opener, dict(opened or {})

  def _file(self, path):
    if path not in self._cache:
      self._cache[path] = self._open(path)
    return self._cache[path]

  def __getitem__(self, name):
    path = self._where[name]
    f = self._file(path)
    if name not in f:
      raise CheckpointFileError(f'{path}: tensor {name!r} is listed in the index but missing '
                                'from the file')
    return f[name]

  def __iter__(self):
    return iter(self._where)

  def __len__(self):
    return len(self._where)


def _from_index(index_path: pathlib.Path, opener) -> Checkpoint:
  try:
    weight_map = json.loads(index_path.read_text())['weight_map']
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise CheckpointFileError(f'{index_path}: not a checkpoint index ({e})') from None
  files = {name: index_path.parent / fname for name, fname in weight_map.items()}
  for path in set(files.values()):
    if not path.exists():
      raise CheckpointFileError(f'{index_path}: shard {path.name} does not exist')
  return Checkpoint(files, opener)


def _single(path: pathlib.Path, opener) -> Checkpoint:
  f = opener(path)  # validated now: a damaged file fails before any conversion starts
  return Checkpoint({name: path for name in f}, opener, {path: f})


def open_checkpoint(path) -> Checkpoint:
  """The tensors of a checkpoint file or folder, by name.

  A folder holds model.safetensors, model.safetensors.index.json (+ shards),
  pytorch_model.bin or pytorch_model.bin.index.json (checked in that order), or a single
  *.safetensors / *.bin file. .bin files are read with torch.load(weights_only=True).
  """
  path = pathlib.Path(os.path.expanduser(str(path)))
  if path.is_dir():
    for name in ('model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin',
                 'pytorch_model.bin.index.json'):
      if (path / name).exists():
        return open_checkpoint(path / name)
    found = sorted(path.glob('*.safetensors')) or sorted(path.glob('*.bin'))
    if len(found) == 1:
      return open_checkpoint(found[0])
    raise CheckpointFileError(f'{path}: no model.safetensors, pytorch_model.bin or index '
                              f'(found {[p.name for p in found]})')
  if not path.exists():
    raise FileNotFoundError(f'{path}: no such checkpoint')
  is_bin = path.name.endswith('.bin') or path.name.endswith('.bin.index.json')
  opener = load_torch_bin if is_bin else SafetensorsFile
  if path.name.endswith('.index.json'):
    return _from_index(path, opener)
  return _single(path, opener)


def find_prefix(names, suffix: str, what: str) -> str:
  """The prefix before `suffix` in the one name that ends with it (e.g. 'vision_model.')."""
  hits = sorted(n[:-len(suffix)] for n in names if n.endswith(suffix))
  if not hits:
    raise ConversionError(f'no tensor named *{suffix}: not a {what} checkpoint')
  return min(hits, key=len)


# ------------------------------------------------------------------ the checkpoint's own config


def hf_config_path(path) -> Optional[pathlib.Path]:
  """config.json of a checkpoint folder, or the one next to a checkpoint file; None if absent."""
  path = pathlib.Path(os.path.expanduser(str(path)))
  candidate = (path if path.is_dir() else path.parent) / export_format.CONFIG_FILE
  return candidate if candidate.is_file() else None


def read_hf_config(path) -> dict:
  """A config.json as a dict; CheckpointFileError naming the file when it is not one."""
  config = export_format.read_json(path, CheckpointFileError)
  if not isinstance(config, dict):
    raise CheckpointFileError(f'{path}: holds a JSON {type(config).__name__}, not a config')
  return config


Fields = Dict[str, Tuple[str, object]]  # our field -> (the checkpoint's name for it, its value)


def llama_fields(hf: dict) -> Tuple[Fields, Fields]:
  """(fields, fixed) of a LlamaConfig config.json, for check_fields: what the tensor shapes
  cannot show, with LlamaConfig's defaults for what the file leaves out (transformers reads it
  so). The RoPE base is read from `rope_parameters` (transformers 5) or the top-level
  `rope_theta` (earlier files); a LLaVA config.json's `text_config` is the LLaMA's. fixed: what
  our decoder has one value of (default RoPE, SiLU)."""
  if isinstance(hf.get('text_config'), dict):
    hf = hf['text_config']
  heads = hf.get('num_attention_heads')
  rope = hf.get('rope_parameters') if isinstance(hf.get('rope_parameters'), dict) else {}
  scaling = hf.get('rope_scaling') if isinstance(hf.get('rope_scaling'), dict) else {}
  head_dim = hf.get('head_dim')
  if head_dim is None and heads and hf.get('hidden_size'):
    head_dim = hf['hidden_size'] // heads
  fields = {
      'num_heads': ('num_attention_heads', heads),
      'num_kv_heads': ('num_key_value_heads', hf.get('num_key_value_heads', heads)),
      'head_dim': ('head_dim', head_dim),
      'rope_theta': ('rope_theta', rope.get('rope_theta', hf.get('rope_theta', 10000.0))),
      'norm_eps': ('rms_norm_eps', hf.get('rms_norm_eps', 1e-6)),
      'tie_embeddings': ('tie_word_embeddings', hf.get('tie_word_embeddings', False)),
      'num_layers': ('num_hidden_layers', hf.get('num_hidden_layers')),
  }
  rope_type = rope.get('rope_type') or scaling.get('rope_type') or scaling.get('type')
  fixed = {'rope_type': ('default', rope_type or 'default'),
           'hidden_act': ('silu', hf.get('hidden_act', 'silu'))}
  return fields, fixed


def clip_fields(hf: dict) -> Tuple[Fields, Fields]:
  """(fields, fixed) of a CLIPVisionConfig config.json (or a CLIPModel's, its vision_config),
  with CLIPVisionConfig's defaults: the head split and the norm epsilon; quick-GELU fixed."""
  if isinstance(hf.get('vision_config'), dict):
    hf = hf['vision_config']
  fields = {'num_heads': ('num_attention_heads', hf.get('num_attention_heads', 12)),
            'norm_eps': ('layer_norm_eps', hf.get('layer_norm_eps', 1e-5))}
  return fields, {'hidden_act': ('quick_gelu', hf.get('hidden_act', 'quick_gelu'))}


def _same(theirs, ours) -> bool:
  if isinstance(theirs, bool) or isinstance(ours, bool):
    return bool(theirs) == bool(ours) and isinstance(theirs, (bool, int))
  if isinstance(theirs, (int, float)) and isinstance(ours, (int, float)):
    return math.isclose(float(theirs), float(ours), rel_tol=1e-6)  # float32 metadata (GGUF)
  return theirs == ours


def check_fields(source, section: str, cfg, fields: Fields, fixed: Optional[Fields] = None,
                 only_more: Tuple[str, ...] = ()) -> None:
  """Refuses a checkpoint whose own config disagrees with config.<section> (ConfigMismatchError
  naming the checkpoint's value, the config field and its value, and the override that would
  import it as it is): adopting such a value silently (RoPE base, norm epsilon, head split)
  would give a model that loads and computes something else.

  fields: {our field: (their name, value)}, None values unknown (skipped); fixed: {name:
  (the one value we support, theirs)}; only_more: fields refused only when the checkpoint has
  more (extra layers would be dropped; fewer are a missing tensor, which the reader names).
  """
  problems = []
  for ours, (theirs, value) in fields.items():
    if value is None:
      continue
    want = cfg[ours]
    if ours in only_more:
      if isinstance(value, int) and value > want:
        problems.append(f'{theirs} is {value} where config.{section}.{ours} is {want} (the '
                        f'extra ones would be dropped; set --config.{section}.{ours}={value})')
    elif not _same(value, want):
      problems.append(f'{theirs} is {value!r} where config.{section}.{ours} is {want!r} (set '
                      f'--config.{section}.{ours}={value!r} to import it as it is)')
  for name, (supported, value) in (fixed or {}).items():
    if value != supported:
      problems.append(f'{name} {value!r} is not supported (the model computes {supported!r} '
                      'only)')
  if problems:
    raise ConfigMismatchError(f'{source}: ' + '; '.join(problems))


def check_hf_config(path, section: str, cfg, read_fields, what: str, **kwargs) -> None:
  """check_fields against the config.json of the checkpoint at `path` (read_fields: llama_fields
  or clip_fields); without one, a warning that says what could not be checked."""
  source = hf_config_path(path)
  if source is None:
    fields, _ = read_fields({})
    logging.warning('%s: no config.json next to the %s checkpoint: its %s cannot be checked; '
                    'assuming config.%s\'s', path, what, ', '.join(n for n, _ in fields.values()),
                    section)
    return
  fields, fixed = read_fields(read_hf_config(source))
  check_fields(source, section, cfg, fields, fixed, **kwargs)
