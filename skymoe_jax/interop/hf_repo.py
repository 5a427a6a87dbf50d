"""The Hugging Face repository files of an export, beside its weights and config.json (to_torch).

  auto_map (in config.json)   AutoConfig / AutoModelForImageTextToText -> the shipped code
  *.py (SHIPPED_CODE)         torch_model.py, export_format.py (its config reader), and the
                              transformers wrappers configuration_skymoe.py, modeling_skymoe.py,
                              processing_skymoe.py: copied from this folder, the very files the
                              repository runs, so the exported code is never a second copy
  generation_config.json      bos / eos / pad of the tokenizer, greedy, max_new_tokens
  tokenizer.json ...          the run's sentencepiece model as a transformers tokenizer
                              (TokenizersBackend, converted here and checked token for token
                              against ours), tokenizer_config.json
  chat_template.jinja         the run's chat template (data/template.py) as a Jinja template
  processor_config.json       SkyMoEProcessor: image token id and count, the system prompt, the
                              task-tag table and keyword rules (data/tasks.py), the model's
                              condition mode (a predicted condition: no inferred router ids)
  preprocessor_config.json    SkyMoEImageProcessor: resolution, pad_to_square, CLIP mean / std

so that `AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)` and
`AutoProcessor.from_pretrained(out, trust_remote_code=True)` load the export with torch and
transformers alone, and `model.generate(**processor(images=..., text=...))` answers as the chat
command does. Dense exports keep model_type 'llava', so LlavaForConditionalGeneration loads
them natively too, with the same processor and generation config.
"""
import json
import pathlib
import shutil
from typing import Dict, Optional

from skymoe_jax.data import image_ops, tasks
from skymoe_jax.data import template as template_lib
from skymoe_jax.data import tokenizer as tokenizer_lib

from skymoe_jax.interop.export_format import GENERATION_FILE, SHIPPED_CODE
from skymoe_jax.model.skymoe import predicts_condition

HERE = pathlib.Path(__file__).resolve().parent
MODEL_AUTO_MAP = {'AutoModelForImageTextToText': 'modeling_skymoe.SkyMoEForImageTextToText'}
# MoE exports only: a dense one keeps LLaVA's own config class (its model_type is 'llava'), which
# both LlavaForConditionalGeneration and our model read.
CONFIG_AUTO_MAP = {'AutoConfig': 'configuration_skymoe.SkyMoEConfig'}
PROCESSOR_AUTO_MAP = {'AutoProcessor': 'processing_skymoe.SkyMoEProcessor',
                      'AutoImageProcessor': 'processing_skymoe.SkyMoEImageProcessor'}
MODEL_CLASS = 'SkyMoEForImageTextToText'
DEFAULT_MAX_NEW_TOKENS = 128  # the chat command's


class HFRepoError(ValueError):
  """The Hugging Face files cannot be made as they must be (the message names why)."""


def copy_code(folder: pathlib.Path) -> None:
  for name in SHIPPED_CODE:
    shutil.copyfile(HERE / name, folder / name)


def write_generation_config(folder: pathlib.Path, tokenizer: Optional[tokenizer_lib.Tokenizer],
                            max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS) -> None:
  """Greedy decoding that stops at the tokenizer's eos (without one: the ids both kinds of
  tokenizer.model we read have, data/tokenizer.py)."""
  bos, eos, pad = ((tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) if tokenizer else
                   (tokenizer_lib.BOS_ID, tokenizer_lib.EOS_ID, 0))
  config = {'bos_token_id': int(bos), 'eos_token_id': int(eos), 'pad_token_id': int(pad),
            'do_sample': False, 'num_beams': 1, 'max_new_tokens': int(max_new_tokens),
            'use_cache': True}
  (folder / GENERATION_FILE).write_text(json.dumps(config, indent=1) + '\n')


def chat_template(template: template_lib.Template) -> str:
  """The Jinja form of template.render for a generation prompt: the system text, then each
  human turn as `USER: text ASSISTANT:` and each answer as ` text</s>` (the first human turn
  without its image placeholder, the image tokens going first). Messages: role user / human
  and assistant / gpt, content a string or a list of {type: text | image} parts."""
  t = template
  answer_role = (t.assistant_role + t.role_sep).rstrip()
  literal = lambda s: json.dumps(s, ensure_ascii=False)  # a Jinja string literal
  ph = t.image_placeholder
  return ''.join([
      '{%- for message in messages -%}',
      '{%- if (message["role"] in ["user", "human"]) != (loop.index0 % 2 == 0) -%}',
      '{{- raise_exception("turns must alternate user / assistant, starting with user") -}}',
      '{%- endif -%}',
      '{%- if message["content"] is string -%}{%- set text = message["content"] -%}',
      '{%- else -%}{%- set text = message["content"] | selectattr("type", "equalto", "text")',
      ' | map(attribute="text") | join("") -%}{%- endif -%}',
      f'{{%- if loop.first -%}}{{{{- {literal(t.system + t.system_sep)} -}}}}',
      f'{{%- set text = (text | replace({literal(ph + chr(10))}, "")',
      f' | replace({literal(chr(10) + ph)}, "") | replace({literal(ph)}, "")) | trim -%}}',
      '{%- endif -%}',
      '{%- if message["role"] in ["user", "human"] -%}',
      f'{{{{- {literal(t.user_role + t.role_sep)} + text + '
      f'{literal(t.turn_sep + answer_role)} -}}}}',
      '{%- elif message["role"] in ["assistant", "gpt"] -%}',
      f'{{{{- {literal(t.role_sep[len(t.role_sep.rstrip()):])} + (text | trim) + '
      f'{literal(t.eos)} -}}}}',
      '{%- else -%}{{- raise_exception("unknown role " + message["role"]) -}}',
      '{%- endif -%}',
      '{%- endfor -%}',
  ])


def routing_tables(template: template_lib.Template) -> Dict:
  """data/tasks.py's tag table and keyword rules as data for the shipped processor."""
  task, granularity = tasks.classify_untagged('')  # no keyword rule matches: the default
  return {
      'tasks': list(tasks.TASKS), 'granularities': list(tasks.GRANULARITIES),
      'tags': {name: [t.task_id, t.granularity_id] for name, t in tasks.TAGS.items()},
      'keyword_rules': [[pattern, tasks.task_id(task), tasks.granularity_id(granularity)]
                        for pattern, task, granularity in tasks.KEYWORD_RULES],
      'default': [tasks.task_id(task), tasks.granularity_id(granularity)],
      'image_prefix': tasks.IMAGE_PREFIX.pattern, 'tag_at_start': tasks.TAG_AT_START.pattern,
      # The first human turn of a rendered prompt lies between these two.
      'turn_start': template.system + template.system_sep + template.user_role + template.role_sep,
      'turn_end': template.turn_sep + (template.assistant_role + template.role_sep).rstrip(),
  }


def hf_tokenizer(tokenizer: tokenizer_lib.Tokenizer, template: template_lib.Template):
  """Our sentencepiece model as a transformers tokenizer (TokenizersBackend: tokenizer.json,
  loaded without sentencepiece), refused unless it encodes the template's texts, every task tag
  and placeholder in a question, boxes, counts and odd spacing exactly as ours does."""
  import tempfile  # pylint: disable=import-outside-toplevel
  import transformers  # pylint: disable=import-outside-toplevel
  sp = tokenizer._sp  # pylint: disable=protected-access
  special = {'bos_token': sp.id_to_piece(tokenizer.bos_id),
             'eos_token': sp.id_to_piece(tokenizer.eos_id),
             'unk_token': sp.id_to_piece(tokenizer.unk_id),
             'pad_token': sp.id_to_piece(tokenizer.pad_id)}
  with tempfile.TemporaryDirectory() as tmp:
    (pathlib.Path(tmp) / 'tokenizer.model').write_bytes(tokenizer.model_bytes)
    hf = transformers.TokenizersBackend.from_pretrained(tmp, **special)
  hf.padding_side = 'left'
  texts = tokenizer_lib.template_texts(template) + [
      f'{symbol} Where is the ship at {{<12><3><45><67>}}?  How many:  1 2  ok'
      for symbol in tokenizer_lib.user_symbols()]
  for text in texts:
    ours, theirs = tokenizer.encode(text), hf(text, add_special_tokens=False)['input_ids']
    if ours != theirs:
      raise HFRepoError(f'transformers\' tokenizer encodes {text!r} as {theirs}, ours as {ours}: '
                        'the export would not reproduce our prompts')
  return hf


def make_processor(tokenizer: tokenizer_lib.Tokenizer, model_cfg, data_cfg,
                   image_token_index: int):
  """The run's SkyMoEProcessor: its tokenizer (converted and checked), chat template, image
  processor and routing tables."""
  # The processor classes are the shipped ones; they are imported only here, with transformers.
  from skymoe_jax.interop import processing_skymoe  # pylint: disable=import-outside-toplevel
  template = template_lib.get_template(data_cfg.template)
  v = model_cfg.vision
  image = processing_skymoe.SkyMoEImageProcessor(
      image_size=v.image_size, pad_to_square=bool(data_cfg.pad_to_square),
      image_mean=image_ops.CLIP_MEAN.tolist(), image_std=image_ops.CLIP_STD.tolist())
  processor = processing_skymoe.SkyMoEProcessor(
      image, hf_tokenizer(tokenizer, template), chat_template=chat_template(template),
      image_token_id=image_token_index, num_image_tokens=(v.image_size // v.patch_size) ** 2,
      system_prompt=template.system, routing=routing_tables(template),
      condition='predicted' if predicts_condition(model_cfg) else 'tags')
  return processor


def write_processor(folder: pathlib.Path, processor) -> None:
  """The processor's files (PROCESSOR_FILES), each config pointing at the shipped classes."""
  processor.save_pretrained(str(folder))
  processor.image_processor.save_pretrained(str(folder))
  for name, auto_map in (('processor_config.json', PROCESSOR_AUTO_MAP),
                         ('preprocessor_config.json', PROCESSOR_AUTO_MAP),
                         ('tokenizer_config.json', {'AutoProcessor': PROCESSOR_AUTO_MAP[
                             'AutoProcessor']})):
    path = folder / name
    config = json.loads(path.read_text())
    config['auto_map'] = auto_map
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + '\n')
