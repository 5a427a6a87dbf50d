"""Stage I's LoRA as a PEFT adapter beside its base, instead of merged into the kernels.

  export_adapter(params, model_cfg, out)    OUT: the base, LoRA left out; OUT/adapter: the adapter
  export_workdir(workdir, out, step=None)   the same from a training workdir's checkpoint

The base is the native export (native_export: LLaVA-LLaMA for the dense stage-I model) of the
parameters with every `*_lora` adapter dropped, so LlavaForConditionalGeneration loads it
without remote code; OUT/adapter holds what `peft.PeftModel.from_pretrained(base, OUT/adapter)`
reads: adapter_config.json and adapter_model.safetensors. Base + adapter compute what the
merged export (the default) computes: the adapter's delta is ours, (alpha / r) x A B, which is
PEFT's LoRA scaling lora_alpha / r (use_rslora off) with r = model.lora.rank and lora_alpha =
model.lora.alpha.

Tensor names: PEFT's saved form, `base_model.model.<module>.lora_A.weight` ([r, in], our A
transposed) and `.lora_B.weight` ([out, r], our B flattened over heads and transposed), with
<module> the projection's name in our export's table (`language_model.model.layers.{i}.
self_attn.q_proj`): the names transformers 4 modules have, which PEFT maps onto transformers 5's
(`model.language_model.layers.{i}...`) on load, as it does for the base's tensors. The
target_modules pattern matches both and nothing in the vision tower (which has q_proj/v_proj
too). base_model_name_or_path is OUT as exported (AutoPeftModel and transformers' own adapter
loading read it; PeftModel.from_pretrained takes the base explicitly).

Both folders are one export: written aside and renamed into place together under to_torch's
rules for `out` (new or empty; --overwrite replaces an earlier export of ours only).
"""
import json
import pathlib
import time
from typing import Dict, List, Optional

import jax
import numpy as np

from skymoe_jax.interop import export_format, from_hf, native_export, to_torch
from skymoe_jax.model import layout, lora, skymoe

ADAPTER_FOLDER = export_format.ADAPTER_FOLDER
ADAPTER_CONFIG_FILE = 'adapter_config.json'
ADAPTER_WEIGHTS_FILE = 'adapter_model.safetensors'
HF_PROJECTIONS = {'query': 'q_proj', 'key': 'k_proj', 'value': 'v_proj'}  # our LoRA targets
PEFT_PREFIX = 'base_model.model.'  # PeftModel's wrapper, part of every saved adapter name


def check_adapter(model_cfg) -> None:
  """Refuses, naming the field, a model with no adapters or whose base is not native (a
  condition head first: whatever the LoRA rank, no native base can carry it)."""
  if skymoe.predicts_condition(model_cfg):
    raise native_export.NotExpressibleError(
        "model.moe.condition='predicted': the adapter's base is the native layout, which has no "
        'condition head (native_export); export merged with the default layout (--layout=skymoe '
        '--lora=merged), which carries it')
  if model_cfg.lora.rank <= 0:
    raise native_export.NotExpressibleError(f'model.lora.rank={model_cfg.lora.rank}: this model has no LoRA '
                               'adapters to export (stage II has them merged); use the merged '
                               'export (--lora=merged)')
  native_export.check_native(to_torch.exported_model_config(model_cfg))


def strip_lora(params):
  """The parameter tree without its `*_lora` adapters: the base model."""
  if not isinstance(params, dict):
    return params
  return {k: strip_lora(v) for k, v in params.items() if not k.endswith(lora.LORA_SUFFIX)}


def adapter_table(model_cfg) -> List[from_hf.Entry]:
  """lora_A / lora_B entries of every adapted projection, named after its table entry."""
  r, targets = model_cfg.lora.rank, set(model_cfg.lora.targets)
  table = []
  for e in from_hf.llava_table(to_torch.exported_model_config(model_cfg)):
    path = e.path or ()
    if len(path) != 5 or path[0] != 'decoder' or path[2] != 'attn' or path[3] not in targets:
      continue
    module, at = PEFT_PREFIX + e.name[:-len('.weight')], path[:3] + (path[3] + lora.LORA_SUFFIX,)
    table += [from_hf.Entry(module + '.lora_A.weight', at + ('a',), e.shape[:e.n_in] + (r,),
                            'linear', e.n_in),
              from_hf.Entry(module + '.lora_B.weight', at + ('b',), (r,) + e.shape[e.n_in:],
                            'linear', 1)]
  return table


def adapter_tensors(params, model_cfg, dtype: str = 'float32') -> List[to_torch.Tensor]:
  """The adapter's tensors, fetched lazily (on device, sliced per layer, as to_torch's are);
  every `*_lora` parameter must be in the table and of its shape."""
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  table = adapter_table(model_cfg)
  paths = [tuple(str(k.key) for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  leaves = {p for p in paths if any(k.endswith(lora.LORA_SUFFIX) for k in p)}
  covered = {layout.locate(model_cfg, e.path)[0] for e in table}
  if leaves - covered:
    raise to_torch.ExportError(f'parameter {"/".join(sorted(leaves - covered)[0])} is a LoRA '
                               'adapter the export does not know (model.lora.targets?)')
  if covered - leaves:
    raise to_torch.ExportError(f'parameter {"/".join(sorted(covered - leaves)[0])} is missing '
                               'from the parameters (is the config the one they were made with?)')
  tensors = []
  for e in table:
    def fetch(e=e):
      stored, index = layout.locate(model_cfg, e.path)
      a = from_hf.get_path(params, stored)
      host = np.asarray(jax.device_get(a[index] if index else a))
      if host.shape != tuple(e.shape):
        raise to_torch.ExportError(f'parameter {"/".join(stored)}{list(index)} has shape '
                                   f'{host.shape}, the config says {tuple(e.shape)}')
      return from_hf.to_hf(e, host).astype(np_dtype, copy=False)
    tensors.append(to_torch.Tensor(e.name, from_hf.hf_shape(e), np_dtype, fetch))
  return tensors


def adapter_config(model_cfg, base_path: str) -> dict:
  """adapter_config.json: a PEFT LoraConfig of our rank, alpha and projections."""
  names = '|'.join(sorted(HF_PROJECTIONS[t] for t in model_cfg.lora.targets))
  return {
      'peft_type': 'LORA', 'task_type': None, 'base_model_name_or_path': base_path,
      'r': int(model_cfg.lora.rank), 'lora_alpha': float(model_cfg.lora.alpha),
      'target_modules': rf'.*language_model\.(model\.)?layers\.\d+\.self_attn\.({names})',
      'lora_dropout': 0.0, 'bias': 'none', 'fan_in_fan_out': False, 'use_rslora': False,
      'use_dora': False, 'init_lora_weights': True, 'inference_mode': True,
      'modules_to_save': None,
  }


def export_adapter(params, model_cfg, out, dtype: str = 'float32',
                   max_shard_bytes: int = to_torch.DEFAULT_MAX_SHARD_BYTES,
                   image_token_index: int = 0, extra: Optional[dict] = None,
                   overwrite: bool = False, copies: Optional[Dict[str, pathlib.Path]] = None,
                   workdir=None, data_cfg=None) -> Dict:
  """Writes the base (LoRA not merged) into `out` and the PEFT adapter into out/adapter, as one
  export; arguments and result as to_torch.export_params ('adapter_files': the adapter's)."""
  del data_cfg
  start = time.perf_counter()
  dtype = to_torch.DTYPES.get(dtype, dtype)
  check_adapter(model_cfg)
  out = to_torch.check_out(out, overwrite, workdir)
  base_cfg = to_torch.exported_model_config(model_cfg)
  tensors = native_export.native_tensors(strip_lora(params), base_cfg, dtype)
  adapter = adapter_tensors(params, model_cfg, dtype)
  lm = model_cfg.lora
  extra = dict(extra or {}, lora_adapter={'folder': ADAPTER_FOLDER, 'rank': int(lm.rank),
                                          'alpha': float(lm.alpha), 'targets': list(lm.targets)})
  config = native_export.native_config(base_cfg, dtype, image_token_index, extra)

  write_generation_config = native_export.generation_config_writer(copies)

  def write_adapter(folder: pathlib.Path):
    write_generation_config(folder)
    (folder / ADAPTER_FOLDER).mkdir()
    to_torch.write_shard(folder / ADAPTER_FOLDER / ADAPTER_WEIGHTS_FILE, adapter,
                         {'format': 'pt', 'producer': 'skymoe_jax'})
    (folder / ADAPTER_FOLDER / ADAPTER_CONFIG_FILE).write_text(
        json.dumps(adapter_config(model_cfg, str(out)), indent=1) + '\n')

  files = to_torch.write_export(out, tensors, config, max_shard_bytes, copies, overwrite,
                                workdir, write_adapter)
  return {'files': files, 'num_tensors': len(tensors),
          'total_bytes': sum(t.nbytes for t in tensors),
          'adapter_files': [f'{ADAPTER_FOLDER}/{ADAPTER_CONFIG_FILE}',
                            f'{ADAPTER_FOLDER}/{ADAPTER_WEIGHTS_FILE}'],
          'adapter_bytes': sum(t.nbytes for t in adapter),
          'seconds': time.perf_counter() - start}


def export_workdir(workdir, out, step: Optional[int] = None, dtype: str = 'float32',
                   max_shard_bytes: int = to_torch.DEFAULT_MAX_SHARD_BYTES,
                   image_token_index: Optional[int] = None, overwrite: bool = False) -> Dict:
  """export_adapter on a (stage-I) training workdir's checkpoint, tokenizer included."""
  return to_torch.export_workdir(workdir, out, step, dtype, max_shard_bytes, image_token_index,
                                 overwrite, write=export_adapter, check=check_adapter)
