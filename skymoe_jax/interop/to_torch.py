"""Export: our parameters -> a Hugging Face model repository (safetensors + config.json).

  export_params(params, model_cfg, out)      any parameter tree (device or numpy arrays)
  export_workdir(workdir, out, step=None)    a training workdir's checkpoint (params only)

The folder holds model.safetensors (or model-0000i-of-0000n.safetensors shards plus
model.safetensors.index.json above `max_shard_bytes`), config.json and, when the workdir has
one, tokenizer.model; hf_repo.py adds what makes it a Hugging Face repository that
transformers' auto classes load (trust_remote_code): the shipped PyTorch code, config.json's
auto_map, generation_config.json and, with a tokenizer, the processor's files. Tensor names
come from from_hf.llava_table, the table the importers read with, so export followed by import
is an exact round trip.

Nothing already on disk is lost, and no folder looks complete before it is:
- `out` must be new or empty. An earlier export of ours (its config.json has a `skymoe`
  section, and it holds only the files an export writes) is replaced only with overwrite=True
  (--overwrite); a folder holding anything else is refused, --overwrite or not: an export never
  deletes what it did not write. A training workdir - the one exported, a folder inside it or
  containing it, or any folder holding a training config.json or checkpoints/ (or inside one) -
  is refused always (`check_out`).
- Everything is written into a hidden staging folder next to `out` (.OUT.partial-XXXX), which
  is renamed into place once complete; an earlier export is moved aside only then, and deleted
  after the new one is in place. A failed export removes its staging folder (a killed one
  leaves it, named partial), so `out` is either the old folder or the whole new one.

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
folder natively); an MoE model gets model_type 'skymoe_llava', which only our remote code
(configuration_skymoe.py, modeling_skymoe.py) reads, so no transformers class silently drops
its experts. Either way a `skymoe` section carries our whole model config and the MoE layer
indices, which torch_model.py (and import back into JAX) builds the model from;
export_format.py reads it, refusing a damaged or foreign one naming the file and field. A model
that predicts its router's condition (model.moe.condition='predicted') exports its condition
head (`condition_head.{weight, bias}`) and the constants of its maths (skymoe.condition_head:
model/skymoe.py's logit scale and unit-RMS epsilon), so the PyTorch model predicts exactly as
ours when it is given no task / granularity ids. The
vision tower is exported with the blocks we have, up to the feature layer, so HF reads its
features at vision_feature_layer=-1 (the last exported block: the same tensor as the original
tower's feature_layer); the post-layernorm HF expects and LLaVA never uses is written as
identity.
"""
import json
import os
import pathlib
import shutil
import tempfile
import time
import uuid
from typing import Callable, Dict, List, NamedTuple, Optional

import jax
import ml_collections
import numpy as np
from safetensors.numpy import save_file

from skymoe_jax import config as config_lib
from skymoe_jax import storage
from skymoe_jax import workdir as workdir_lib
from skymoe_jax.config import num_feature_layers
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.interop import export_format, from_hf, hf_repo
from skymoe_jax.model import factory, layout, lora, skymoe as skymoe_lib

FORMAT_VERSION = export_format.FORMAT_VERSION
DEFAULT_MAX_SHARD_BYTES = 5 * 10 ** 9  # '5GB', transformers' save_pretrained default
DTYPES = {'fp32': 'float32', 'float32': 'float32', 'bf16': 'bfloat16', 'bfloat16': 'bfloat16'}
CONFIG_FILE = export_format.CONFIG_FILE
WEIGHTS_FILE = export_format.WEIGHTS_FILE
INDEX_FILE = export_format.INDEX_FILE


class ExportError(ValueError):
  """The parameters do not fit the export table; the message names the parameter."""


def check_exportable(model_cfg) -> None:
  """Refuses, naming the field, a model the PyTorch side does not implement: a router condition
  other than the tags or the condition head's prediction (export_format.CONDITIONS)."""
  condition = model_cfg.moe.get('condition', 'tags')
  if model_cfg.moe.num_experts > 0 and condition not in export_format.CONDITIONS:
    raise ExportError(
        f'config.model.moe.condition={condition!r}: the PyTorch model routes by the tags or by '
        f'its condition head only ({", ".join(map(repr, export_format.CONDITIONS))})')


class OutputFolderError(FileExistsError):
  """--out is a folder an export may not (re)place; the message says why and what to do."""


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
  if skymoe_lib.predicts_condition(model_cfg):
    skymoe['condition_head'] = {'logit_scale': float(skymoe_lib.CONDITION_LOGIT_SCALE),
                                'rms_eps': skymoe_lib.CONDITION_RMS_EPS}
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
  check_exportable(model_cfg)
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


# ------------------------------------------------------------------------- the output folder


def _training_workdir(folder: pathlib.Path, strict: bool) -> Optional[str]:
  """What makes `folder` a training workdir, or None. strict (for the folders above --out):
  only a training config.json counts, since a checkpoints/ folder alone is too common a name
  to refuse every folder under one."""
  if not strict and (folder / workdir_lib.CHECKPOINTS).is_dir():
    return f'it holds {workdir_lib.CHECKPOINTS}/'
  path = folder / workdir_lib.CONFIG_FILE
  if not path.is_file():
    return None
  try:
    config = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, UnicodeDecodeError, ValueError):
    return None
  if (isinstance(config, dict) and 'skymoe' not in config and
      isinstance(config.get('model'), dict) and isinstance(config.get('train'), dict)):
    return f'its {workdir_lib.CONFIG_FILE} is a training config'
  return None


_NEVER_A_WORKDIR = 'an export never writes into a training workdir: choose an --out outside it'


def check_out(out, overwrite: bool = False, workdir=None) -> pathlib.Path:
  """The resolved `out` if an export may write it (see the module docstring), else raises
  OutputFolderError saying why. `workdir`: the one being exported, never written into."""
  out = storage.resolve(out)
  if workdir is not None:
    workdir = workdir_lib.resolve(workdir)
    if out == workdir or workdir in out.parents:
      where = 'is' if out == workdir else 'is inside'
      raise OutputFolderError(f'--out {out} {where} the workdir {workdir} being exported: '
                              f'{_NEVER_A_WORKDIR}')
    if out in workdir.parents:
      raise OutputFolderError(f'--out {out} contains the workdir {workdir} being exported: '
                              f'{_NEVER_A_WORKDIR}')
  for folder in (out, *_parents(out)):
    why = _training_workdir(folder, strict=folder != out)
    if why:
      where = '' if folder == out else f' is inside {folder}, which'
      raise OutputFolderError(f'--out {out}{where} is a training workdir ({why}): '
                              f'{_NEVER_A_WORKDIR}')
  if not out.exists():
    return out
  if not out.is_dir():
    raise OutputFolderError(f'--out {out} exists and is not a folder')
  entries = sorted(p.name for p in out.iterdir())
  if not entries:
    return out
  earlier = export_format.is_export(out)
  if earlier is None:
    listing = ', '.join(entries[:5]) + (f' and {len(entries) - 5} more' if len(entries) > 5
                                        else '')
    raise OutputFolderError(f'--out {out} is not empty ({listing}) and not an export of ours: '
                            'an export writes only a new or empty folder, or replaces an '
                            'earlier export with --overwrite; choose another --out')
  foreign = [n for n in entries if not export_format.is_export_file(n)]
  if foreign:
    raise OutputFolderError(f'--out {out} holds an earlier export but also {", ".join(foreign)}'
                            ', which an export does not write (and so never deletes): move '
                            'them out or choose another --out')
  if not overwrite:
    info = earlier['skymoe']
    made = (f' (step {info["step"]} of {info["workdir"]})'
            if 'step' in info and 'workdir' in info else '')
    raise OutputFolderError(f'--out {out} holds an earlier export{made}: pass --overwrite '
                            '(overwrite=True) to replace it, or choose another --out')
  return out


def _parents(out) -> list:
  """out's parent folders; of a bucket URL those inside the bucket (gs://b/x: gs://b)."""
  if not storage.is_remote(out):
    return list(out.parents)
  return [p for p in out.parents if storage.is_remote(p) and str(p).rstrip('/').count('/') >= 2]


def _sibling(out: pathlib.Path, what: str) -> pathlib.Path:
  """A hidden name next to `out` that nothing else uses (same filesystem: renames are atomic)."""
  return out.parent / f'.{out.name}.{what}-{uuid.uuid4().hex[:12]}'


def _publish(staging: pathlib.Path, out: pathlib.Path, overwrite: bool, workdir) -> None:
  """Renames the complete `staging` folder to `out`. An earlier export there (checked again:
  time has passed) is moved aside first and deleted only once the new one is in place."""
  check_out(out, overwrite, workdir)
  if out.is_dir() and any(out.iterdir()):
    old = _sibling(out, 'replaced')
    os.rename(out, old)
    try:
      os.rename(staging, out)
    except BaseException:
      os.rename(old, out)
      raise
    shutil.rmtree(old, ignore_errors=True)
  else:
    os.rename(staging, out)  # onto an empty folder too (POSIX rename replaces it)


def _write_folder(folder: pathlib.Path, tensors, shards, config: dict, copies,
                  write_more: Optional[Callable[[pathlib.Path], None]] = None) -> List[str]:
  """The export's files into `folder` (write_more adds its own last, e.g. the Hugging Face
  files); returns the weight files' names."""
  meta = {'format': 'pt', 'producer': 'skymoe_jax'}
  if len(shards) == 1:
    files = [WEIGHTS_FILE]
    write_shard(folder / WEIGHTS_FILE, shards[0], meta)
  else:
    files = [shard_name(i, len(shards)) for i in range(len(shards))]
    for fname, shard in zip(files, shards):
      write_shard(folder / fname, shard, meta)
    index = {'metadata': {'total_size': sum(t.nbytes for t in tensors)},
             'weight_map': {t.name: fname for fname, shard in zip(files, shards) for t in shard}}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1) + '\n')
  (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + '\n')
  for name, source in (copies or {}).items():
    storage.copy_file(source, folder / name)
  if write_more is not None:
    write_more(folder)
  return files


def _repo_writer(model_cfg, config: dict, tokenizer_path, data_cfg, image_token_index: int):
  """Makes `config` a remote-code config (auto_map) and returns the function that writes the
  Hugging Face files (hf_repo.py); the tokenizer is read and converted here, before any weight
  is written, so a bad one fails the export early, naming the file."""
  config['auto_map'] = dict(hf_repo.MODEL_AUTO_MAP)
  if model_cfg.moe.num_experts:
    config['auto_map'].update(hf_repo.CONFIG_AUTO_MAP)
    config['architectures'] = [hf_repo.MODEL_CLASS]
  tokenizer = processor = None
  if tokenizer_path is not None:
    tokenizer = read_tokenizer(tokenizer_path)
    data_cfg = data_cfg if data_cfg is not None else config_lib.base_config().data
    try:
      processor = hf_repo.make_processor(tokenizer, model_cfg, data_cfg, image_token_index)
    except ImportError as e:
      raise ExportError(f'the export\'s processor needs transformers ({e}): pip install -e '
                        '".[export]"') from None

  def write(folder: pathlib.Path):
    hf_repo.copy_code(folder)
    hf_repo.write_generation_config(folder, tokenizer)
    if processor is not None:
      hf_repo.write_processor(folder, processor)
  return write


def export_params(params, model_cfg, out, dtype: str = 'float32',
                  max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, image_token_index: int = 0,
                  extra: Optional[dict] = None, overwrite: bool = False,
                  copies: Optional[Dict[str, pathlib.Path]] = None, workdir=None,
                  data_cfg=None) -> Dict:
  """Writes `params` (an unboxed tree; LoRA adapters are merged) as a Hugging Face repository
  `out`, atomically: `out` is refused unless check_out allows it (overwrite: replace an earlier
  export of ours), and appears only once complete.

  copies: {file name in the export: source file} copied in with the weights (tokenizer.model:
  the processor is made from it); workdir: the training workdir the params come from, which
  `out` must stay out of; data_cfg: the run's config.data (chat template, pad_to_square) for the
  processor, default the base config's.
  Returns {'files', 'num_tensors', 'total_bytes', 'seconds'}.
  """
  start = time.perf_counter()
  dtype = DTYPES.get(dtype, dtype)
  out = check_out(out, overwrite, workdir)
  if model_cfg.lora.rank > 0:
    params = lora.merge_lora(params, model_cfg.lora.alpha)
  tensors = export_tensors(params, model_cfg, dtype)  # a parameter at fault fails here
  config = hf_config(model_cfg, dtype, image_token_index, extra)
  repo = _repo_writer(model_cfg, config, (copies or {}).get(export_format.TOKENIZER_FILE),
                      data_cfg, image_token_index)
  files = write_export(out, tensors, config, max_shard_bytes, copies, overwrite, workdir, repo)
  return {'files': files, 'num_tensors': len(tensors),
          'total_bytes': sum(t.nbytes for t in tensors),
          'seconds': time.perf_counter() - start}


def write_export(out, tensors: List[Tensor], config: dict,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                 copies: Optional[Dict[str, pathlib.Path]] = None, overwrite: bool = False,
                 workdir=None, write_more: Optional[Callable[[pathlib.Path], None]] = None
                 ) -> List[str]:
  """The one writer of every export layout (ours, native_export's, peft_export's): `tensors`
  sharded by max_shard_bytes, config.json, `copies` and whatever write_more(folder) adds, into
  a staging folder next to `out`, renamed into place once complete (check_out's rules).
  Returns the weight files' names."""
  out = check_out(out, overwrite, workdir)
  shards = plan_shards(tensors, max_shard_bytes)
  if storage.is_remote(out):
    return _write_remote(out, tensors, shards, config, copies, overwrite, workdir, write_more)
  out.parent.mkdir(parents=True, exist_ok=True)
  staging = _sibling(out, 'partial')
  staging.mkdir()
  try:
    files = _write_folder(staging, tensors, shards, config, copies, write_more)
    _publish(staging, out, overwrite, workdir)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  return files


def _write_remote(out, tensors, shards, config: dict, copies, overwrite: bool, workdir,
                  write_more) -> List[str]:
  """write_export into a bucket, which has no rename: the folder is written complete in a
  local temporary folder (safetensors and transformers write local files), checked again, an
  earlier export's files deleted (overwrite), then each file uploaded, config.json last: an
  object appears only once uploaded, and a loader looks for config.json first."""
  with tempfile.TemporaryDirectory(prefix='skymoe_export_') as tmp:
    staging = pathlib.Path(tmp)
    files = _write_folder(staging, tensors, shards, config, copies, write_more)
    check_out(out, overwrite, workdir)
    if out.is_dir():
      for old in out.iterdir():  # check_out allowed only an export of ours here
        old.rmtree() if old.is_dir() else old.unlink()
    names = sorted(staging.rglob('*'), key=lambda p: (p.name == export_format.CONFIG_FILE, p))
    for path in names:
      if path.is_file():
        storage.copy_file(path, out / path.relative_to(staging).as_posix())
  return files


# ------------------------------------------------------------------------- from a workdir


def read_tokenizer(path) -> tokenizer_lib.Tokenizer:
  """The sentencepiece model at `path`, or ExportError naming it."""
  try:
    return tokenizer_lib.Tokenizer(path)
  except (OSError, RuntimeError) as e:
    raise ExportError(f'{path}: not a sentencepiece model ({type(e).__name__}: {e}); the '
                      'export\'s processor is made from it') from None


def image_token_id(tokenizer_path) -> int:
  """The tokenizer's `<image>` piece when it has one (ours do), else its unk id (LLaMA's
  tokenizer.model has none; unk never appears in text that byte fallback encodes)."""
  tok = read_tokenizer(tokenizer_path)
  return int(tok.piece_to_id('<image>'))  # sentencepiece answers unk for a missing piece


def export_workdir(workdir, out, step: Optional[int] = None, dtype: str = 'float32',
                   max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
                   image_token_index: Optional[int] = None, overwrite: bool = False,
                   write: Optional[Callable] = None,
                   check: Optional[Callable] = None) -> Dict:
  """Exports a training workdir's checkpoint (default its latest) to `out`, tokenizer included,
  with `write` (export_params' signature; default export_params: our layout). `out` and
  check(model config) come first, so a refused export costs no restore."""
  write = write or export_params
  workdir = workdir_lib.resolve(workdir)
  out = check_out(out, overwrite, workdir)
  config = workdir_lib.read_config(workdir)
  check_exportable(config.model)
  if check is not None:
    check(config.model)
  step, params = workdir_lib.restore_params(config, workdir, step)
  tokenizer = workdir_lib.tokenizer_path(workdir)
  if image_token_index is None:
    image_token_index = image_token_id(tokenizer) if tokenizer.exists() else 0
  copies = {export_format.TOKENIZER_FILE: tokenizer} if tokenizer.exists() else None
  info = write(params, config.model, out, dtype, max_shard_bytes, image_token_index,
               extra={'step': int(step), 'workdir': str(workdir)}, overwrite=overwrite,
               copies=copies, workdir=workdir, data_cfg=config.data)
  info.update(step=int(step), config=config, params=params)
  return info


def load_export(folder, dtype=None):
  """(params, model config) of an exported folder, back in our layout (exact for fp32).

  A damaged or foreign config.json raises CheckpointFileError naming the file and the field.
  """
  folder = pathlib.Path(folder)
  config = export_format.read_config(folder, from_hf.CheckpointFileError)
  model_cfg = ml_collections.ConfigDict(config['skymoe']['model'])
  head = config['skymoe'].get('condition_head')
  ours = {'logit_scale': skymoe_lib.CONDITION_LOGIT_SCALE,
          'rms_eps': skymoe_lib.CONDITION_RMS_EPS}
  if skymoe_lib.predicts_condition(model_cfg) and any(head[k] != v for k, v in ours.items()):
    raise from_hf.CheckpointFileError(
        f'{folder / CONFIG_FILE}: skymoe.condition_head {head} is not the condition head this '
        f'model computes ({ours}): use the version that wrote the export')
  return from_hf.llava_params(from_hf.open_checkpoint(folder), model_cfg, dtype), model_cfg


def _jax_logits(params, config, batch: int, text_len: int, seed: int, image_token: int):
  """Our model's logits on random inputs, and the inputs: images, text avoiding the image
  placeholder id, the second row right-padded as the input pipeline pads, random task and
  granularity ids (which route nothing when the condition head predicts; the PyTorch side then
  gets none). The JAX side runs dropless (the capacity backend would drop tokens the PyTorch
  models keep)."""
  config = ml_collections.ConfigDict(config.to_dict())
  if config.model.moe.backend == 'capacity':
    config.model.moe.backend = 'dense'
  config.model.moe.ep_strategy = 'none'
  v, llm, m = config.model.vision, config.model.llm, config.model.moe
  rng = np.random.default_rng(seed)
  x = {'images': rng.normal(size=(batch, v.image_size, v.image_size, 3)).astype(np.float32),
       'tokens': rng.integers(0, llm.vocab_size, size=(batch, text_len)).astype(np.int32),
       'mask': np.ones((batch, text_len), bool),
       'task': rng.integers(0, max(m.num_tasks, 1), size=(batch,)).astype(np.int32),
       'gran': rng.integers(0, max(m.num_granularities, 1), size=(batch,)).astype(np.int32)}
  x['tokens'][x['tokens'] == image_token] = (image_token + 1) % llm.vocab_size
  x['mask'][1:, text_len // 2:] = False
  model = factory.create_model(config)
  ours = jax.jit(lambda p, *a: model.apply({'params': p}, *a)[0])(
      params, x['images'], x['tokens'], x['mask'], x['task'], x['gran'])
  return np.asarray(ours), x


def verify_export(out, params, config, batch: int = 2, text_len: int = 16, seed: int = 0
                  ) -> float:
  """Max |logit difference| between torch_model on the export `out` and our model on `params`
  (the original tree, LoRA unmerged), on the same random inputs; real positions only."""
  import torch  # pylint: disable=import-outside-toplevel
  from skymoe_jax.interop import torch_model  # pylint: disable=import-outside-toplevel
  ours, x = _jax_logits(params, config, batch, text_len, seed, image_token=-1)
  tm = torch_model.SkyMoEForConditionalGeneration.from_pretrained(out, dtype=torch.float32)
  t = {k: torch.from_numpy(v) for k, v in x.items()}
  tags = () if tm.predicted else (t['task'].long(), t['gran'].long())
  with torch.no_grad():
    theirs = tm(t['images'].permute(0, 3, 1, 2), t['tokens'].long(), t['mask'], *tags).numpy()
  return float(np.abs(ours - theirs)[x['mask']].max())


def verify_hf_export(out, params, config, batch: int = 2, text_len: int = 16, seed: int = 0,
                     native: bool = False, adapter=None) -> float:
  """As verify_export, through transformers on LLaVA's layout (the image placeholders, then the
  text): AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True), or with
  native=True LlavaForConditionalGeneration without remote code (native_export's folders; with
  `adapter`, a PEFT adapter folder applied by peft.PeftModel). Max |logit difference| over the
  real text positions."""
  import torch  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  image_token = int(export_format.read_config(out, our_layout=False)['image_token_index'])
  ours, x = _jax_logits(params, config, batch, text_len, seed, image_token)
  if native:
    hf = transformers.LlavaForConditionalGeneration.from_pretrained(
        out, dtype=torch.float32, attn_implementation='eager')
    if adapter is not None:
      import peft  # pylint: disable=import-outside-toplevel
      hf = peft.PeftModel.from_pretrained(hf, adapter)
  else:
    hf = transformers.AutoModelForImageTextToText.from_pretrained(
        out, trust_remote_code=True, dtype=torch.float32)
  v = config.model.vision
  nv = (v.image_size // v.patch_size) ** 2
  ids = np.concatenate([np.full((batch, nv), image_token, np.int64), x['tokens']], axis=1)
  attention = np.concatenate([np.ones((batch, nv), bool), x['mask']], axis=1)
  inputs = dict(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attention),
                pixel_values=torch.from_numpy(x['images']).permute(0, 3, 1, 2))
  if not native and not skymoe_lib.predicts_condition(config.model):  # the tags that route
    inputs.update(task_ids=torch.from_numpy(x['task']).long(),
                  granularity_ids=torch.from_numpy(x['gran']).long())
  with torch.no_grad():
    theirs = hf.eval()(**inputs).logits[:, nv:].numpy()
  return float(np.abs(ours - theirs)[x['mask']].max())
