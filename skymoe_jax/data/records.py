"""The project's internal sample record, its TFRecord encoding, and random-access shard reading.

Every source (instruction JSON, the classic RS benchmarks, NEON tiles, the synthetic scenes) is
converted once by data_prep/ into the same record, stored as `tf.train.Example`s in sharded
TFRecord files:

  DIR/<split>-00000.tfrecord, DIR/<split>-00001.tfrecord, ...
  DIR/dataset_info.json   {"name", "licence", "splits": {split: {"files", "records"}}, ...}

Boxes are (x1, y1, x2, y2) in pixels of the stored image. The task and granularity are names from
tasks.TASKS / tasks.GRANULARITIES, resolved at conversion time from the prompt's tag.

Shards are read by position, not streamed: `ShardReader` finds each record's offset from the
TFRecord length headers, so the input pipeline can fetch any record by index. That is what makes
the pipeline a pure function of (seed, step) and its resume exact.
"""
import dataclasses
import json
import os
import pathlib
import struct
from typing import Any, Dict, List, Optional, Sequence

import numpy as np
import tensorflow as tf

from skymoe_jax.data import tasks

INFO_FILE = 'dataset_info.json'


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
  """The record as a serialized tf.train.Example."""
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
  """Record from a serialized Example; RecordError names `where` and the bad field."""
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


class ShardWriter:
  """Writes records of one split into numbered shards of at most `records_per_shard`."""

  def __init__(self, out_dir, split: str, records_per_shard: int = 1000):
    self.out_dir = pathlib.Path(out_dir)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    self.split = split
    self.records_per_shard = records_per_shard
    self.files: List[str] = []
    self.count = 0
    self._writer: Optional[tf.io.TFRecordWriter] = None
    self._in_shard = 0

  def write(self, record: Record) -> None:
    if self._writer is None or self._in_shard == self.records_per_shard:
      self._close_shard()
      name = f'{self.split}-{len(self.files):05d}.tfrecord'
      self.files.append(name)
      self._writer = tf.io.TFRecordWriter(str(self.out_dir / name))
    self._writer.write(encode(record))
    self._in_shard += 1
    self.count += 1

  def _close_shard(self):
    if self._writer is not None:
      self._writer.close()
    self._writer, self._in_shard = None, 0

  def close(self) -> Dict[str, object]:
    """Closes the last shard; returns this split's entry for dataset_info.json."""
    self._close_shard()
    return {'files': list(self.files), 'records': self.count}


def write_info(out_dir, name: str, licence: str, splits: Dict[str, Dict], **extra) -> None:
  info = dict(name=name, licence=licence, splits=splits, **extra)
  path = pathlib.Path(out_dir) / INFO_FILE
  tmp = path.with_suffix('.tmp')
  tmp.write_text(json.dumps(info, indent=1, sort_keys=True) + '\n')
  os.replace(tmp, path)  # a reader never sees a half-written info file


def read_info(data_dir) -> Dict:
  path = pathlib.Path(data_dir) / INFO_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path}: no dataset here (data_prep/ writes {INFO_FILE})')
  return json.loads(path.read_text())


def _record_offsets(path: str) -> np.ndarray:
  """Byte offsets of the records of a TFRecord file, from its length headers.

  Layout per record: uint64 length, uint32 masked crc of the length, data, uint32 masked crc.
  """
  offsets = []
  size = os.path.getsize(path)
  with open(path, 'rb') as f:
    pos = 0
    while pos < size:
      header = f.read(8)
      if len(header) < 8:
        raise RecordError(f'{path}: truncated record header at byte {pos}')
      (length,) = struct.unpack('<Q', header)
      offsets.append(pos)
      pos += 8 + 4 + length + 4
      f.seek(pos)
    if pos != size:
      raise RecordError(f'{path}: last record runs past the end of the file')
  return np.asarray(offsets, np.int64)


class ShardReader:
  """Random access to the records of one split: `reader[i]` -> serialized bytes."""

  def __init__(self, data_dir, split: str):
    self.data_dir = pathlib.Path(data_dir)
    info = read_info(data_dir)
    if split not in info['splits']:
      raise KeyError(f'{self.data_dir}: no split {split!r}; it has {sorted(info["splits"])}')
    self.name = info['name']
    self.files = [str(self.data_dir / f) for f in info['splits'][split]['files']]
    self._offsets = [_record_offsets(f) for f in self.files]
    self._starts = np.cumsum([0] + [len(o) for o in self._offsets])
    if self._starts[-1] != info['splits'][split]['records']:
      raise RecordError(f'{self.data_dir}: split {split!r} has {self._starts[-1]} records in its '
                        f'files, {INFO_FILE} says {info["splits"][split]["records"]}')
    self._handles: Dict[int, object] = {}

  def __len__(self) -> int:
    return int(self._starts[-1])

  def where(self, index: int) -> str:
    shard = int(np.searchsorted(self._starts, index, side='right') - 1)
    return f'{self.files[shard]} record {index - self._starts[shard]}'

  def __getitem__(self, index: int) -> bytes:
    if not 0 <= index < len(self):
      raise IndexError(f'{self.data_dir}: record {index} of {len(self)}')
    shard = int(np.searchsorted(self._starts, index, side='right') - 1)
    offset = int(self._offsets[shard][index - self._starts[shard]])
    # One handle per shard and thread-free reads (os.pread), so parallel map calls can share it.
    fd = self._handles.get(shard)
    if fd is None:
      fd = self._handles[shard] = os.open(self.files[shard], os.O_RDONLY)
    (length,) = struct.unpack('<Q', os.pread(fd, 8, offset))
    return os.pread(fd, length, offset + 12)

  def record(self, index: int) -> Record:
    return decode(self[index], where=self.where(index))

  def close(self):
    for fd in self._handles.values():
      os.close(fd)
    self._handles.clear()
