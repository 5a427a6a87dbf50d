"""python -m skymoe_jax.export --workdir=DIR --out=OUT [--step=N] [--dtype=bf16|fp32]
                              [--max_shard_size=5GB] [--image_token_index=ID] [--verify]
                              [--overwrite] [--layout=skymoe|native] [--lora=merged|adapter]

Exports a training workdir's checkpoint (default the latest) as a Hugging Face model repository:
OUT/model.safetensors (or model-0000i-of-0000n.safetensors + model.safetensors.index.json),
OUT/config.json (LlavaConfig for dense models + our `skymoe` section + auto_map),
OUT/tokenizer.model, generation_config.json (greedy, eos / pad of the tokenizer), the processor
(tokenizer.json, chat_template.jinja, processor_config.json, preprocessor_config.json) and the
PyTorch code transformers runs (torch_model.py, modeling_skymoe.py, ...; interop/hf_repo.py).
LoRA is merged; the files are written one shard at a time with the safetensors library, so the
host holds about one --max_shard_size of tensors (interop/to_torch.py). Load OUT, MoE or dense,
with transformers.AutoModelForImageTextToText.from_pretrained(OUT, trust_remote_code=True) and
AutoProcessor.from_pretrained(OUT, trust_remote_code=True) (docs/pytorch.md); dense exports also
with transformers.LlavaForConditionalGeneration.from_pretrained(OUT), and every export with
skymoe_jax.interop.torch_model.SkyMoEForConditionalGeneration.from_pretrained(OUT). --verify
runs the PyTorch model and the transformers one against ours on the same random inputs and
prints the max abs logit differences.

--layout=native writes transformers' own layout instead (interop/native_export.py): LLaVA-LLaMA
for dense models, LLaVA with a Qwen2-MoE text model for MoE models with the plain router, loaded
by LlavaForConditionalGeneration without trust_remote_code; a model it cannot express exactly
(the adaptive router) is refused naming the field. --lora=adapter (with --layout=native, for
the stage-I model) leaves LoRA unmerged: OUT holds the base and OUT/adapter a PEFT adapter
(interop/peft_export.py); merged is the default.

OUT must be new or empty; it appears only once complete (written next to it, then renamed).
--overwrite replaces an earlier export of ours there, and nothing else: a folder holding files
an export does not write, or a training workdir (DIR itself, a folder inside or around it, any
folder with a training config.json or checkpoints/), is refused with or without it.
"""
import re
import resource

from absl import app
from absl import flags

from skymoe_jax.interop import native_export, peft_export, to_torch
from skymoe_jax import cli
from skymoe_jax import storage

_UNITS = {'': 1, 'B': 1, 'KB': 10 ** 3, 'MB': 10 ** 6, 'GB': 10 ** 9, 'KIB': 2 ** 10,
          'MIB': 2 ** 20, 'GIB': 2 ** 30}


def parse_size(text: str) -> int:
  """'5GB', '200MiB', '1000000' -> bytes."""
  m = re.fullmatch(r'\s*([0-9.]+)\s*([A-Za-z]*)\s*', text)
  if not m or m.group(2).upper() not in _UNITS:
    raise ValueError(f'--max_shard_size={text!r}: expected a number with an optional unit '
                     f'({", ".join(u for u in _UNITS if u)})')
  return int(float(m.group(1)) * _UNITS[m.group(2).upper()])


def define_flags():
  flags.DEFINE_string('workdir', None, 'The training workdir (config.json, checkpoints/).')
  flags.DEFINE_string('out', None, 'Output folder.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')
  flags.DEFINE_enum('dtype', 'fp32', sorted(to_torch.DTYPES), 'Dtype of the written tensors.')
  flags.DEFINE_string('max_shard_size', '5GB', 'Largest safetensors file before sharding.')
  flags.DEFINE_integer('image_token_index', None, 'config.json image_token_index (HF LLaVA); '
                       'default the tokenizer\'s <image> piece, else its unk id.')
  flags.DEFINE_bool('verify', False, 'Compare PyTorch and JAX logits on random inputs.')
  flags.DEFINE_bool('overwrite', False, 'Replace an earlier export of ours in --out (never '
                    'anything else: other files, a training workdir).')
  flags.DEFINE_enum('layout', 'skymoe', ['skymoe', 'native'], 'skymoe: our layout, every model '
                    '(transformers with trust_remote_code); native: transformers\' LLaVA / '
                    'Qwen2-MoE layout, no remote code, where it is exact.')
  flags.DEFINE_enum('lora', 'merged', ['merged', 'adapter'], 'merged: LoRA folded into the '
                    'weights; adapter: the base plus a PEFT adapter in OUT/adapter (needs '
                    '--layout=native).')
  flags.mark_flags_as_required(['workdir', 'out'])


def main(argv):
  cli.check_no_arguments(argv)
  cli.quiet_library_logs()
  f = flags.FLAGS
  if f.lora == 'adapter' and f.layout != 'native':
    raise app.UsageError('--lora=adapter: the adapter\'s base is the native layout, which '
                         'LlavaForConditionalGeneration loads; add --layout=native')
  export = {('skymoe', 'merged'): to_torch.export_workdir,
            ('native', 'merged'): native_export.export_workdir,
            ('native', 'adapter'): peft_export.export_workdir}[f.layout, f.lora]
  try:
    info = export(f.workdir, f.out, f.step, f.dtype, parse_size(f.max_shard_size),
                  f.image_token_index, overwrite=f.overwrite)
  except native_export.NotExpressibleError as e:  # a choice of flags, not a failure
    raise app.UsageError(f'--layout=native: {e}') from None
  print(f'exported step {info["step"]}: {info["num_tensors"]} tensors, '
        f'{info["total_bytes"] / 1e6:.1f} MB in {len(info["files"])} file(s), '
        f'{info["seconds"]:.1f} s -> {f.out}')
  if f.verify:
    # transformers and safetensors load local files: a gs:// --out is copied to a temporary
    # folder for the check (a local one is used as it is).
    with storage.local_folder(f.out) as local:
      verify(f, str(local), info)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10
  print(f'peak host memory (max RSS) {peak:.0f} MiB')


def verify(f, out: str, info) -> None:
  """--verify: the export in the local folder `out` against the JAX model's logits."""
  if f.layout == 'native':
    adapter = f'{out}/{peft_export.ADAPTER_FOLDER}' if f.lora == 'adapter' else None
    diff = native_export.verify_native(out, info['params'], info['config'], adapter)
    print(f'verify: max abs logit difference transformers LlavaForConditionalGeneration'
          f'{" + PEFT adapter" if adapter else ""} vs JAX = {diff:.3g}')
  else:
    diff = to_torch.verify_export(out, info['params'], info['config'])
    print(f'verify: max abs logit difference PyTorch vs JAX = {diff:.3g}')
    diff = to_torch.verify_hf_export(out, info['params'], info['config'])
    print(f'verify: max abs logit difference transformers AutoModelForImageTextToText vs JAX = '
          f'{diff:.3g}')


if __name__ == '__main__':
  cli.run(main, define_flags)
