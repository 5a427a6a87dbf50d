"""GGUF (llama.cpp) LLaMA-architecture files -> a HF LlamaForCausalLM-named state dict.

The `gguf` package (pin gguf==0.19.0) parses the file by memory-mapping it: no pickle, nothing
executed. We add checks it lacks, on every tensor's byte range before any tensor is built: a
range past the end of the file (truncated) fails naming the file and the first tensor cut off
(the package alone fails with an anonymous reshape error), and two ranges that overlap (two
names reading one set of weights: layer 1 silently a copy of layer 0) fail naming both.

Tensors are dequantised to float32 one at a time, when the converter asks for them
(`GGUFStateDict` is a lazy Mapping), and renamed to LLaMA's names so that from_hf's table (and
so from_hf.llama_params) reads them. llama.cpp's converter permutes the rows of attn_q / attn_k
(its RoPE pairs adjacent dims; LLaMA's HF layout rotates halves); `unpermute_rows` undoes it.
`GGUFStateDict.llm_config()` gives the decoder fields of our config, and `checked_fields()`
the ones the import compares with the config (from_hf.check_fields: a RoPE base or norm
epsilon that disagrees is refused, not adopted).
"""
import pathlib
import re
from typing import Dict, Iterator, Mapping

import numpy as np

from skymoe_jax.interop.from_hf import CheckpointFileError

# GGUF per-layer name -> HF LLaMA per-layer name.
_LAYER_NAMES = {
    'attn_norm.weight': 'input_layernorm.weight',
    'attn_q.weight': 'self_attn.q_proj.weight',
    'attn_k.weight': 'self_attn.k_proj.weight',
    'attn_v.weight': 'self_attn.v_proj.weight',
    'attn_output.weight': 'self_attn.o_proj.weight',
    'ffn_norm.weight': 'post_attention_layernorm.weight',
    'ffn_gate.weight': 'mlp.gate_proj.weight',
    'ffn_up.weight': 'mlp.up_proj.weight',
    'ffn_down.weight': 'mlp.down_proj.weight',
}
_GLOBAL_NAMES = {'token_embd.weight': 'model.embed_tokens.weight',
                 'output_norm.weight': 'model.norm.weight',
                 'output.weight': 'lm_head.weight'}
_LAYER = re.compile(r'^blk\.(\d+)\.(.+)$')


def hf_name(gguf_name: str):
  """The HF LLaMA name of a GGUF tensor, or None for tensors we do not use (e.g. rope_freqs)."""
  if gguf_name in _GLOBAL_NAMES:
    return _GLOBAL_NAMES[gguf_name]
  m = _LAYER.match(gguf_name)
  if m and m.group(2) in _LAYER_NAMES:
    return f'model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}'
  return None


def unpermute_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Inverse of llama.cpp's q/k row permutation: per head, rows (pairs interleaved) -> halves."""
  dim = w.shape[0] // num_heads // 2
  return w.reshape(num_heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _reader(path: pathlib.Path):
  """A gguf.GGUFReader that checks each tensor's bytes lie inside the file before using them."""
  import gguf  # pylint: disable=import-outside-toplevel
  from gguf.constants import GGML_QUANT_SIZES  # pylint: disable=import-outside-toplevel

  class CheckedReader(gguf.GGUFReader):
    def _build_tensors(self, start_offs, fields):
      size = len(self.data)
      ranges = []
      for field in fields:
        _, name, _, dims, raw_type, offset = field.parts
        name = bytes(name).decode('utf-8', 'replace')
        try:
          block, type_size = GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(raw_type[0]))]
        except (ValueError, KeyError):
          raise CheckpointFileError(f'{path}: tensor {name!r} has unknown type '
                                    f'{int(raw_type[0])}') from None
        end = int(start_offs + offset[0]) + int(np.prod(dims)) * type_size // block
        if end > size:
          raise CheckpointFileError(f'{path}: tensor {name!r} needs bytes up to {end}, the file '
                                    f'has {size} (truncated?)')
        ranges.append((int(start_offs + offset[0]), end, name))
      ranges.sort()
      for (_, end, first), (start, _, second) in zip(ranges, ranges[1:]):
        if start < end:
          raise CheckpointFileError(f'{path}: tensors {first!r} and {second!r} overlap (bytes '
                                    f'{start}-{end} belong to both): a damaged or hand-made '
                                    'file')
      super()._build_tensors(start_offs, fields)

  try:
    return CheckedReader(path)
  except CheckpointFileError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointFileError(f'{path}: not a readable GGUF file ({type(e).__name__}: '
                              f'{str(e)[:200]})') from None


class GGUFStateDict(Mapping):
  """HF LLaMA name -> float32 numpy array, dequantised on access. `.meta` holds the metadata."""

  def __init__(self, path):
    import gguf  # pylint: disable=import-outside-toplevel
    self.path = pathlib.Path(path)
    reader = _reader(self.path)
    self.meta = {}
    for key, field in reader.fields.items():
      if key.startswith('tokenizer.ggml.') and key != 'tokenizer.ggml.model':
        continue  # vocabularies are large and not needed for the weights
      try:
        self.meta[key] = field.contents()
      except Exception:  # pylint: disable=broad-except
        continue
    arch = self.meta.get('general.architecture')
    if arch != 'llama':
      raise CheckpointFileError(f'{self.path}: architecture {arch!r}, only llama is supported')
    self._heads = int(self._required('llama.attention.head_count'))
    self._kv_heads = int(self.meta.get('llama.attention.head_count_kv', self._heads))
    self._tensors = {}
    for t in reader.tensors:
      name = hf_name(t.name)
      if name is not None:
        self._tensors[name] = t
    self._dequantize = gguf.quants.dequantize

  def _required(self, key: str):
    """A metadata value the conversion needs; its absence names the file and the key."""
    if key not in self.meta:
      raise CheckpointFileError(f'{self.path}: metadata {key!r} is missing (not a complete '
                                'LLaMA GGUF file)')
    return self.meta[key]

  def __getitem__(self, name) -> np.ndarray:
    t = self._tensors[name]
    try:
      w = np.asarray(self._dequantize(t.data, t.tensor_type), np.float32)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointFileError(f'{self.path}: tensor {t.name!r} cannot be dequantised '
                                f'({type(e).__name__}: {e})') from None
    if name.endswith('self_attn.q_proj.weight'):
      w = unpermute_rows(w, self._heads)
    elif name.endswith('self_attn.k_proj.weight'):
      w = unpermute_rows(w, self._kv_heads)
    return w

  def llm_config(self) -> Dict:
    """Fields of config.model.llm: from the metadata, the vocabulary from the embedding's shape,
    tied embeddings when there is no output matrix."""
    meta, heads = self.meta, self._heads
    d = int(self._required('llama.embedding_length'))
    if 'model.embed_tokens.weight' not in self._tensors:
      raise CheckpointFileError(f'{self.path}: no token_embd.weight tensor')
    return dict(
        vocab_size=int(self._tensors['model.embed_tokens.weight'].shape[-1]), embed_dim=d,
        num_layers=int(self._required('llama.block_count')), num_heads=heads,
        num_kv_heads=self._kv_heads,
        head_dim=int(meta.get('llama.rope.dimension_count', d // heads)),
        mlp_dim=int(self._required('llama.feed_forward_length')),
        rope_theta=float(meta.get('llama.rope.freq_base', 10000.0)),
        norm_eps=float(self._required('llama.attention.layer_norm_rms_epsilon')),
        tie_embeddings='lm_head.weight' not in self._tensors)

  def checked_fields(self):
    """(fields, fixed) for from_hf.check_fields: the metadata the tensor shapes cannot show,
    by its GGUF key (float32 values shown at float32 precision: 1e-05, not 9.99999975e-06)."""
    cfg = self.llm_config()
    keys = {'num_heads': 'llama.attention.head_count',
            'num_kv_heads': 'llama.attention.head_count_kv',
            'head_dim': 'llama.rope.dimension_count', 'rope_theta': 'llama.rope.freq_base',
            'norm_eps': 'llama.attention.layer_norm_rms_epsilon',
            'tie_embeddings': 'tied embeddings (no output.weight)',
            'num_layers': 'llama.block_count'}
    shown = lambda v: float(f'{v:.7g}') if isinstance(v, float) else v
    fields = {ours: (key, shown(cfg[ours])) for ours, key in keys.items()}
    scaling = self.meta.get('llama.rope.scaling.type', 'none')
    return fields, {'llama.rope.scaling.type': ('none', scaling)}

  def __iter__(self) -> Iterator[str]:
    return iter(self._tensors)

  def __len__(self):
    return len(self._tensors)


def read_gguf(path) -> GGUFStateDict:
  """The LLaMA state dict of a GGUF file (lazy, HF names)."""
  return GGUFStateDict(path)
