"""LLaVA / GeoChat instruction data -> records (the tfds builder skymoe_instruct, data/builders.py).

manual_dir holds one file per split, <split>.json (a JSON list) or <split>.jsonl (one entry a
line), e.g. train.json and test.jsonl, and images/ with the files the entries name; each file is
a list of

  {"id": ..., "image": "rel/path.png",
   "conversations": [{"from": "human", "value": "<image>\\n[refer] ..."},
                     {"from": "gpt" | "bot", "value": "..."}, ...]}

Each entry becomes one record: speakers normalised to human/gpt, texts as written, task and
granularity from `tasks.classify` of the first human turn, and, for grounding samples, the boxes
of the assistant answers (in `box_dialect`) in pixels of the image. A box's label is the nearest
`<p>phrase</p>` before it in the answer, else the single `<p>phrase</p>` of the question, else
'object'.

Checks per entry, first failure wins (the reason is the summary key):
  invalid_json            a jsonl line that is not JSON, or an entry that is not an object
  missing_field           id / image / conversations absent (id, image: empty or of the wrong type)
  duplicate_id            the id of a record already written (a bad record never shadows a later
                          good one with its id: only written ids count)
  malformed_conversation  template.render rejects it (empty, a turn that is not an object or whose
                          `from` / `value` is not a string, unknown speaker, not alternating
                          human/assistant), it does not end on an answer, or `<image>` is not
                          exactly once in the conversation, in the first human turn
  unknown_task_tag        the first human turn starts with a tag tasks.py does not know
  image_outside_images_dir  the image path, resolved (`..`, symlinks), is not inside images_dir
  missing_image, undecodable_image
  image_too_large         more than max_image_pixels pixels (from the header; not decoded)
  unparsable_box          grounding: a box-like string in an answer that the dialect cannot parse
                          (e.g. `{<10><20><50>}`, values out of range, x2 < x1)
"""
import functools
import json
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from skymoe_jax import storage
from skymoe_jax.data import boxes as boxes_lib
from skymoe_jax.data import image_ops
from skymoe_jax.data import records
from skymoe_jax.data import tasks
from skymoe_jax.data import template
from skymoe_jax.data.convert import (EncodedImage, Sample, Skip, Skips, SourceSpec, image_path,
                                     load_image)

IMAGE = template.LLAVA_V1.image_placeholder

_NUM = r'-?\d+(?:\.\d+)?'
_NUM_LIST = r'\[\s*N(?:\s*,\s*N)*\s*\]'.replace('N', _NUM)
# What looks like a box of each dialect, found more loosely than the dialect's own parser, so
# that a broken box is caught instead of being silently ignored.
BOX_LIKE = {
    'geochat': re.compile(r'\{[^{}]*<[^{}]*\}'),
    'vhm': re.compile(_NUM_LIST),
    'lhrs': re.compile(_NUM_LIST),
    'deepseek_vl2': re.compile(r'<\|det\|>.*?(?:<\|/det\|>|$)', re.S),
    'paligemma': re.compile(r'(?:<loc\d+>\s*)+'),
}
assert set(BOX_LIKE) == set(boxes_lib.DIALECTS), 'BOX_LIKE must cover boxes.DIALECTS'

_PHRASE = re.compile(r'<p>(.*?)</p>', re.S)


def _jsonl_entries(path) -> Iterator[Tuple[str, object]]:
  with storage.path(path).open(encoding='utf-8') as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        yield f'line {n}', json.loads(line)
      except json.JSONDecodeError as e:
        yield f'line {n}', Skip('invalid_json', '<line>', str(e))


def iter_entries(path) -> Iterator[Tuple[str, object]]:
  """(where, entry) of a .json list or a .jsonl file; a bad jsonl line yields a Skip as entry.

  A .json file is parsed here, before any output is touched: a whole file that does not parse is
  not a bad record but a bad input, and raises.
  """
  path = storage.path(path)
  if path.suffix == '.jsonl':
    return _jsonl_entries(path)
  data = json.loads(path.read_text(encoding='utf-8'))
  if not isinstance(data, list):
    raise ValueError(f'{path}: expected a JSON list of samples, got {type(data).__name__}')
  return ((f'index {i}', entry) for i, entry in enumerate(data))


def _field(entry: Dict, name: str, types) -> object:
  value = entry.get(name)
  if value is None or isinstance(value, bool) or not isinstance(value, types):
    raise Skip('missing_field', name, 'absent' if value is None else f'{type(value).__name__}')
  if isinstance(value, str) and not value:
    raise Skip('missing_field', name, 'empty')
  return value


def check_conversation(conversations) -> List[Dict[str, str]]:
  """The conversation with speakers normalised to human/gpt; Skip('malformed_conversation')."""
  try:
    template.render(template.LLAVA_V1, conversations)  # the template's own turn rules
  except template.ConversationError as e:
    raise Skip('malformed_conversation', 'conversations', str(e)) from None
  if len(conversations) % 2:
    raise Skip('malformed_conversation', 'conversations',
               f'ends on human turn {len(conversations) - 1}, no answer to train on')
  counts = [turn['value'].count(IMAGE) for turn in conversations]
  if counts[0] != 1 or sum(counts) != 1:
    raise Skip('malformed_conversation', 'conversations',
               f'{IMAGE} must appear once, in turn 0; found per turn {counts}')
  return [{'from': template.SPEAKERS[t['from']], 'value': t['value']} for t in conversations]


def answer_boxes(dialect: str, answer: str, question: str, width: int, height: int,
                 pad_to_square: bool = False) -> Tuple[List[Tuple[float, ...]], List[str]]:
  """Pixel boxes and labels of every box-like string in `answer`; Skip('unparsable_box')."""
  d = boxes_lib.get_dialect(dialect)
  question_phrases = [p.strip() for p in _PHRASE.findall(question)]
  fallback = question_phrases[0] if len(question_phrases) == 1 else 'object'
  found, labels = [], []
  for m in BOX_LIKE[d.name].finditer(answer):
    text = m.group(0)
    try:
      parsed = boxes_lib.parse(d, text, width, height, pad_to_square)
    except boxes_lib.BoxParseError as e:
      raise Skip('unparsable_box', 'conversations', str(e)) from None
    if d.name == 'paligemma' and text.count('<loc') != 4 * len(parsed):
      raise Skip('unparsable_box', 'conversations', f'{text.count("<loc")} loc tokens in {text!r}')
    before = [p.strip() for p in _PHRASE.findall(answer[:m.start()])]
    label = before[-1] if before and before[-1] else fallback
    for b in parsed:
      found.append((b.x1, b.y1, b.x2, b.y2))
      labels.append(label)
  return found, labels


def to_record(entry, images_dir, box_dialect: str = 'geochat', source: str = '',
              licence: str = '', pad_to_square: bool = False,
              seen_ids: Sequence[str] = (), image_loader=load_image) -> records.Record:
  """The record of one entry; raises Skip naming the reason and the field."""
  if isinstance(entry, Skip):
    raise entry
  if not isinstance(entry, dict):
    raise Skip('invalid_json', '<entry>', f'not an object but {type(entry).__name__}')
  record_id = str(_field(entry, 'id', (str, int)))
  image_name = _field(entry, 'image', str)
  conversations = entry.get('conversations')
  if conversations is None:
    raise Skip('missing_field', 'conversations', 'absent')
  if record_id in seen_ids:
    raise Skip('duplicate_id', 'id', f'{record_id!r} already written')
  conv = check_conversation(conversations)
  try:
    task_id, granularity_id, _ = tasks.classify(conv[0]['value'])
  except tasks.UnknownTagError as e:
    raise Skip('unknown_task_tag', 'conversations', str(e)) from None
  task, granularity = tasks.TASKS[task_id], tasks.GRANULARITIES[granularity_id]
  image: EncodedImage = image_loader(image_path(images_dir, image_name))
  box_list, labels = [], []
  if task == 'grounding':
    for q, a in zip(conv[0::2], conv[1::2]):
      found, names = answer_boxes(box_dialect, a['value'], q['value'], image.width, image.height,
                                  pad_to_square)
      box_list += found
      labels += names
  return records.Record(
      id=record_id, image=image.data, conversations=conv, task=task, granularity=granularity,
      boxes=np.asarray(box_list, np.float32).reshape(-1, 4), labels=labels, source=source,
      licence=licence)


INPUT_SUFFIXES = ('.json', '.jsonl')
LAYOUT = ('manual_dir/<split>.json (a JSON list) or manual_dir/<split>.jsonl (one sample a line), '
          'one file per split (train.json, test.jsonl, ...), and manual_dir/images/ holding the '
          'files the samples\' "image" paths name')


def input_files(manual_dir) -> Dict[str, object]:
  """{split: its instruction file} of manual_dir (a split with both .json and .jsonl is an
  error: which one is meant is unknown)."""
  root = storage.path(manual_dir)
  found: Dict[str, object] = {}
  for path in sorted(root.iterdir()) if root.exists() else ():
    if path.suffix in INPUT_SUFFIXES and path.is_file():
      if path.stem in found:
        raise ValueError(f'{root}: split {path.stem!r} has two files, {found[path.stem]} and '
                         f'{path}; keep one')
      found[path.stem] = path
  if not found:
    raise FileNotFoundError(f'{root}: no instruction file; expected {LAYOUT}')
  return found


def samples(manual_dir, skips: Skips, *, seed: int = 0, licence: str = 'unknown',
            max_image_pixels: int = image_ops.MAX_IMAGE_PIXELS, box_dialect: str = 'geochat',
            pad_to_square: bool = False, source: Optional[str] = None,
            splits: Optional[Sequence[str]] = None) -> Iterator[Sample]:
  """The samples of every instruction file of manual_dir (input_files), split by split; each
  make() is to_record of one entry. Ids must be unique within a split: an id is taken once its
  record is made (the builder writes every record make() returns)."""
  del seed  # the entries' order is the file's
  boxes_lib.get_dialect(box_dialect)  # an unknown dialect is a usage error, before any work
  root = storage.path(manual_dir)
  images_dir = root / 'images'
  source = source or root.name
  # Consecutive samples often share an image (multi-task data of one scene): decode it once.
  loader = functools.lru_cache(maxsize=64)(
      functools.partial(load_image, max_pixels=max_image_pixels))
  for split, path in input_files(root).items():
    if splits is not None and split not in splits:
      continue
    seen = set()

    def make(entry, seen=seen):
      record = to_record(entry, images_dir, box_dialect, source, licence, pad_to_square, seen,
                         loader)
      seen.add(record.id)
      return record

    for where, entry in iter_entries(path):
      label = where
      if isinstance(entry, dict) and entry.get('id') is not None:
        label = f'{where} (id {entry["id"]!r})'
      yield split, path, label, functools.partial(make, entry)


SPEC = SourceSpec(
    name='instruct', version='1.0.0',
    description='LLaVA / GeoChat instruction data (skymoe_jax/data/convert/instruct.py): one '
                'record per entry, task and granularity from its first prompt\'s tag, grounding '
                'boxes parsed from the answers in the configured box dialect.',
    homepage='https://github.com/mbzuai-oryx/GeoChat', citation='', licence='unknown',
    layout=LAYOUT, splits=(), samples=samples)
