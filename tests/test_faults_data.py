"""Fault probes of the data layer: nothing a user has is lost, nothing wrong gets in silently.

Each test is one probe that once failed: a malformed turn aborting a conversion, a crash mid-way
leaving a dataset without what it was replacing, image paths escaping --images, images too
large to decode at train time, and a corrupt record stopping the tokenizer trainer.
"""
import io
import json
import logging
import os
import pathlib
import struct
import subprocess
import sys
import zlib

import numpy as np
from array_record.python import array_record_module as arm
import pytest
from PIL import Image, ImageFile

from conftest import load_config
from skymoe_jax.data import builders, image_ops, pipeline, records, synthetic, tasks
from skymoe_jax.data import template as template_lib
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.data.convert import instruct, neon

REPO = pathlib.Path(__file__).resolve().parents[1]
# PIL warns when it opens the 12000x12000 probe image (above its own, process-global limit); the
# code under test then refuses it from the header.
pytestmark = pytest.mark.filterwarnings('ignore::PIL.Image.DecompressionBombWarning')


def _save(path, size=(40, 20), seed=0, fmt=None):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  w, h = size
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(
      path, format=fmt)
  return path


def _turns(*texts):
  return [{'from': 'human' if i % 2 == 0 else 'gpt', 'value': t} for i, t in enumerate(texts)]


def _entry(id_, image='a.png', answer='x'):
  return {'id': id_, 'image': image, 'conversations': _turns('<image>\nWhat is here?', answer)}


def _read_ids(out, split):
  reader = records.open_split(out, split)
  try:
    return [reader.record(i).id for i in range(len(reader))]
  finally:
    reader.close()


def _files(out):
  return {p.name: p.read_bytes() for p in sorted(pathlib.Path(out).iterdir())}


def _leftovers(out):
  """Hidden folders beside the dataset folder (the staging folders of a build left behind)."""
  return sorted(p.name for p in pathlib.Path(out).parent.iterdir() if p.name.startswith('.'))


def _instruct(images, out, split_entries, **options):
  """Builds skymoe_instruct from {split: entries} (manual_dir: <split>.json + images/)."""
  manual = pathlib.Path(out).parent / f'in-{pathlib.Path(out).name}'
  manual.mkdir(exist_ok=True)
  if not (manual / 'images').exists():
    (manual / 'images').symlink_to(images)
  for split, entries in split_entries.items():
    (manual / f'{split}.json').write_text(json.dumps(entries))
  return builders.build_at(out, 'instruct', manual, **options)


def _chunk(kind: bytes, data: bytes) -> bytes:
  return (struct.pack('>I', len(data)) + kind + data +
          struct.pack('>I', zlib.crc32(kind + data) & 0xffffffff))


@pytest.fixture(scope='module')
def huge_png():
  """A valid 12000x12000 grey PNG (~140 KB of zlib'd zeros; decoded: 144 MB, seconds)."""
  w = h = 12000
  z = zlib.compressobj(9)
  row = b'\0' * (w + 1)  # filter byte + one byte per pixel
  idat = b''.join(z.compress(row) for _ in range(h)) + z.flush()
  return (b'\x89PNG\r\n\x1a\n' + _chunk(b'IHDR', struct.pack('>IIBBBBB', w, h, 8, 0, 0, 0, 0)) +
          _chunk(b'IDAT', idat) + _chunk(b'IEND', b''))


# ------------------------------------------------------------------ item 2: malformed turns

def test_non_string_speaker_or_value_is_a_counted_skip(tmp_path, caplog):
  images = tmp_path / 'images'
  _save(images / 'a.png')
  bad_turns = {
      'from_list': [{'from': ['human'], 'value': '<image>\nq'}, {'from': 'gpt', 'value': 'a'}],
      'from_dict': [{'from': {'who': 'human'}, 'value': '<image>\nq'},
                    {'from': 'gpt', 'value': 'a'}],
      'from_int': [{'from': 1, 'value': '<image>\nq'}, {'from': 'gpt', 'value': 'a'}],
      'from_none': [{'from': None, 'value': '<image>\nq'}, {'from': 'gpt', 'value': 'a'}],
      'value_list': [{'from': 'human', 'value': ['<image>', 'q']}, {'from': 'gpt', 'value': 'a'}],
      'value_int': [{'from': 'human', 'value': '<image>\nq'}, {'from': 'gpt', 'value': 3}],
      'turn_list': [['human', '<image>\nq'], {'from': 'gpt', 'value': 'a'}],
      'conv_dict': {'from': 'human', 'value': '<image>\nq'},
  }
  entries = [_entry('ok1')] + [{'id': k, 'image': 'a.png', 'conversations': v}
                               for k, v in bad_turns.items()] + [_entry('ok2')]
  with caplog.at_level(logging.WARNING):
    summary = _instruct(images, tmp_path / 'out', {'train': entries})
  assert summary['written'] == 2
  assert summary['skipped'] == {'malformed_conversation': len(bad_turns)}
  assert _read_ids(tmp_path / 'out', 'train') == ['ok1', 'ok2']
  for k in bad_turns:  # file, record and field in each warning
    assert any('train.json' in r.message and repr(k) in r.message and "'conversations'" in
               r.message for r in caplog.records), k
  # The template's own error is a ConversationError, never a TypeError, for the pipeline too.
  with pytest.raises(template_lib.ConversationError, match='turn 0'):
    template_lib.render(template_lib.LLAVA_V1, bad_turns['from_list'])


# ------------------------------------------------ item 2: a split is replaced only when complete

class _Crash(Exception):
  pass


def test_instruct_crash_keeps_the_old_dataset(tmp_path, monkeypatch):
  images = tmp_path / 'images'
  _save(images / 'a.png')
  out = tmp_path / 'out'
  _instruct(images, out, {'train': [_entry('old1'), _entry('old2')], 'test': [_entry('t1')]},
            source='d')
  before = _files(out)
  real = instruct.to_record
  calls = []

  def crashing(entry, *args, **kwargs):
    calls.append(entry['id'])
    if len(calls) == 4:   # records already written, as if killed here
      raise _Crash('power cut')
    return real(entry, *args, **kwargs)
  monkeypatch.setattr(instruct, 'to_record', crashing)
  with pytest.raises(_Crash):
    _instruct(images, out, {'train': [_entry(f'new{i}') for i in range(5)]}, source='d')
  # The old dataset, whole: both splits, nothing half-written beside it.
  assert _files(out) == before
  assert _read_ids(out, 'train') == ['old1', 'old2']
  assert _read_ids(out, 'test') == ['t1']
  assert _leftovers(out) == []

  monkeypatch.setattr(instruct, 'to_record', real)
  (tmp_path / 'in-out' / 'test.json').unlink()
  summary = _instruct(images, out, {'train': [_entry('new0')]}, source='d')
  assert summary['splits'] == {'train': 1}
  assert _read_ids(out, 'train') == ['new0']
  assert _leftovers(out) == []


def test_a_failed_swap_keeps_the_old_dataset(tmp_path, monkeypatch):
  images = tmp_path / 'images'
  _save(images / 'a.png')
  out = tmp_path / 'out'
  _instruct(images, out, {'train': [_entry('old1'), _entry('old2')]})
  before = _files(out)
  def no_info(*args, **kwargs):  # the last step fails (say, the disk is full): nothing swapped
    raise OSError('No space left on device')
  monkeypatch.setattr(builders.tfds.core.DatasetInfo, 'write_to_directory', no_info)
  with pytest.raises(OSError, match='No space'):
    _instruct(images, out, {'train': [_entry('new1')]})
  assert _files(out) == before
  assert _read_ids(out, 'train') == ['old1', 'old2'] and _leftovers(out) == []


def test_neon_crash_keeps_the_old_dataset(tmp_path, monkeypatch):
  data = tmp_path / 'in-data'
  _save(data / 'tile.png', (500, 300), 0)
  (data / 'trees.csv').write_text('image_path,xmin,ymin,xmax,ymax,label\n'
                                  'tile.png,150,10,200,60,Tree\n')
  out = tmp_path / 'out'
  builders.build_at(out, 'neon', data, test_tiles=())
  before = _read_ids(out, 'train')
  assert len(before) == 4   # two crops x (count, refer)
  real, calls = neon.encode_image, []

  def crashing(*args, **kwargs):
    calls.append(args)
    if len(calls) == 3:   # the first crops' records are written
      raise _Crash('power cut')
    return real(*args, **kwargs)
  monkeypatch.setattr(neon, 'encode_image', crashing)
  with pytest.raises(_Crash):
    builders.build_at(out, 'neon', data, test_tiles=())
  assert _read_ids(out, 'train') == before
  assert _leftovers(out) == []


# --------------------------------------------------------- item 7: image paths stay in --images

def test_image_paths_outside_the_images_folder_are_refused(tmp_path, caplog):
  images = tmp_path / 'images'
  _save(images / 'a.png')
  _save(images / 'sub' / 'b.png')
  outside = _save(tmp_path / 'secret.png', seed=5)
  (images / 'link.png').symlink_to(outside)            # inside by name, outside by target
  (images / 'inner.png').symlink_to(images / 'a.png')  # a link that stays inside is fine
  entries = [_entry('ok', 'a.png'), _entry('sub', 'sub/../sub/b.png'),
             _entry('inner', 'inner.png'),
             _entry('rel', '../secret.png'), _entry('abs', str(outside)),
             _entry('link', 'link.png'), _entry('passwd', '../../../../../../etc/passwd'),
             _entry('nul', 'a.png\0.png')]
  with caplog.at_level(logging.WARNING):
    summary = _instruct(images, tmp_path / 'out', {'escape': entries})
  assert summary['written'] == 3
  assert summary['skipped'] == {'image_outside_images_dir': 4, 'missing_image': 1}
  assert _read_ids(tmp_path / 'out', 'escape') == ['ok', 'sub', 'inner']
  assert any('escape.json' in r.message and "'passwd'" in r.message and "'image'" in r.message
             and 'image_outside_images_dir' in r.message for r in caplog.records)


# ----------------------------------------------------------------- pixel limits: conversion

def test_default_pixel_limit_matches_the_config():
  assert image_ops.MAX_IMAGE_PIXELS == 8192 * 8192
  assert load_config('tiny').data.max_image_pixels == image_ops.MAX_IMAGE_PIXELS


def test_conversion_refuses_images_above_the_pixel_limit(tmp_path, huge_png, monkeypatch):
  images = tmp_path / 'images'
  _save(images / 'a.png', (40, 20))          # 800 pixels
  _save(images / 'b.png', (20, 20))          # 400 pixels
  (images / 'huge.png').write_bytes(huge_png)
  entries = {'train': [_entry('a', 'a.png'), _entry('b', 'b.png'), _entry('huge', 'huge.png')]}
  # The default limit refuses the 12000x12000 image from its header, before any pixel.
  decoded = []
  real_load = ImageFile.ImageFile.load

  def load(self):
    decoded.append(self.size)
    return real_load(self)
  monkeypatch.setattr(ImageFile.ImageFile, 'load', load)
  summary = _instruct(images, tmp_path / 'out', entries)
  assert summary['skipped'] == {'image_too_large': 1} and summary['written'] == 2
  assert (12000, 12000) not in decoded
  # A lower limit is a converter flag: the command line passes it through.
  sys.path.insert(0, str(REPO / 'data_prep'))
  try:
    import convert_instruct  # noqa: E402 (a script, not a package module)
  finally:
    sys.path.remove(str(REPO / 'data_prep'))
  convert_instruct.main([f'--manual_dir={tmp_path / "in-out"}', f'--out={tmp_path / "cli"}',
                         '--max_image_pixels=500'])
  meta = records.read_info(tmp_path / 'cli')['metadata']
  assert meta['skipped'] == {'image_too_large': 2}
  assert meta['skipped_per_split'] == {'train': {'image_too_large': 2}}
  assert _read_ids(tmp_path / 'cli', 'train') == ['b']
  # The NEON builder takes the same limit (the benchmark builders: test_benchmark_builders.py).
  data = tmp_path / 'neon'
  _save(data / 'tile.png', (50, 30), 0)
  _save(data / 'tile2.png', (20, 20), 1)
  (data / 'trees.csv').write_text('image_path,xmin,ymin,xmax,ymax,label\n'
                                  'tile.png,1,1,20,20,Tree\ntile2.png,1,1,9,9,Tree\n')
  summary = builders.build_at(tmp_path / 'neon_out', 'neon', data, test_tiles=(),
                              max_image_pixels=1000)
  assert summary['written'] == 2 and summary['skipped'] == {'image_too_large': 1}


# ---------------------------------------------------------------- pixel limits: train time

def test_decode_refuses_a_large_image_before_decoding_it(huge_png, monkeypatch):
  def no_load(self):
    raise AssertionError('pixels decoded')
  monkeypatch.setattr(ImageFile.ImageFile, 'load', no_load)
  with pytest.raises(image_ops.ImageTooLargeError, match='12000x12000') as e:
    image_ops.decode(huge_png)
  assert 'pixels decoded' not in str(e.value)
  assert isinstance(e.value, image_ops.ImageDecodeError)
  small = io.BytesIO()
  Image.new('RGB', (40, 20)).save(small, format='PNG')
  with pytest.raises(image_ops.ImageTooLargeError, match='800 pixels'):
    image_ops.decode(small.getvalue(), max_pixels=799)


@pytest.fixture(scope='module')
def syn(tmp_path_factory):
  root = tmp_path_factory.mktemp('faults_pipeline')
  synthetic.generate(root / 'syn', num_images=4, seed=3, image_size=64, val_fraction=0.25)
  tok = tokenizer_lib.ensure(root / 'tok', [root / 'syn'], 256)
  return root, tok


def test_pipeline_counts_images_above_the_limit(syn, tmp_path, huge_png):
  root, tok = syn
  good = records.open_split(root / 'syn', 'train').record(0)
  huge = records.Record(**{**good.__dict__, 'id': 'huge', 'image': huge_png})
  builders.write_records(tmp_path / 'huge', {'train': [good, huge]})
  config = load_config('tiny')
  config.data.sources.synthetic.update(data_dir=str(tmp_path / 'huge'), generate='')
  config.data.batch_size = 8
  batch = pipeline.BatchBuilder(config, tok).build(0)
  counts = dict(zip(pipeline.COUNTERS, batch['counters'].tolist()))
  assert counts['image_too_large'] >= 1 and counts['undecodable_image'] == 0
  assert (batch['tokens'] == batch['tokens'][0]).all()   # every row is the good record
  # The limit is config.data.max_image_pixels: below the good image's size, nothing is left.
  config.data.max_image_pixels = 64 * 64 - 1
  with pytest.raises(pipeline.DataError, match='image_too_large|pixels'):
    pipeline.BatchBuilder(config, tok).build(0)


# ------------------------------------------------------------ the tokenizer trainer's records

def _corrupt_dataset(out):
  """3 records: good, not a tf.train.Example, a conversation the template rejects (record 1 is
  replaced in the ArrayRecord file after the build: no builder writes such a record)."""
  good = records.Record(id='good', image=b'', task='vqa', granularity='mixed',
                        conversations=_turns('<image>\nWhat is the river beside?', 'A road.'))
  empty = records.Record(id='empty', image=b'', task='vqa', granularity='mixed',
                         conversations=[])
  builders.write_records(out, {'train': [good, good, empty]})
  [path] = out.glob('*-train.array_record-*')
  reader = arm.ArrayRecordReader(str(path))
  options, stored = reader.writer_options_string(), reader.read_all()
  reader.close()
  writer = arm.ArrayRecordWriter(str(path), options)
  for data in (stored[0], b'\x08garbage, not an Example', stored[2]):
    writer.write(data)
  writer.close()


def test_tokenizer_texts_skip_and_count_corrupt_records(tmp_path, caplog):
  _corrupt_dataset(tmp_path / 'd')
  skipped = {}
  with caplog.at_level(logging.WARNING):
    texts = tokenizer_lib.texts_from_records(tmp_path / 'd', 'train', skipped=skipped)
  assert skipped == {'unreadable_record': 1, 'malformed_conversation': 1}
  assert any('What is the river beside?' in t for t in texts)
  assert any('split train record 1' in r.message for r in caplog.records)
  assert any('record 2' in r.message and "'empty'" in r.message and 'conversations' in r.message
             for r in caplog.records)


def test_train_tokenizer_cli_reports_skips(tmp_path):
  _corrupt_dataset(tmp_path / 'd')
  proc = subprocess.run(
      [sys.executable, str(REPO / 'data_prep' / 'train_tokenizer.py'),
       f'--data_dir={tmp_path / "d"}', f'--out={tmp_path / "tok"}', '--vocab_size=256'],
      capture_output=True, text=True, cwd=REPO, timeout=120,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary['skipped'] == {'malformed_conversation': 1, 'unreadable_record': 1}
  assert 'split train record 1' in proc.stderr


def test_task_repeats_keep_one_place_for_an_unreadable_record(tmp_path):
  # Records 0 and 2 are VQA, record 1 is unreadable: its one place lets the pipeline count and
  # replace it when drawn, as without task_repeats.
  _corrupt_dataset(tmp_path / 'd')
  repeats = dict({t: 1 for t in tasks.TASKS}, vqa=2)
  epoch = pipeline.task_indices(records.open_split(tmp_path / 'd', 'train'), repeats, 'd')
  assert epoch.tolist() == [0, 0, 1, 2, 2]
