"""What an export folder holds, and the one reader of its config.json.

Both sides read an export: to_torch.load_export (back into JAX) and torch_model.from_pretrained
(plain PyTorch, no JAX; this file is shipped into every export with it). A damaged or foreign
folder must fail the same way on both, with one message naming the file and the field at
fault, not a JSONDecodeError, KeyError or AttributeError from deep inside building the model.
So the checks live here, in plain Python (this module imports nothing but the standard
library, as torch_model needs), and each side passes the error class it raises.

An export folder holds only the files an export writes (`is_export_file`): config.json,
model.safetensors or model-0000i-of-0000n.safetensors shards + model.safetensors.index.json,
tokenizer.model, and the files that make it a Hugging Face repository (interop/hf_repo.py):
the shipped code (SHIPPED_CODE), generation_config.json and the processor's files. Its
config.json has a `skymoe` section whose `model` is our model config (`REQUIRED` lists the
fields of it that the readers use) and whose `moe_layers` lists the MoE decoder layers. A model
that predicts its router's condition (skymoe.model.moe.condition 'predicted') also has
`condition_head`: the constants of the head's maths (logit_scale, rms_eps), which the torch
model computes with.
"""
import json
import os
import pathlib
import re
from typing import List, Optional

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
INDEX_FILE = 'model.safetensors.index.json'
TOKENIZER_FILE = 'tokenizer.model'
GENERATION_FILE = 'generation_config.json'
# The code that transformers' trust_remote_code runs: copied from skymoe_jax/interop/ as it is.
SHIPPED_CODE = ('torch_model.py', 'export_format.py', 'configuration_skymoe.py',
                'modeling_skymoe.py', 'processing_skymoe.py')
# What the processor's save_pretrained writes (hf_repo.write_processor).
PROCESSOR_FILES = ('tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja',
                   'processor_config.json', 'preprocessor_config.json')
ADAPTER_FOLDER = 'adapter'  # peft_export's PEFT adapter, beside its base
FORMAT_VERSION = 1  # of the skymoe section; a newer one is refused, not half-read
_SHARD = re.compile(r'model-\d{5}-of-\d{5}\.safetensors')

# skymoe.model fields the name table and the torch model read: a config.json without one of them
# is refused naming it, instead of failing mid-build with an AttributeError.
REQUIRED = {
    'vision': ('width', 'depth', 'num_heads', 'mlp_dim', 'patch_size', 'image_size',
               'feature_layer', 'norm_eps'),
    'llm': ('vocab_size', 'embed_dim', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim',
            'mlp_dim', 'rope_theta', 'norm_eps', 'tie_embeddings'),
    'moe': ('num_experts',),
    'lora': ('rank',),
}
REQUIRED_TOP = ('scan_layers', 'param_dtype')
REQUIRED_MOE = ('layers', 'top_k', 'renormalize', 'adaptive', 'mlp_dim')  # num_experts > 0
REQUIRED_ADAPTIVE = ('num_tasks', 'num_granularities', 'condition_dim')  # adaptive routers
# moe.condition: what routes an adaptive router, the tags or the condition head's prediction; a
# value outside these is a model the readers do not compute.
CONDITIONS = ('tags', 'predicted')
CONDITION_HEAD_FIELDS = ('logit_scale', 'rms_eps')  # skymoe.condition_head, when predicted
# llm.image_rope: the image tokens' rotary positions, 1-D or on the patch grid (model/rope.py);
# absent in exports written before it existed, which are '1d'.
IMAGE_ROPE = ('1d', '2d')


def is_export_file(name: str) -> bool:
  """Whether an export writes a file of this name (what --overwrite may replace)."""
  return name in (CONFIG_FILE, WEIGHTS_FILE, INDEX_FILE, TOKENIZER_FILE, GENERATION_FILE,
                  ADAPTER_FOLDER, *SHIPPED_CODE, *PROCESSOR_FILES) or bool(_SHARD.fullmatch(name))


def predicts_condition(model: dict) -> bool:
  """Whether a skymoe.model dict routes by its condition head (model/skymoe.py's rule)."""
  moe = model.get('moe') or {}
  return (isinstance(moe.get('num_experts'), int) and moe['num_experts'] > 0
          and bool(moe.get('adaptive')) and moe.get('condition', 'tags') == 'predicted')


def _kind(value) -> str:
  return {dict: 'object', list: 'list', str: 'str'}.get(type(value), type(value).__name__)


def missing_fields(model: dict) -> List[str]:
  """The REQUIRED fields absent from a skymoe.model dict ('llm' for a whole section)."""
  missing = [f for f in REQUIRED_TOP if f not in model]
  for section, fields in REQUIRED.items():
    if section not in model:
      missing.append(section)
      continue
    if isinstance(model[section], dict):
      missing += [f'{section}.{f}' for f in fields if f not in model[section]]
  moe = model.get('moe')
  if isinstance(moe, dict) and isinstance(moe.get('num_experts'), int) and moe['num_experts'] > 0:
    need = REQUIRED_MOE + (REQUIRED_ADAPTIVE if moe.get('adaptive') else ())
    missing += [f'moe.{f}' for f in need if f not in moe]
  return missing


def _path(p):
  """p itself when it is a path object already (the project passes epath paths, which may be
  bucket URLs), else pathlib.Path(p). This file ships in exports with torch and safetensors
  only, so it imports nothing of the project."""
  return p if isinstance(p, os.PathLike) and hasattr(p, 'read_text') else pathlib.Path(p)


def read_json(path, error=ValueError):
  """The JSON document of a file, or `error` naming the file (unreadable, not JSON)."""
  path = _path(path)
  try:
    text = path.read_text(encoding='utf-8')
  except (OSError, UnicodeDecodeError) as e:
    raise error(f'{path}: cannot be read ({type(e).__name__}: {e})') from None
  try:
    return json.loads(text)
  except ValueError as e:
    raise error(f'{path}: not JSON ({e}); a damaged or truncated file?') from None


def read_config(folder, error=ValueError, our_layout: bool = True) -> dict:
  """config.json of an export folder, checked: a JSON object with a `skymoe` section of a known
  format_version whose `model` holds every REQUIRED field, and (our_layout) tensors in our
  layout, not native_export's Qwen2-MoE one. Anything else raises `error` naming the file and
  what is wrong."""
  folder = _path(folder)
  path = folder / CONFIG_FILE
  if not path.is_file():
    raise error(f'{folder}: no {CONFIG_FILE} (not an export folder)')
  config = read_json(path, error)
  if not isinstance(config, dict):
    raise error(f'{path}: holds a JSON {_kind(config)}, not an object (not an export config)')
  skymoe = config.get('skymoe')
  if skymoe is None:
    raise error(f'{path} has no skymoe section: not a SkyMoE export (one of ours)')
  if not isinstance(skymoe, dict):
    raise error(f'{path}: the skymoe section is a {_kind(skymoe)}, not an object')
  version = skymoe.get('format_version')
  if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
    raise error(f'{path}: skymoe.format_version {version!r} is not one this code reads (<= '
                f'{FORMAT_VERSION}); export it again, or use the version that wrote it')
  model = skymoe.get('model')
  if not isinstance(model, dict):
    raise error(f'{path}: skymoe.model is missing or not an object (a damaged or hand-edited '
                'config.json?)')
  for section in REQUIRED:
    if section in model and not isinstance(model[section], dict):
      raise error(f'{path}: skymoe.model.{section} is not an object')
  missing = missing_fields(model)
  if missing:
    raise error(f'{path}: skymoe.model lacks {", ".join(missing)} (a damaged or hand-edited '
                'config.json?)')
  # Which layers are MoE (model/layout.py's answer, written at export): the torch model builds
  # its decoder from this list.
  layers, n = skymoe.get('moe_layers'), model['llm']['num_layers']
  experts = model['moe']['num_experts']
  if (not isinstance(layers, list) or not isinstance(n, int) or not isinstance(experts, int) or
      not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < n for i in layers) or
      bool(layers) != (experts > 0)):
    raise error(f'{path}: skymoe.moe_layers {layers!r} is not a list of decoder layer indices in '
                f'[0, {n}), non-empty exactly when moe.num_experts (here {experts}) > 0')
  condition = model['moe'].get('condition', 'tags')
  if experts > 0 and condition not in CONDITIONS:
    raise error(f'{path}: skymoe.model.moe.condition {condition!r} is not one this code computes '
                f'({", ".join(CONDITIONS)}); use the version that wrote it')
  image_rope = model['llm'].get('image_rope', '1d')
  if image_rope not in IMAGE_ROPE:
    raise error(f'{path}: skymoe.model.llm.image_rope {image_rope!r} is not one this code '
                f'computes ({", ".join(IMAGE_ROPE)}); use the version that wrote it')
  if predicts_condition(model):
    head = skymoe.get('condition_head')
    bad = [f for f in CONDITION_HEAD_FIELDS if not isinstance(head, dict) or isinstance(
        head.get(f), bool) or not isinstance(head.get(f), (int, float))]
    if bad:
      raise error(f'{path}: skymoe.condition_head.{bad[0]} is missing or not a number: a model '
                  "with moe.condition 'predicted' needs its condition head's constants (a "
                  'damaged or hand-edited config.json?)')
  if our_layout and skymoe.get('native') == 'qwen2_moe':
    raise error(f'{path}: a native transformers export (LLaVA + Qwen2-MoE, skymoe.native): load '
                'it with transformers.LlavaForConditionalGeneration, or export with '
                '--layout=skymoe for this reader')
  return config


def is_export(folder) -> Optional[dict]:
  """The config.json of `folder` if it is an export of ours (its skymoe section), else None."""
  path = _path(folder) / CONFIG_FILE
  try:
    config = json.loads(path.read_text(encoding='utf-8'))
  except (OSError, UnicodeDecodeError, ValueError):
    return None
  if isinstance(config, dict) and isinstance(config.get('skymoe'), dict):
    return config
  return None
