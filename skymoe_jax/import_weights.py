"""python -m skymoe_jax.import_weights --config=FILE:stage1 --workdir=DIR [--clip=CLIP_DIR]
                                     [--llm=LLAMA_DIR_or_FILE.gguf] [--config.FIELD=VALUE ...]

Makes a stage-I training workdir from pretrained Hugging Face weights, which
`python -m skymoe_jax.train --config=<same config> --workdir=DIR` then continues from:
  DIR/config.json          the resolved config
  DIR/checkpoints/0/       params (CLIP vision tower + LLaMA decoder converted, everything else
                           - projector, LoRA adapters - freshly initialised as the trainer does)
                           and a fresh optimizer state, with data state {next_step: 0, seed}
  DIR/tokenizer.model      copied from the LLM folder when it has one (else the trainer trains
                           one, whose ids would not match the LLM's vocabulary: a warning says so)

--clip: a CLIPVisionModel / CLIPModel folder (safetensors or .bin; the position grid is resized
bicubically to the configured resolution). --llm: a LlamaForCausalLM folder, or a LLaMA GGUF
file (dequantised to float32). Either may be left out to keep that part randomly initialised.
Files are never unpickled beyond torch.load(weights_only=True).

Nothing is adopted silently: what the tensor shapes cannot show (RoPE base, RMSNorm epsilon,
the head split, tied embeddings, extra layers) is read from the checkpoint's config.json (or the
GGUF metadata) and a disagreement with the config is refused, naming both values and the
--config.model.llm.* / --config.model.vision.* override that imports the checkpoint as it is
(from_hf.check_fields); without a config.json a warning says what went unchecked. Tensors with
NaN / inf values are logged by name; tensors sharing bytes in a file are refused.
"""
import pathlib

from absl import app
from absl import flags
from absl import logging
import jax
import ml_collections
import numpy as np

from skymoe_jax import cli
from skymoe_jax import config as config_lib
from skymoe_jax import storage
from skymoe_jax import workdir as workdir_lib
from skymoe_jax.interop import from_hf, gguf
from skymoe_jax.model import factory
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.training import optimizer as optimizer_lib
from skymoe_jax.training import state as state_lib


def read_llm(path):
  """(state dict, prefix, lm_head name) of a LLaMA folder, checkpoint file or GGUF file."""
  path = pathlib.Path(path).expanduser()
  if path.suffix == '.gguf':
    return gguf.read_gguf(path), 'model.', 'lm_head.weight'
  sd = from_hf.open_checkpoint(path)
  prefix = from_hf.find_prefix(sd, 'embed_tokens.weight', 'LLaMA')
  head = prefix[:-len('model.')] if prefix.endswith('model.') else prefix
  return sd, prefix, head + 'lm_head.weight'


def check_llm_config(path, sd, model_cfg) -> None:
  """Refuses an LLM whose own config (GGUF metadata, else the config.json next to it) disagrees
  with config.model.llm where the tensor shapes cannot tell (from_hf.check_fields)."""
  if isinstance(sd, gguf.GGUFStateDict):
    fields, fixed = sd.checked_fields()
    from_hf.check_fields(sd.path, 'model.llm', model_cfg.llm, fields, fixed,
                         only_more=('num_layers',))
  else:
    from_hf.check_hf_config(path, 'model.llm', model_cfg.llm, from_hf.llama_fields, 'LLaMA',
                            only_more=('num_layers',))


def convert_pretrained(model_cfg, clip=None, llm=None) -> dict:
  """{'vision': ..., 'decoder': ...} (numpy, our layout) of the parts given; the decoder has no
  LoRA adapters (they stay freshly initialised in the workdir). Each checkpoint's own config is
  checked against ours before any tensor is converted."""
  out = {}
  if clip:
    sd = from_hf.open_checkpoint(clip)
    from_hf.check_hf_config(clip, 'model.vision', model_cfg.vision, from_hf.clip_fields,
                            'CLIP vision')
    prefix = from_hf.find_prefix(sd, 'embeddings.patch_embedding.weight', 'CLIP vision')
    out['vision'] = from_hf.clip_vision_params(sd, model_cfg, prefix)
  if llm:
    if model_cfg.moe.num_experts > 0:
      raise config_lib.ConfigError(
          f'config.model.moe.num_experts={model_cfg.moe.num_experts}: pretrained weights go '
          'into a dense stage-I workdir (use the config\'s :stage1); stage II upcycles it')
    sd, prefix, head = read_llm(llm)
    check_llm_config(llm, sd, model_cfg)
    dense = ml_collections.ConfigDict(model_cfg.to_dict())
    dense.lora.rank = 0
    out['decoder'] = from_hf.llama_params(sd, dense, prefix, head)
  return out


def _replace(params, converted, path=()):
  """params with every leaf of `converted` put in its place (on the old leaf's sharding)."""
  if not isinstance(converted, dict):
    if tuple(params.shape) != tuple(converted.shape):
      raise from_hf.ConversionError(f'parameter {"/".join(path)}: converted shape '
                                    f'{converted.shape}, the model has {params.shape}')
    return jax.device_put(np.asarray(converted, params.dtype), params.sharding)
  out = dict(params)
  for k, v in converted.items():
    if k not in params:
      raise from_hf.ConversionError(f'parameter {"/".join(path + (k,))} is not in the model')
    out[k] = _replace(params[k], v, path + (k,))
  return out


def import_workdir(config, out, clip=None, llm=None) -> dict:
  """Writes the stage-I workdir `out` (see the module docstring); returns a summary."""
  config = ml_collections.ConfigDict(config.to_dict())
  factory.validate(config)
  out = workdir_lib.resolve(out)
  ckpt_dir = workdir_lib.checkpoint_dir(out)
  if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
    raise FileExistsError(f'{ckpt_dir} already holds checkpoints: import into a fresh workdir')
  converted = convert_pretrained(config.model, clip, llm)  # fails early, before any device work
  out.mkdir(parents=True, exist_ok=True)

  mesh = mesh_lib.create_mesh(config)
  model = factory.create_model(config)
  tx = optimizer_lib.for_run(config)
  state = state_lib.create_train_state(config, model, tx, mesh, jax.random.key(config.seed))
  _, shardings = state_lib.state_shardings(config, model, tx, mesh)
  state = state_lib.replace_params(state, _replace(state['params'], converted), tx, mesh, config,
                                   shardings)
  with workdir_lib.Checkpointer(ckpt_dir) as ckpt:
    ckpt.save(0, state, {'next_step': 0, 'seed': config.seed}, force=True)
    ckpt.wait()
  workdir_lib.write_config(config, out)

  tokenizer = None
  if llm:
    llm_path = pathlib.Path(llm).expanduser()
    candidate = (llm_path if llm_path.is_dir() else llm_path.parent) / 'tokenizer.model'
    if candidate.exists():
      tokenizer = workdir_lib.tokenizer_path(out)
      storage.copy_file(candidate, tokenizer)  # out may be gs://
    else:
      logging.warning('%s has no tokenizer.model: training will make its own tokenizer, whose '
                      'ids do not match the imported LLM vocabulary; pass '
                      '--config.data.tokenizer=PATH to the LLM\'s sentencepiece model', llm)
  return {'workdir': str(out), 'converted': sorted(converted), 'tokenizer': str(tokenizer or '')}


def define_flags():
  """Flags exist only when run as a program, so tests can import this module next to others."""
  cli.define_config_flag()
  cli.define_workdir_flag('The new stage-I workdir.')
  flags.DEFINE_string('clip', None, 'HF CLIPVisionModel / CLIPModel folder or checkpoint file.')
  flags.DEFINE_string('llm', None, 'HF LlamaForCausalLM folder or checkpoint file, or a .gguf.')


def main(argv):
  cli.check_no_arguments(argv)
  cli.quiet_library_logs()
  f = flags.FLAGS
  if not (f.clip or f.llm):
    raise app.UsageError('give --clip, --llm or both')
  print(import_workdir(f.config, f.workdir, f.clip, f.llm))


if __name__ == '__main__':
  cli.run(main, define_flags)
