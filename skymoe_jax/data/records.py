"""The project's internal sample record, and random access to the tfds datasets that store it.

Every source (instruction JSON, the classic RS benchmarks, NEON tiles, the synthetic scenes) is
built once by its tfds builder (data/builders.py; data_prep/ wraps them) into the same record,
stored as ArrayRecord files of a tfds dataset. A dataset is named by its tfds version folder, e.g.
~/tensorflow_datasets/skymoe_ucmerced/1.0.0 or gs://bucket/data/skymoe_synthetic/n2000-s0-i128-
v0.1/1.0.0 (any path storage.path takes): dataset_info.json, features.json, metadata.json (the
licence and the skip counts by reason) and <name>-<split>.array_record-NNNNN-of-NNNNN.

Boxes are (x1, y1, x2, y2) in pixels of the stored image. The task and granularity are names from
tasks.TASKS / tasks.GRANULARITIES, resolved at conversion time from the prompt's tag.

Records are read by position, not streamed: `open_split` uses tfds' own reader,
`tfds.builder_from_directory(dir).as_data_source(split)`, which fetches record i of a split from
the ArrayRecord files, so the input pipeline can build any batch from (seed, step, host) alone and
its resume is exact. The builders write with shuffling disabled: record i of a split is the i-th
record the builder generated.

A folder of the format before tfds (dataset_info.json listing `<split>-NNNNN.tfrecord` shards of
`tf.train.Example`s, `encode` / `decode` below) is refused with the command that migrates it once
(data_prep/migrate_shards.py).
"""
import dataclasses
import json
from typing import Any, Dict, List, Sequence

import numpy as np
import tensorflow as tf

from skymoe_jax import storage
from skymoe_jax.data import tasks

INFO_FILE = 'dataset_info.json'   # tfds' own name; the old shard format used the same one


class RecordError(ValueError):
  """A stored record is unreadable; the message names the file, the record and the field."""


@dataclasses.dataclass
class Record:
  id: str
  image: bytes                                  # encoded PNG or JPEG
  conversations: List[Dict[str, str]]           # [{"from": "human"|"gpt", "value": ...}, ...]
  task: str                                     # a name in tasks.TASKS
  granularity: str                              # a name in tasks.GRANULARITIES
  boxes: np.ndarray = dataclasses.field(        # [N, 4] float32, x1 y1 x2 y2 pixels
      default_factory=lambda: np.zeros((0, 4), np.float32))
  labels: List[str] = dataclasses.field(default_factory=list)   # class name per box
  colors: List[str] = dataclasses.field(default_factory=list)   # colour per box, '' = unknown
  source: str = ''
  licence: str = ''
  # Evaluation extras, JSON: 'question_type' (VQA buckets), 'references' (all accepted answers,
  # e.g. the 5 captions of UCM-Captions; default: the last assistant turn).
  meta: Dict[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    self.boxes = np.asarray(self.boxes, np.float32).reshape(-1, 4)
    if self.task not in tasks.TASKS:
      raise RecordError(f'record {self.id!r}: field task={self.task!r} not in {tasks.TASKS}')
    if self.granularity not in tasks.GRANULARITIES:
      raise RecordError(f'record {self.id!r}: field granularity={self.granularity!r} not in '
                        f'{tasks.GRANULARITIES}')
    if len(self.labels) != len(self.boxes):
      raise RecordError(f'record {self.id!r}: {len(self.labels)} labels for {len(self.boxes)} '
                        'boxes')
    if not self.colors:
      self.colors = [''] * len(self.boxes)
    if len(self.colors) != len(self.boxes):
      raise RecordError(f'record {self.id!r}: {len(self.colors)} colors for {len(self.boxes)} '
                        'boxes')

  @property
  def task_id(self) -> int:
    return tasks.task_id(self.task)

  @property
  def granularity_id(self) -> int:
    return tasks.granularity_id(self.granularity)


def _bytes(values: Sequence[bytes]) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=list(values)))


def _str(*values: str) -> tf.train.Feature:
  return _bytes([v.encode('utf-8') for v in values])


def encode(record: Record) -> bytes:
  """The record as a serialized tf.train.Example (the old shards' bytes; tests write them)."""
  feature = {
      'id': _str(record.id),
      'image': _bytes([record.image]),
      'conversations': _str(json.dumps(record.conversations, ensure_ascii=False)),
      'task': _str(record.task),
      'granularity': _str(record.granularity),
      'boxes': tf.train.Feature(float_list=tf.train.FloatList(value=record.boxes.reshape(-1))),
      'labels': _str(*record.labels),
      'colors': _str(*record.colors),
      'source': _str(record.source),
      'licence': _str(record.licence),
      'meta': _str(json.dumps(record.meta, ensure_ascii=False, sort_keys=True)),
  }
  example = tf.train.Example(features=tf.train.Features(feature=feature))
  return example.SerializeToString(deterministic=True)  # same bytes in every process


def decode(data: bytes, where: str = '') -> Record:
  """Record from a serialized Example (as the builders store it, and as the old shards did);
  RecordError names `where` and the bad field."""
  try:
    example = tf.train.Example.FromString(data)
  except Exception as e:  # protobuf raises DecodeError, a plain Exception subclass
    raise RecordError(f'{where}: not a tf.train.Example ({e})') from None
  f = example.features.feature

  def text(name, many=False):
    if name not in f:
      raise RecordError(f'{where}: field {name!r} missing')
    values = [v.decode('utf-8') for v in f[name].bytes_list.value]
    if many:
      return values
    if len(values) != 1:
      raise RecordError(f'{where}: field {name!r} has {len(values)} values, expected 1')
    return values[0]

  try:
    conversations = json.loads(text('conversations'))
  except json.JSONDecodeError as e:
    raise RecordError(f'{where}: field conversations is not JSON ({e})') from None
  image = f['image'].bytes_list.value if 'image' in f else []
  if len(image) != 1:
    raise RecordError(f'{where}: field image has {len(image)} values, expected 1')
  boxes = np.asarray(f['boxes'].float_list.value if 'boxes' in f else [], np.float32)
  if boxes.size % 4:
    raise RecordError(f'{where}: field boxes has {boxes.size} values, not a multiple of 4')
  try:
    meta = json.loads(text('meta')) if 'meta' in f else {}
  except json.JSONDecodeError as e:
    raise RecordError(f'{where}: field meta is not JSON ({e})') from None
  try:
    return Record(id=text('id'), image=image[0], conversations=conversations,
                  task=text('task'), granularity=text('granularity'), boxes=boxes,
                  labels=text('labels', many=True), colors=text('colors', many=True),
                  source=text('source'), licence=text('licence'), meta=meta)
  except RecordError as e:
    raise RecordError(f'{where}: {e}') from None


# ------------------------------------------------------------- reading the tfds datasets

MIGRATE = 'python data_prep/migrate_shards.py --old={old} --out=NEW_DIR'
METADATA_FILE = 'metadata.json'   # tfds.core.MetadataDict: skip counts by reason, generator params


class OldFormatError(ValueError):
  """The folder holds the pre-tfds TFRecord shards; the message names the migration command."""


def _load_info(data_dir) -> Dict:
  path = storage.path(data_dir) / INFO_FILE
  if not path.exists():
    raise FileNotFoundError(
        f'{path}: no dataset here; data_dir must be a tfds version folder such as '
        '.../skymoe_ucmerced/1.0.0 (written by data_prep/ or `tfds build`)')
  info = json.loads(path.read_text())
  splits = info.get('splits')
  if isinstance(splits, dict) and all(isinstance(s, dict) and 'files' in s
                                      for s in splits.values()):
    raise OldFormatError(
        f'{data_dir} holds the old TFRecord-shard format ({INFO_FILE} + *.tfrecord), which '
        'is no longer read; convert it once with '
        + MIGRATE.format(old=data_dir) + ' (or rebuild it with its data_prep/ command)')
  return info


def read_info(data_dir) -> Dict:
  """{'name', 'version', 'licence', 'splits': {split: records}, 'metadata': {...}} of a dataset;
  FileNotFoundError when there is none, OldFormatError for the old shard format."""
  info = _load_info(data_dir)
  metadata = {}
  meta_path = storage.path(data_dir) / METADATA_FILE
  if meta_path.exists():
    metadata = json.loads(meta_path.read_text())
  splits = {s['name']: int(sum(int(n) for n in s.get('shardLengths', [])))
            for s in info.get('splits', [])}
  return dict(name=info.get('name', ''), version=info.get('version', ''),
              licence=metadata.get('licence', ''), splits=splits, metadata=metadata,
              description=info.get('description', ''))


FIELDS = ('id', 'image', 'conversations', 'task', 'granularity', 'boxes', 'labels', 'colors',
          'source', 'licence', 'meta')   # the features the builders store (builders.features)


class Split:
  """Random access to one split: `len()`, `record(i)` -> Record, `where(i)`, `name`.

  Records come from tfds' ArrayRecord data source as their stored bytes (a tf.train.Example whose
  features are the Record's fields, as builders.features lays them out) and are decoded by
  `decode`: the same Example layout the old shards had, and half the time per record of tfds'
  generic feature decoding (measured on the demo data: ~60 vs ~115 us), which the pipeline pays
  for every sample. A dataset whose features are not FIELDS is refused when opened.
  """

  def __init__(self, data_dir, split: str):
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (heavy)
    self.data_dir = storage.path(data_dir)
    info = read_info(data_dir)
    if split not in info['splits']:
      raise KeyError(f'{self.data_dir}: no split {split!r}; it has {sorted(info["splits"])}')
    self.name, self.split = info['name'], split
    builder = tfds.builder_from_directory(self.data_dir)
    stored = tuple(sorted(builder.info.features.keys()))
    if stored != tuple(sorted(FIELDS)):
      raise RecordError(f'{self.data_dir}: features {stored}, expected {tuple(sorted(FIELDS))} '
                        '(not a dataset of skymoe_jax/data/builders.py)')
    self._source = builder.as_data_source(
        split, deserialize_method=tfds.decode.DeserializeMethod.RAW_BYTES)

  def __len__(self) -> int:
    return len(self._source)

  def where(self, index: int) -> str:
    return f'{self.data_dir} split {self.split} record {index}'

  def __getitem__(self, index: int) -> bytes:
    """The stored bytes of record `index` (a serialized tf.train.Example)."""
    if not 0 <= index < len(self):
      raise IndexError(f'{self.data_dir} split {self.split}: record {index} of {len(self)}')
    try:
      return self._source[index]
    except Exception as e:  # a corrupt file: array_record raises its own errors
      raise RecordError(f'{self.where(index)}: unreadable ({type(e).__name__}: {e})') from None

  def record(self, index: int) -> Record:
    return decode(self[index], where=self.where(index))

  def close(self) -> None:
    close = getattr(self._source.data_source, '__exit__', None)
    if close is not None:
      close(None, None, None)


def missing_files(data_dir) -> List[str]:
  """The data files dataset_info.json lists that are not in data_dir (an incomplete copy)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (heavy)
  read_info(data_dir)  # refuses the old format, names a missing dataset
  info = tfds.builder_from_directory(storage.path(data_dir)).info
  return [str(p) for s in info.splits.values() for p in s.filepaths if not p.exists()]


def open_split(data_dir, split: str) -> Split:
  """Random access to `split` of the tfds dataset in data_dir (its version folder)."""
  return Split(data_dir, split)
