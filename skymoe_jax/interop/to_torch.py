"""Export: our parameters -> a Hugging Face-style folder (safetensors + config.json), by shards.

  export_params(params, model_cfg, out)      any parameter tree (device or numpy arrays)
  export_workdir(workdir, out, step=None)    a training workdir's checkpoint (params only)

The folder holds model.safetensors (or model-0000i-of-0000n.safetensors shards plus
model.safetensors.index.json above `max_shard_bytes`), config.json and, when the workdir has
one, tokenizer.model. Tensor names come from from_hf.llava_table, the table the importers read
with, so export followed by import is an exact round trip.

Memory: LoRA is merged first (only the adapted kernels get new arrays). The files are written
one shard at a time with the safetensors library, which takes a whole file's arrays at once: the
shards are planned from the table's shapes alone, then each shard's tensors are sliced out of
their (possibly scanned and sharded) parameters on device, copied to the host, transposed to
torch's layout and cast, saved together and dropped before the next shard's are fetched. The
host holds about one shard (max_shard_bytes, default 5 GB as transformers' save_pretrained; a
single larger tensor makes its own shard) plus transient copies of the tensor being fetched, so
a smaller max_shard_bytes lowers the peak. A workdir restore reads the parameters only (not the
optimizer state).

config.json is LlavaConfig-compatible for dense models (LlavaForConditionalGeneration loads the
folder); an MoE model gets model_type 'skymoe_llava' so that transformers refuses it rather than
silently dropping experts. Either way a `skymoe` section carries our whole model config, which
torch_model.py (and import back into JAX) builds the model from. The vision tower is exported
with the blocks we have, up to the feature layer, so HF reads its features at
vision_feature_layer=-1 (the last exported block: the same tensor as the original tower's
feature_layer); the post-layernorm HF expects and LLaVA never uses is written as identity.
"""
import json
import os
import pathlib
import shutil
import time
from typing import Callable, Dict, List, NamedTuple, Optional

import jax
import ml_collections
import numpy as np
from safetensors.numpy import save_file

from skymoe_jax import workdir as workdir_lib
from skymoe_jax.config import num_feature_layers
from skymoe_jax.interop import from_hf
from skymoe_jax.model import factory, layout, lora

FORMAT_VERSION = 1
DEFAULT_MAX_SHARD_BYTES = 5 * 10 ** 9  # '5GB', transformers' save_pretrained default
DTYPES = {'fp32': 'float32', 'float32': 'float32', 'bf16': 'bfloat16', 'bfloat16': 'bfloat16'}
CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'


class ExportError(ValueError):
  """The parameters do not fit the export table; the message names the parameter."""


class Tensor(NamedTuple):
  """One tensor of the export, known by shape before its data exists: shards are planned (and
  the index written) from these, and a shard's arrays are fetched only when it is written."""
  name: str
  shape: tuple
  dtype: np.dtype
  fetch: Callable[[], np.ndarray]  # produces the array only when its shard is written

  @property
  def nbytes(self) -> int:
    return int(np.prod(self.shape, dtype=np.int64)) * self.dtype.itemsize


def write_shard(path, tensors: List[Tensor], metadata: Optional[Dict[str, str]] = None):
  """Writes one .safetensors file of `tensors` with the safetensors library.

  The library serialises a dict of whole arrays, so every tensor of the file is fetched first
  (checked against the shape and dtype the shard plan and the index were made from), saved, and
  dropped on return: the host holds this one file's arrays. Written under a temporary name and
  renamed at the end, so a crash never leaves a file that looks complete.
  """
  path = pathlib.Path(path)
  arrays = {}
  for t in tensors:
    a = t.fetch()
    if a.shape != tuple(t.shape) or a.dtype != t.dtype:
      raise ExportError(f'tensor {t.name}: produced {a.dtype}{list(a.shape)}, the shard plan '
                        f'says {t.dtype}{list(t.shape)}')
    arrays[t.name] = np.ascontiguousarray(a)  # the library writes the raw buffer as it is
  partial = path.with_name(path.name + '.partial')
  try:
    save_file(arrays, partial, metadata=dict(metadata or {'format': 'pt'}))
  except BaseException:
    partial.unlink(missing_ok=True)
    raise
  os.replace(partial, path)


def plan_shards(tensors: List[Tensor], max_shard_bytes: int) -> List[List[Tensor]]:
  """Consecutive tensors into shards of at most max_shard_bytes (a bigger tensor goes alone)."""
  shards, size = [[]], 0
  for t in tensors:
    if shards[-1] and size + t.nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += t.nbytes
  return shards


def _leaf_paths(tree, prefix=()):
  if isinstance(tree, dict):
    for k, v in tree.items():
      yield from _leaf_paths(v, prefix + (k,))
  else:
    yield prefix


def _check_params(params, model_cfg, table):
  """Every parameter is exported, every entry has its parameter and the shapes agree: no silent
  drift between the model and the table, found before any file is written. Names the first
  parameter at fault."""
  covered = set()
  for e in table:
    if e.path is None:
      continue
    stored, index = layout.locate(model_cfg, e.path)
    covered.add(stored)
    try:
      leaf = from_hf.get_path(params, stored)
    except from_hf.ConversionError:
      continue  # reported below with the other missing ones
    index += (e.expert,) if e.expert is not None else ()
    if tuple(leaf.shape[len(index):]) != tuple(e.shape):
      raise ExportError(f'parameter {"/".join(stored)} has shape {tuple(leaf.shape)}: the '
                        f'config makes {e.name} {tuple(e.shape)} (leading {len(index)} axes '
                        'stacked layers / experts)')
  leaves = set(_leaf_paths(params))
  if leaves - covered:
    raise ExportError(f'parameter {"/".join(sorted(leaves - covered)[0])} has no name in the '
                      'export table (is the config the one the parameters were made with?)')
  if covered - leaves:
    raise ExportError(f'parameter {"/".join(sorted(covered - leaves)[0])} is missing from the '
                      'parameters')


def plain_config(cfg) -> dict:
  """A ConfigDict (or FrozenConfigDict) as JSON-ready plain data."""
  return json.loads(cfg.to_json_best_effort())


def exported_model_config(model_cfg) -> ml_collections.ConfigDict:
  """The model config an export describes: LoRA merged away."""
  cfg = ml_collections.ConfigDict(plain_config(model_cfg))
  cfg.lora.rank = 0
  return cfg


def hf_config(model_cfg, dtype: str = 'float32', image_token_index: int = 0,
              extra: Optional[dict] = None) -> dict:
  """config.json: LlavaConfig fields (a valid LlavaConfig when dense) + our `skymoe` section."""
  v, llm = model_cfg.vision, model_cfg.llm
  dense = model_cfg.moe.num_experts == 0
  vision = dict(
      model_type='clip_vision_model', hidden_size=v.width, intermediate_size=v.mlp_dim,
      num_hidden_layers=num_feature_layers(v.depth, v.feature_layer),
      num_attention_heads=v.num_heads, num_channels=3, image_size=v.image_size,
      patch_size=v.patch_size, hidden_act='quick_gelu', layer_norm_eps=v.norm_eps)
  text = dict(
      model_type='llama', vocab_size=llm.vocab_size, hidden_size=llm.embed_dim,
      intermediate_size=llm.mlp_dim, num_hidden_layers=llm.num_layers,
      num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
      head_dim=llm.head_dim, hidden_act='silu', max_position_embeddings=llm.max_seq_len,
      rms_norm_eps=llm.norm_eps, rope_theta=llm.rope_theta,
      rope_parameters={'rope_theta': llm.rope_theta, 'rope_type': 'default'},
      tie_word_embeddings=bool(llm.tie_embeddings), attention_bias=False, mlp_bias=False)
  cfg = exported_model_config(model_cfg)
  skymoe = {'format_version': FORMAT_VERSION, 'model': plain_config(cfg),
            'lora_merged_from_rank': int(model_cfg.lora.rank),
            'layout': 'image tokens first, then text; features of the last exported vision block '
                      'without CLS',
            'moe_layers': list(layout.moe_layers(model_cfg))}
  skymoe.update(extra or {})
  return {
      'architectures': ['LlavaForConditionalGeneration' if dense else
                        'SkyMoEForConditionalGeneration'],
      'model_type': 'llava' if dense else 'skymoe_llava',
      'vision_config': vision, 'text_config': text,
      'image_token_index': int(image_token_index),
      'image_seq_length': (v.image_size // v.patch_size) ** 2,
      'projector_hidden_act': 'gelu', 'multimodal_projector_bias': True,
      'vision_feature_layer': -1, 'vision_feature_select_strategy': 'default',
      'tie_word_embeddings': bool(llm.tie_embeddings), 'dtype': dtype, 'torch_dtype': dtype,
      'skymoe': skymoe,
  }


def export_tensors(params, model_cfg, dtype: str = 'float32') -> List[Tensor]:
  """The export's tensors, in table order, each fetched lazily from `params` (merged)."""
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  table = from_hf.llava_table(exported_model_config(model_cfg))
  _check_params(params, model_cfg, table)
  tensors = []
  for e in table:
    def fetch(e=e):
      if e.kind in ('ones', 'zeros'):
        return (np.ones if e.kind == 'ones' else np.zeros)(e.shape, np_dtype)
      stored, index = layout.locate(model_cfg, e.path)
      if e.expert is not None:
        index += (e.expert,)
      a = from_hf.get_path(params, stored)
      a = a[index] if index else a  # sliced on device: only this tensor comes to the host
      host = np.asarray(jax.device_get(a))
      if host.shape != tuple(e.shape):
        raise ExportError(f'parameter {"/".join(stored)}{list(index)} has shape {host.shape}, '
                          f'the config says {tuple(e.shape)}')
      return from_hf.to_hf(e, host).astype(np_dtype, copy=False)
    tensors.append(Tensor(e.name, from_hf.hf_shape(e), np_dtype, fetch))
  return tensors


def shard_name(i: int, n: int) -> str:
  return f'model-{i + 1:05d}-of-{n:05d}.safetensors'


def export_params(params, model_cfg, out, dtype: str = 'float32',
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, image_token_index: int = 0,
                  extra: Optional[dict] = None) -> Dict:
  """Writes `params` (an unboxed tree; LoRA adapters are merged) as a HF-style folder `out`.

  Returns {'files', 'num_tensors', 'total_bytes', 'seconds'}.
  """
  start = time.perf_counter()
  dtype = DTYPES.get(dtype, dtype)
  out = pathlib.Path(out)
  out.mkdir(parents=True, exist_ok=True)
  if model_cfg.lora.rank > 0:
    params = lora.merge_lora(params, model_cfg.lora.alpha)
  tensors = export_tensors(params, model_cfg, dtype)
  shards = plan_shards(tensors, max_shard_bytes)
  for stale in list(out.glob('model*.safetensors')) + [out / INDEX_FILE]:
    if stale.exists():
      stale.unlink()  # a previous export with another sharding must not linger
  meta = {'format': 'pt', 'producer': 'skymoe_jax'}
  if len(shards) == 1:
    files = [WEIGHTS_FILE]
    write_shard(out / WEIGHTS_FILE, shards[0], meta)
  else:
    files = [shard_name(i, len(shards)) for i in range(len(shards))]
    for fname, shard in zip(files, shards):
      write_shard(out / fname, shard, meta)
    index = {'metadata': {'total_size': sum(t.nbytes for t in tensors)},
             'weight_map': {t.name: fname for fname, shard in zip(files, shards) for t in shard}}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=1) + '\n')
  config = hf_config(model_cfg, dtype, image_token_index, extra)
  (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + '\n')
  return {'files': files, 'num_tensors': len(tensors),
          'total_bytes': sum(t.nbytes for t in tensors),
          'seconds': time.perf_counter() - start}


# ------------------------------------------------------------------------- from a workdir


def image_token_id(tokenizer_path) -> int:
  """The tokenizer's `<image>` piece when it has one (ours do), else its unk id (LLaMA's
  tokenizer.model has none; unk never appears in text that byte fallback encodes)."""
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  sp = spm.SentencePieceProcessor(model_file=str(tokenizer_path))
  piece = sp.piece_to_id('<image>')
  return int(piece) if piece != sp.unk_id() else int(sp.unk_id())


def export_workdir(workdir, out, step: Optional[int] = None, dtype: str = 'float32',
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   image_token_index: Optional[int] = None) -> Dict:
  """Exports a training workdir's checkpoint (default its latest) to `out`."""
  workdir = workdir_lib.resolve(workdir)
  config = workdir_lib.read_config(workdir)
  step, params = workdir_lib.restore_params(config, workdir, step)
  tokenizer = workdir_lib.tokenizer_path(workdir)
  if image_token_index is None:
    image_token_index = image_token_id(tokenizer) if tokenizer.exists() else 0
  info = export_params(params, config.model, out, dtype, max_shard_bytes, image_token_index,
                       extra={'step': int(step), 'workdir': str(workdir)})
  if tokenizer.exists():
    shutil.copyfile(tokenizer, pathlib.Path(out) / 'tokenizer.model')
  info.update(step=int(step), config=config, params=params)
  return info


def load_export(folder, dtype=None):
  """(params, model config) of an exported folder, back in our layout (exact for fp32)."""
  folder = pathlib.Path(folder)
  config = json.loads((folder / CONFIG_FILE).read_text())
  if 'skymoe' not in config:
    raise from_hf.ConversionError(f'{folder / CONFIG_FILE} has no skymoe section: not one of '
                                  'our exports')
  model_cfg = ml_collections.ConfigDict(config['skymoe']['model'])
  return from_hf.llava_params(from_hf.open_checkpoint(folder), model_cfg, dtype), model_cfg


def verify_export(out, params, config, batch: int = 2, text_len: int = 16, seed: int = 0
                  ) -> float:
  """Max |logit difference| between torch_model on the export `out` and our model on `params`
  (the original tree, LoRA unmerged), on the same random inputs; real positions only.

  The JAX side runs dropless (the capacity backend would drop tokens the torch model keeps).
  """
  import torch  # pylint: disable=import-outside-toplevel
  from skymoe_jax.interop import torch_model  # pylint: disable=import-outside-toplevel
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.moe.backend == 'capacity':
    config.model.moe.backend = 'dense'
  config.model.moe.ep_strategy = 'none'
  model = factory.create_model(config)
  v, llm, m = config.model.vision, config.model.llm, config.model.moe
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, v.image_size, v.image_size, 3)).astype(np.float32)
  tokens = rng.integers(0, llm.vocab_size, size=(batch, text_len)).astype(np.int32)
  mask = np.ones((batch, text_len), bool)
  mask[1:, text_len // 2:] = False  # right padding, as the input pipeline makes it
  task = rng.integers(0, m.num_tasks, size=(batch,)).astype(np.int32)
  gran = rng.integers(0, m.num_granularities, size=(batch,)).astype(np.int32)
  ours = np.asarray(jax.jit(lambda p, *a: model.apply({'params': p}, *a)[0])(
      params, images, tokens, mask, task, gran))
  tm = torch_model.SkyMoEForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
  with torch.no_grad():
    theirs = tm(torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(tokens).long(),
                torch.from_numpy(mask), torch.from_numpy(task).long(),
                torch.from_numpy(gran).long()).numpy()
  return float(np.abs(ours - theirs)[mask].max())
