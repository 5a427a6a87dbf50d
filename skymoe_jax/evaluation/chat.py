"""A loaded run that answers (image, question) pairs one at a time (the engine of the chat and
demo commands), and the held-out examples to ask it about.

The workdir's config.json and tokenizer.model rebuild the run; the parameters are restored
alone. The question's task tag or keywords set the router's task and granularity
(data/tasks.py), as in training; under model.moe.condition='predicted' the model's condition
head sets them from the prompt, and ask() reports the head's most likely task and granularity. An image is checked before anything slow: read_image names a
file that is missing or does not decode, and answer() refuses bytes that are not an image.

answer() gives the answer's text; ask() gives the same text with what the demo shows beside it:
the task and granularity the router was given, the boxes the answer names (parsed in the box
dialect evaluation scores) and the expert load of each MoE layer for this one question, measured
as evaluation measures it (routing.RoutingStats over one forward pass of the prompt: image and
question tokens).

held_out_examples(config) picks the first images of the eval split that have a question of
every task; write_examples puts them in a folder (the recipe: WORKDIR/examples), so chat and the
demo have images to try at once:
  <name>.png        each image (the eval record's bytes; other formats re-encoded as PNG)
  questions.jsonl   one row per question: {"image": "<name>.png", "task", "granularity", "tag"
                    (the task tag in the question, or null), "question", "answer" (the reference)}
read_examples reads such a folder back.
"""
import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Dict, List, Optional

import jax
import numpy as np

from skymoe_jax import storage
from skymoe_jax import workdir as workdir_lib
from skymoe_jax.data import boxes as boxes_lib
from skymoe_jax.data import image_ops, records, tasks, template as template_lib
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.evaluation import generate as generate_lib
from skymoe_jax.evaluation import prompts
from skymoe_jax.evaluation import routing as routing_lib
from skymoe_jax.evaluation import runner
from skymoe_jax.model import factory, layout, skymoe
from skymoe_jax.parallel import mesh as mesh_lib


EXAMPLES_DIR = 'examples'          # the recipe's examples folder, beside stage1/ and stage2/
QUESTIONS_FILE = 'questions.jsonl'
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


class ImageError(image_ops.ImageDecodeError):
  """An image to ask about that is missing or does not decode; the message names it."""


def read_image(path) -> bytes:
  """The bytes of image file `path`, after checking that it exists and decodes.

  The chat command calls this before it loads the model (which takes a while), so that a wrong
  --image fails at once and names the file.
  """
  path = storage.path(path)  # a local file or gs://
  if not path.exists():
    raise ImageError(f'{path}: no such file')
  if not path.is_file():
    raise ImageError(f'{path}: not a file')
  data = path.read_bytes()
  try:
    image_ops.decode(data)
  except image_ops.ImageDecodeError as e:
    raise ImageError(f'{path}: {_decode_error(e)}; expected a PNG, JPEG or TIFF file') from None
  return data


def _decode_error(e: Exception) -> str:
  """image_ops' message without PIL's '<_io.BytesIO object at 0x...>' (it names no file)."""
  return re.sub(r'\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>', '', str(e))


def _not_an_image(image_bytes, error: Exception) -> ImageError:
  size = f'{len(image_bytes)} bytes' if hasattr(image_bytes, '__len__') else type(image_bytes)
  head = bytes(image_bytes[:8]) if isinstance(image_bytes, (bytes, bytearray)) else b''
  return ImageError(f'image_bytes ({size}, starting {head!r}): {_decode_error(error)}; '
                    'expected the bytes of a PNG, JPEG or TIFF file')


@dataclasses.dataclass(frozen=True)
class Reply:
  """One answered question and what the router was given and did for it."""
  answer: str
  task: str                      # the router's task (tasks.TASKS) for the question
  granularity: str               # and its granularity (tasks.GRANULARITIES)
  tag: Optional[str]             # the question's task tag, None when keywords chose the task
  boxes: List[boxes_lib.Box]     # the boxes the answer names, pixels of the image; [] if none
  width: int                     # the image's size in pixels
  height: int
  routing: Optional[Dict]        # routing.RoutingStats.report of this question; None: dense


class Chat:
  """chat = Chat(workdir); chat.answer(png_bytes, 'How many ships are there?') -> str."""

  def __init__(self, workdir, step=None, max_new_tokens=128):
    self.config = workdir_lib.read_config(workdir)
    self.tokenizer = tokenizer_lib.Tokenizer(workdir_lib.tokenizer_path(workdir))
    self.template = template_lib.get_template(self.config.data.template)
    self.mesh = mesh_lib.create_mesh(self.config)  # generate pads the batch of one
    self.model = factory.create_model(self.config)
    self.step, self.params = workdir_lib.restore_params(self.config, workdir, step, self.mesh)
    self.generate = generate_lib.make_generate_fn(
        self.model, self.config, max_new_tokens, self.tokenizer.eos_id, self.tokenizer.pad_id,
        mesh=self.mesh)
    # The router statistics of one forward pass, with the dropless model generation uses.
    self._prefill = routing_lib.router_outputs_fn(generate_lib.dropless_model(self.model))
    # model.moe.condition='predicted': the condition head routes, so its guess is what to show.
    self._head = None
    if skymoe.predicts_condition(self.config.model):
      self._head = jax.jit(lambda params, tokens, mask: self.model.apply(
          {'params': params}, tokens, mask, method='predict_condition'))

  def answer(self, image_bytes: bytes, question: str) -> str:
    """The answer to `question` about the encoded image `image_bytes` (ImageError if they do not
    decode, before the model runs)."""
    prepared, task_id, granularity_id, _ = self._prepare(image_bytes, question)
    return self._answer(prepared, task_id, granularity_id)

  def ask(self, image_bytes: bytes, question: str) -> Reply:
    """answer()'s text for the same inputs, with the router's task and granularity, the boxes
    the answer names and this question's expert load per MoE layer."""
    prepared, task_id, granularity_id, tag = self._prepare(image_bytes, question)
    text = self._answer(prepared, task_id, granularity_id)
    images, tokens, mask = prompts.pad_batch([prepared], 1, self.config.data.text_len)
    if self._head is not None:
      with mesh_lib.activate(self.mesh, self.config):
        logits = jax.device_get(self._head(self.params, tokens, mask))
      task_id = int(np.argmax(logits['task'][0]))
      granularity_id = int(np.argmax(logits['granularity'][0]))
    task, granularity = tasks.TASKS[task_id], tasks.GRANULARITIES[granularity_id]
    width, height = prepared['width'], prepared['height']
    # The dialect and framing evaluation scores grounding answers in.
    boxes = boxes_lib.try_parse(runner.DIALECT, text, width, height) or []
    with mesh_lib.activate(self.mesh, self.config):
      aux = jax.device_get(self._prefill(self.params, images, tokens, mask,
                                         np.asarray([task_id], np.int32),
                                         np.asarray([granularity_id], np.int32)))
    stats = routing_lib.RoutingStats()
    stats.add(aux, task, granularity)
    return Reply(text, task, granularity, tag, boxes, width, height,
                 stats.report(layout.moe_layers(self.config.model)))

  def _prepare(self, image_bytes, question: str):
    """(prepared question, task_id, granularity_id, tag) of one question about one image."""
    if isinstance(image_bytes, (str, os.PathLike)):
      raise TypeError(f'Chat.answer takes the image\'s bytes, not the path {str(image_bytes)!r}: '
                      'pass chat.read_image(path)')
    conversation = [{'from': 'human', 'value': '<image>\n' + question.strip()}]
    try:
      prepared = prompts.prepare(image_bytes, conversation, self.config, self.tokenizer,
                                 self.template)
    except image_ops.ImageDecodeError as e:
      raise _not_an_image(image_bytes, e) from None
    task_id, granularity_id, tag = tasks.classify(question)
    return prepared, task_id, granularity_id, tag

  def _answer(self, prepared, task_id: int, granularity_id: int) -> str:
    c = self.config
    images, tokens, mask = prompts.pad_batch([prepared], 1, c.data.text_len)
    with mesh_lib.activate(self.mesh, c):
      out, length = self.generate(self.params, images, tokens, mask,
                                  np.asarray([task_id], np.int32),
                                  np.asarray([granularity_id], np.int32))
    return self.tokenizer.decode(np.asarray(out)[0, :int(np.asarray(length)[0])].tolist())


# ---------------------------------------------------------------------------- held-out examples

def held_out_examples(config, num_images: int = 6) -> List[Dict]:
  """The first `num_images` images of the eval split (config.eval.split) of the config's first
  source that have a question of every task (tasks.TASKS), in record order.

  Each is {'name': a file-name-safe id, 'image': the encoded bytes, 'questions': [{'task',
  'granularity', 'tag', 'question', 'answer'}, ...]}: every question asked about the image
  (the last human turn of each record, without its image line) and its reference answer. The
  records of one image are the consecutive records holding the same image bytes (as the
  synthetic scenes and converted instruction sets store them).
  """
  name = sorted(config.data.sources)[0]
  data_dir = config.data.sources[name].data_dir
  reader = records.open_split(data_dir, config.eval.split)
  examples, group, key = [], [], None
  try:
    for i in range(len(reader) + 1):
      r = reader.record(i) if i < len(reader) else None
      image_key = None if r is None else hashlib.sha256(r.image).digest()
      if group and image_key != key:
        if {g.task for g in group} == set(tasks.TASKS):
          examples.append(_example(group))
          if len(examples) == num_images:
            break
        group = []
      if r is not None:
        group.append(r)
        key = image_key
  finally:
    reader.close()
  if not examples:
    raise ValueError(f'{data_dir}: no image of split {config.eval.split!r} has a question of '
                     f'every task {tasks.TASKS}; no examples to write')
  return examples


def _example(group: List[records.Record]) -> Dict:
  prefix = os.path.commonprefix([r.id for r in group]).rstrip('-_/.') or group[0].id
  questions = []
  for r in group:
    human = [turn['value'] for turn in r.conversations if turn['from'] == 'human'][-1]
    question = re.sub(r'^\s*<image>\s*', '', human).strip()
    questions.append({'task': r.task, 'granularity': r.granularity,
                      'tag': tasks.classify(question)[2], 'question': question,
                      'answer': r.conversations[-1]['value']})
  return {'name': re.sub(r'[^A-Za-z0-9._-]', '_', prefix), 'image': group[0].image,
          'questions': questions}


def write_examples(config, out_dir, num_images: int = 6) -> pathlib.Path:
  """Writes held_out_examples(config, num_images) into out_dir (the module docstring's files);
  returns the questions file."""
  out_dir = storage.path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  rows = []
  for example in held_out_examples(config, num_images):
    image = example['image']
    if not image.startswith(PNG_SIGNATURE):  # the pixels the model reads, as a PNG
      image = image_ops.encode_png(image_ops.decode(image))
    file_name = example['name'] + '.png'
    (out_dir / file_name).write_bytes(image)
    rows.extend({'image': file_name, **q} for q in example['questions'])
  questions = out_dir / QUESTIONS_FILE
  workdir_lib.write_atomically(questions, ''.join(json.dumps(r) + '\n' for r in rows))
  return questions


def read_examples(folder) -> List[Dict]:
  """The rows of folder/questions.jsonl (write_examples), each with 'image' made the image's
  path; a row without "image" and "question", or whose image is missing, is a ValueError naming
  the file and line."""
  folder = storage.path(folder)
  path = folder / QUESTIONS_FILE
  rows = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
      row['image'], row['question'] = folder / row['image'], str(row['question'])
    except (ValueError, KeyError, TypeError) as e:
      raise ValueError(f'{path}: line {number}: not an example row with "image" and "question" '
                       f'({type(e).__name__}: {e})') from None
    if not row['image'].is_file():
      raise ValueError(f'{path}: line {number}: no image file {row["image"]}')
    rows.append(row)
  return rows
