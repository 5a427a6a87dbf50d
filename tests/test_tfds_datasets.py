"""The datasets as tensorflow-datasets (data/builders.py, records.open_split): each builder on small
files in its source's layout, broken inputs included (written + skipped-with-reason == input), a
build from the command line, the pipeline's determinism and exact resume on tfds datasets, a
mixture of two datasets by weight, and the old shard format: refused, and migrated record for
record. (The benchmark builders: test_benchmark_builders.py.)"""
import json
import os
import pathlib
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import load_config
from test_pipeline import assert_resumes_exactly
from skymoe_jax.data import builders, pipeline, records, sources, synthetic
from skymoe_jax.data import tokenizer as tokenizer_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')


def _save(path, size=(24, 16), seed=0):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  w, h = size
  Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)).save(path)
  return path


def _turns(*texts):
  return [{'from': 'human' if i % 2 == 0 else 'gpt', 'value': t} for i, t in enumerate(texts)]


def _all(out):
  found = {}
  for split in records.read_info(out)['splits']:
    reader = records.open_split(out, split)
    found[split] = [reader.record(i) for i in range(len(reader))]
    reader.close()
  return found


def _same(a: records.Record, b: records.Record):
  for f in ('id', 'image', 'conversations', 'task', 'granularity', 'labels', 'colors', 'source',
            'licence', 'meta'):
    assert getattr(a, f) == getattr(b, f), f
  np.testing.assert_array_equal(a.boxes, b.boxes)
  assert b.boxes.dtype == np.float32


def _instruct_manual(root):
  """manual_dir of the instruction builder: train.json, test.jsonl, images/ (2 + 3 inputs bad)."""
  _save(root / 'images' / 'a.png', seed=1)
  _save(root / 'images' / 'b.png', seed=2)
  (root / 'train.json').write_text(json.dumps([
      {'id': 'a', 'image': 'a.png', 'conversations': _turns(
          '<image>\n[refer] where is <p>the car</p>', '{<10><20><50><60>}')},
      {'id': 'b', 'image': 'b.png', 'conversations': _turns('<image>\nWhat is here?', 'grass')},
      {'id': 'gone', 'image': 'nope.png', 'conversations': _turns('<image>\nq', 'x')},
      {'id': 'a', 'image': 'b.png', 'conversations': _turns('<image>\nq', 'x')},   # duplicate id
  ]))
  (root / 'test.jsonl').write_text('\n'.join([
      json.dumps({'id': 't', 'image': 'a.png', 'conversations': _turns('<image>\nq?', 'y')}),
      '{broken json',
      json.dumps({'id': 'u', 'image': '../train.json', 'conversations': _turns('<image>\nq', 'x')}),
  ]) + '\n')
  return 4 + 3


# ------------------------------------------------------------------------- the builders

def test_instruct_builder(tmp_path):
  n_inputs = _instruct_manual(tmp_path / 'manual')
  summary = builders.build('instruct', tmp_path / 'manual', tmp_path / 'tfds',
                           config='geochat', licence='CC0')
  out = tmp_path / 'tfds' / 'skymoe_instruct' / 'geochat' / '1.0.0'
  assert summary['out'] == str(out) and summary['name'] == 'skymoe_instruct'
  assert summary['splits'] == {'train': 2, 'test': 1}
  assert summary['skipped'] == {'duplicate_id': 1, 'image_outside_images_dir': 1,
                                'invalid_json': 1, 'missing_image': 1}
  assert summary['written'] + sum(summary['skipped'].values()) == n_inputs
  meta = records.read_info(out)['metadata']
  assert meta['skipped_per_split'] == {
      'train': {'duplicate_id': 1, 'missing_image': 1},
      'test': {'image_outside_images_dir': 1, 'invalid_json': 1}}
  got = _all(out)
  assert [r.id for r in got['train']] == ['a', 'b'] and [r.id for r in got['test']] == ['t']
  # The original image bytes, unchanged; boxes in pixels of the 24x16 image.
  assert got['train'][0].image == (tmp_path / 'manual' / 'images' / 'a.png').read_bytes()
  np.testing.assert_allclose(got['train'][0].boxes, [[2.4, 3.2, 12, 9.6]], rtol=1e-6)
  assert got['train'][0].labels == ['the car'] and got['train'][0].licence == 'CC0'


def test_neon_builder(tmp_path):
  data = tmp_path / 'tiles'
  _save(data / 'tile.png', (300, 200), 0)
  _save(data / 'big.png', (90, 90), 1)
  (data / 'trees.csv').write_text('image_path,xmin,ymin,xmax,ymax,label\n'
                                  'tile.png,10,10,40,40,Tree\ntile.png,50,50,45,60,Tree\n'
                                  'tile.png,400,10,420,20,Tree\nbig.png,1,1,9,9,Tree\n'
                                  'gone.png,1,1,9,9,Tree\n')
  summary = builders.build_at(tmp_path / 'out', 'neon', data, test_tiles=(),
                              max_image_pixels=300 * 200)
  # tile.png: one crop -> count + refer; boxes: 1 kept, 1 bad (x2 < x1), 1 outside the image.
  # big.png: 8100 pixels, kept; gone.png: no file.
  assert summary['splits'] == {'train': 4}
  assert summary['skipped'] == {'bad_box': 2, 'missing_image': 1}
  assert summary['tiles'] == 2 and summary['crops'] == 2
  ids = [r.id for r in _all(tmp_path / 'out')['train']]
  assert ids == ['neon_trees/big/0_0/count', 'neon_trees/big/0_0/refer',
                 'neon_trees/tile/0_0/count', 'neon_trees/tile/0_0/refer']


def test_synthetic_builder_and_the_sources_cache(tmp_path):
  config = load_config('tiny')
  config.data.synthetic.update(num_images=6, image_size=64, val_fraction=0.5,
                               cache_dir=str(tmp_path / 'cache'))
  sources.resolve_sources(config)
  data_dir = config.data.sources.synthetic.data_dir
  assert data_dir == str(sources.synthetic_dir(config))
  info = records.read_info(data_dir)
  assert info['name'] == 'skymoe_synthetic' and info['splits'] == {
      'train': sum(len(synthetic.image_records(0, 'train', i, 64)) for i in range(3)),
      'validation': sum(len(synthetic.image_records(0, 'validation', i, 64)) for i in range(3))}
  # Record i of a split is the i-th generated record: the records of image 0 come first.
  first = synthetic.image_records(0, 'train', 0, 64)
  for want, got in zip(first, _all(data_dir)['train']):
    _same(want, got)


def test_records_and_a_corrupt_file_name_the_place(tmp_path):
  good = synthetic.image_records(1, 'train', 0, 64)[0]
  builders.write_records(tmp_path / 'd', {'train': [good, good]})
  reader = records.open_split(tmp_path / 'd', 'train')
  _same(good, reader.record(1))
  assert reader.where(1) == f'{tmp_path / "d"} split train record 1'
  with pytest.raises(IndexError):
    reader.record(2)
  with pytest.raises(KeyError, match="no split 'test'"):
    records.open_split(tmp_path / 'd', 'test')
  with pytest.raises(FileNotFoundError, match='tfds version folder'):
    records.read_info(tmp_path / 'nothing')


# ------------------------------------------------------------------- from the command line

def _build_on_the_command_line(tmp_path, command, *flags):
  """`command` builds skymoe_instruct/geochat byte for byte as builders.build does."""
  n_inputs = _instruct_manual(tmp_path / 'manual')
  proc = subprocess.run(
      command + ['build', 'skymoe_instruct/geochat', f'--manual_dir={tmp_path / "manual"}',
                 f'--data_dir={tmp_path / "tfds"}', *flags],
      capture_output=True, text=True, cwd=REPO, timeout=300, env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / 'tfds' / 'skymoe_instruct' / 'geochat' / '1.0.0'
  summary = builders.summary(out)
  assert summary['written'] + sum(summary['skipped'].values()) == n_inputs
  assert summary['splits'] == {'train': 2, 'test': 1}
  builders.build('instruct', tmp_path / 'manual', tmp_path / 'api', config='geochat')
  api = tmp_path / 'api' / 'skymoe_instruct' / 'geochat' / '1.0.0'
  files = sorted(out.glob('*.array_record-*'))
  assert files
  for path in files:
    assert path.read_bytes() == (api / path.name).read_bytes()


def test_tfds_build_from_the_command_line(tmp_path):
  """data_prep/tfds_build.py: tfds' own build command with the builders registered."""
  _build_on_the_command_line(tmp_path, [sys.executable, str(REPO / 'data_prep' / 'tfds_build.py')])


def test_tfds_console_script(tmp_path):
  """The `tfds` script itself, where what it imports at start-up is installed (the data extra)."""
  pytest.importorskip('apache_beam')
  pytest.importorskip('mlcroissant')
  tfds_cli = pathlib.Path(sys.executable).parent / 'tfds'
  _build_on_the_command_line(tmp_path, [str(tfds_cli)], '--imports=skymoe_jax.data.builders')


# ------------------------------------------------------------- the pipeline on tfds data

@pytest.fixture(scope='module')
def two_datasets(tmp_path_factory):
  root = tmp_path_factory.mktemp('tfds_pipeline')
  synthetic.generate(root / 'a', num_images=8, seed=5, image_size=64, val_fraction=0.25)
  b = [r for i in range(3) for r in synthetic.image_records(9, 'train', i, 64)]
  b = [records.Record(**{**r.__dict__, 'id': 'b-' + r.id}) for r in b]
  builders.write_records(root / 'b', {'train': b})
  tok = tokenizer_lib.ensure(root / 'tok', [root / 'a', root / 'b'], 256)
  return root, tok


def _two_source_config(root, weight_a=0.75, weight_b=0.25):
  c = load_config('tiny')
  c.data.sources = {
      'a': dict(data_dir=str(root / 'a'), split='train', weight=weight_a, generate=''),
      'b': dict(data_dir=str(root / 'b'), split='train', weight=weight_b, generate='')}
  c.data.cda.enabled = True
  return c


def test_pipeline_determinism_and_exact_resume(two_datasets):
  root, tok = two_datasets
  config = _two_source_config(root)
  batches, _ = assert_resumes_exactly(config, tok)
  again = pipeline.BatchBuilder(config, tok, palette=synthetic.COLORS).build(1)
  for k in again:
    np.testing.assert_array_equal(again[k], batches[1][k], err_msg=k)


def test_mixture_of_two_datasets_by_weight(two_datasets, monkeypatch):
  root, tok = two_datasets
  builder = pipeline.BatchBuilder(_two_source_config(root), tok)
  assert builder.source_names == ['a', 'b']
  drawn = np.asarray([builder.mixture(p)[0] for p in range(pipeline.MIXTURE_BLOCK)])
  assert (drawn == 0).sum() == 750 and (drawn == 1).sum() == 250
  loaded = []
  real = builder._load

  def load(source, index):
    sample = real(source, index)
    loaded.append((source, sample.id))
    return sample
  monkeypatch.setattr(builder, '_load', load)
  for step in range(4):
    builder.build(step)
  assert {s for s, _ in loaded} == {0, 1}
  assert all(i.startswith('b-') == (s == 1) for s, i in loaded)   # each from its own dataset


# ---------------------------------------------------------------- the old shard format

def _old_dataset(out, recs, corrupt_at=None):
  """The format before tfds: <split>-NNNNN.tfrecord shards of records.encode + the info file."""
  out.mkdir(parents=True)
  files = []
  for k in range(0, len(recs), 2):
    name = f'train-{k // 2:05d}.tfrecord'
    with tf.io.TFRecordWriter(str(out / name)) as w:
      for j, r in enumerate(recs[k:k + 2]):
        w.write(b'\x08not an Example' if k + j == corrupt_at else records.encode(r))
    files.append(name)
  (out / 'dataset_info.json').write_text(json.dumps({
      'name': 'old_data', 'licence': 'CC0', 'splits': {'train': {'files': files,
                                                                  'records': len(recs)}},
      'skipped': {'missing_image': 2}}))


def test_old_format_is_refused_with_the_migration_command(tmp_path):
  recs = synthetic.image_records(2, 'train', 0, 64)
  _old_dataset(tmp_path / 'old', recs)
  for opened in (lambda: records.open_split(tmp_path / 'old', 'train'),
                 lambda: records.read_info(tmp_path / 'old')):
    with pytest.raises(records.OldFormatError, match='migrate_shards.py --old=') as e:
      opened()
    assert str(tmp_path / 'old') in str(e.value)
  config = load_config('tiny')
  config.data.sources.synthetic.update(data_dir=str(tmp_path / 'old'), generate='')
  with pytest.raises(records.OldFormatError, match='migrate_shards'):
    sources.resolve_sources(config)


def test_migration_round_trip(tmp_path):
  recs = [r for i in range(2) for r in synthetic.image_records(4, 'train', i, 64)]
  _old_dataset(tmp_path / 'old', recs, corrupt_at=3)
  proc = subprocess.run(
      [sys.executable, str(REPO / 'data_prep' / 'migrate_shards.py'), f'--old={tmp_path / "old"}',
       f'--out={tmp_path / "new"}'], capture_output=True, text=True, cwd=REPO, timeout=300,
      env=ENV)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  assert summary['written'] == len(recs) - 1 and summary['skipped'] == {'unreadable_record': 1}
  assert 'train-00001.tfrecord record 1' in proc.stderr
  info = records.read_info(tmp_path / 'new')
  assert info['licence'] == 'CC0' and info['metadata']['old_skipped'] == {'missing_image': 2}
  assert info['metadata']['migrated_from']['name'] == 'old_data'
  got = _all(tmp_path / 'new')['train']
  for want, have in zip(recs[:3] + recs[4:], got):
    _same(want, have)


# ------------------------------------------------------------------- a dataset in a bucket

_IN_A_BUCKET = '''
import sys
from skymoe_jax.data import records, synthetic
url, local = sys.argv[1], sys.argv[2]
synthetic.generate(url, 4, 1, 64, 0.25)
assert synthetic.ensure(url, 4, 1, 64, 0.25) == synthetic.ensure(url, 4, 1, 64, 0.25)
synthetic.generate(local, 4, 1, 64, 0.25)
for split in ('train', 'validation'):
  a, b = records.open_split(url, split), records.open_split(local, split)
  assert len(a) == len(b) > 0
  for i in range(len(a)):
    x, y = a.record(i), b.record(i)
    assert (x.id, x.image, x.conversations) == (y.id, y.image, y.conversations)
assert 'gs://' in a.where(0)
print('bucket ok')
'''


def test_a_dataset_in_a_bucket_reads_like_a_local_one(tmp_path):
  """synthetic.generate into gs:// (built locally, uploaded) and read back through tfds'
  ArrayRecord data source from the bucket, on a local GCS emulator."""
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  emulator = pathlib.Path(sys.executable).parent / 'gcp-storage-emulator'
  if not emulator.exists():
    pytest.skip('gcp-storage-emulator not installed')
  proc = subprocess.Popen([str(emulator), 'start', '--host=127.0.0.1', f'--port={port}',
                           '--in-memory', '--default-bucket=bkt'],
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    for _ in range(100):
      try:
        socket.create_connection(('127.0.0.1', port), timeout=0.2).close()
        break
      except OSError:
        time.sleep(0.1)
    host = f'http://127.0.0.1:{port}'
    env = dict(ENV, EPATH_USE_TF='false', STORAGE_EMULATOR_HOST=host,
               CLOUD_STORAGE_EMULATOR_ENDPOINT=host)
    run = subprocess.run([sys.executable, '-c', _IN_A_BUCKET, 'gs://bkt/cache/syn',
                          str(tmp_path / 'local')], capture_output=True, text=True, env=env,
                         timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'bucket ok' in run.stdout
  finally:
    proc.terminate()
    proc.wait(timeout=30)


def test_an_old_format_synthetic_cache_is_regenerated(tmp_path):
  """The synthetic cache of a run before tfds is this module's own data: ensure() replaces it."""
  recs = synthetic.image_records(1, 'train', 0, 64)
  _old_dataset(tmp_path / 'cache', recs)
  info = json.loads((tmp_path / 'cache' / 'dataset_info.json').read_text())
  info['name'] = synthetic.NAME
  (tmp_path / 'cache' / 'dataset_info.json').write_text(json.dumps(info))
  synthetic.ensure(tmp_path / 'cache', 4, 1, 64, 0.25)
  assert records.read_info(tmp_path / 'cache')['name'] == synthetic.BUILDER
  assert not list((tmp_path / 'cache').glob('*.tfrecord'))
  _same(recs[0], records.open_split(tmp_path / 'cache', 'train').record(0))


def test_a_build_never_replaces_another_dataset_or_a_users_folder(tmp_path):
  n_inputs = _instruct_manual(tmp_path / 'manual')
  builders.build_at(tmp_path / 'mine', 'instruct', tmp_path / 'manual')
  good = synthetic.image_records(1, 'train', 0, 64)[0]
  builders.write_records(tmp_path / 'other', {'train': [good]})
  (tmp_path / 'user').mkdir()
  (tmp_path / 'user' / 'notes.txt').write_text('mine')
  for out, match in (('other', "holds dataset 'skymoe_records'"), ('user', 'holds no dataset')):
    with pytest.raises(FileExistsError, match=match):
      builders.build_at(tmp_path / out, 'instruct', tmp_path / 'manual')
  assert (tmp_path / 'user' / 'notes.txt').read_text() == 'mine'
  assert len(records.open_split(tmp_path / 'other', 'train')) == 1
  # The same builder's dataset is replaced (a rebuild).
  summary = builders.build_at(tmp_path / 'mine', 'instruct', tmp_path / 'manual')
  assert summary['written'] + sum(summary['skipped'].values()) == n_inputs
