"""The synthetic scene dataset: exact boxes, answers true to the annotations, determinism, files."""
import collections
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from skymoe_jax.data import boxes
from skymoe_jax.data import records
from skymoe_jax.data import synthetic
from skymoe_jax.data import tasks

REPO = pathlib.Path(__file__).resolve().parents[1]
PARAMS = dict(num_images=24, seed=7, image_size=128, val_fraction=0.25)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  out = tmp_path_factory.mktemp('syn') / 'data'
  summary = synthetic.generate(out, **PARAMS)
  return out, summary


def _all_records(data_dir):
  out = {}
  for split in synthetic.SPLITS:
    reader = records.open_split(data_dir, split)
    out[split] = [reader.record(i) for i in range(len(reader))]
    reader.close()
  return out


def _files(data_dir):
  return {p.name: p.read_bytes() for p in sorted(pathlib.Path(data_dir).iterdir())}


def _check_objects(image, objects):
  """Every box is the tight box of exactly its object's pixels (see synthetic's docstring)."""
  h, w, _ = image.shape
  covered = 0
  for label, color, (x1, y1, x2, y2) in objects:
    assert label in synthetic.OBJECT_CLASSES and color in synthetic.COLORS
    assert 0 <= x1 < x2 <= w and 0 <= y1 < y2 <= h, (x1, y1, x2, y2)
    mask = synthetic.object_mask(image, (x1, y1, x2, y2))[y1:y2, x1:x2]
    # The drawn pixels touch all four sides of the box...
    assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()
    # ...are its palette colour or that colour's shade, with the colour itself present...
    pixels = {tuple(p) for p in image[y1:y2, x1:x2][mask]}
    assert pixels <= {synthetic.COLORS[color], synthetic.SHADES[color]}
    assert synthetic.COLORS[color] in pixels
    # ...and nothing of any object lies in the one-pixel ring around the box.
    ring = np.zeros((h, w), bool)
    ring[max(y1 - 1, 0):y2 + 1, max(x1 - 1, 0):x2 + 1] = True
    ring[y1:y2, x1:x2] = False
    assert not (ring & (image[..., 0] % 2 == 0)).any()
    covered += int(mask.sum())
  # No object pixel outside every box (boxes never overlap, so the sum counts each pixel once).
  assert covered == int((image[..., 0] % 2 == 0).sum())


@pytest.mark.parametrize('image_size', [128, 64, 200])
def test_boxes_are_exact(image_size):
  seen = collections.Counter()
  for i in range(36):
    scene = synthetic.SCENES[i % len(synthetic.SCENES)]
    image, objects = synthetic.render_scene(np.random.default_rng([5, i]), scene, image_size)
    assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
    assert len(objects) <= synthetic.MAX_OBJECTS
    _check_objects(image, objects)
    seen.update(o.label for o in objects)
  assert set(seen) == set(synthetic.OBJECT_CLASSES), seen


def test_helpers():
  assert synthetic.position_name((0, 0, 10, 10), 120, 90) == 'top left'
  assert synthetic.position_name((55, 40, 65, 50), 120, 90) == 'centre'
  assert synthetic.position_name((100, 80, 120, 90), 120, 90) == 'bottom right'
  assert synthetic.position_name((110, 40, 120, 50), 120, 90) == 'right'
  assert synthetic.plural('storage tank') == 'storage tanks'
  objects = [synthetic.SceneObject('ship', 'red', (0, 0, 5, 5))] * 3 + [
      synthetic.SceneObject('car', 'blue', (9, 9, 12, 12))]
  assert synthetic.caption('harbour', objects) == 'A harbour scene with three ships and one car.'
  assert synthetic.caption('airport', []) == 'An airport scene with no objects.'


def _prompt(record):
  return record.conversations[0]['value']


def test_answers_match_annotations(dataset):
  data_dir, _ = dataset
  size = PARAMS['image_size']
  kinds, task_names, granularities = collections.Counter(), set(), set()
  scenes = {}
  for split, recs in _all_records(data_dir).items():
    for r in recs:
      prompt, answer = _prompt(r), r.conversations[1]['value']
      assert prompt.startswith('<image>\n')
      task, granularity, _ = tasks.classify(prompt)
      assert tasks.TASKS[task] == r.task, (prompt, r.task)
      assert tasks.GRANULARITIES[granularity] == r.granularity, (prompt, r.granularity)
      kind = r.id.rsplit('-', 1)[1]
      kinds[kind] += 1
      task_names.add(r.task)
      granularities.add(r.granularity)
      image = np.asarray(Image.open(io.BytesIO(r.image)))
      objects = [synthetic.SceneObject(l, c, tuple(int(v) for v in b))
                 for l, c, b in zip(r.labels, r.colors, r.boxes)]
      _check_objects(image, objects)
      counts = collections.Counter(r.labels)
      image_key = r.id.rsplit('-', 1)[0]
      if kind == 'scene':
        assert answer in synthetic.SCENES
        scenes[image_key] = answer
      elif kind == 'caption':
        assert answer == synthetic.caption(scenes[image_key], objects)
      elif kind == 'count':
        [label] = [c for c in synthetic.OBJECT_CLASSES
                   if re.search(rf'\b{synthetic.plural(c)}\b', prompt)]
        assert answer == str(counts[label]), (prompt, r.labels)
      elif kind == 'refer':
        [(i, o)] = [(i, o) for i, o in enumerate(objects) if f' {o.color} {o.label}' in prompt]
        [got] = boxes.parse('geochat', answer, size, size)
        tol = boxes.get_dialect('geochat').step * size    # one quantisation step, 1% of the side
        assert np.allclose([got.x1, got.y1, got.x2, got.y2], o.box, atol=tol), (answer, o.box)
      elif kind == 'colour':
        m = re.fullmatch(r'<image>\nWhat colour (?:is|does) the (.+?) ((?:at|on|in) the .+?)'
                         r'(?: have)?\?', prompt)
        label, phrase = m.groups()
        [o] = [o for o in objects if o.label == label and
               synthetic.position_phrase(synthetic.position_name(o.box, size, size)) == phrase]
        assert answer == o.color
      elif kind == 'presence':
        [label] = [c for c in synthetic.OBJECT_CLASSES
                   if re.search(rf'\b(an? {c}|{synthetic.plural(c)})\b', prompt)]
        assert answer == ('yes' if counts[label] else 'no')
  assert set(kinds) == set(synthetic.KINDS)
  assert task_names == set(tasks.TASKS)
  assert {'global', 'local'} <= granularities


def test_files_read_back(dataset):
  data_dir, summary = dataset
  info = records.read_info(data_dir)
  assert info['name'] == synthetic.BUILDER and info['licence'] == synthetic.LICENCE
  meta = info['metadata']
  assert meta['generator'] == PARAMS and meta['format_version'] == synthetic.FORMAT_VERSION
  assert meta['skipped'] == {} and meta['counts']['tasks'] == summary['tasks']
  by_split = _all_records(data_dir)
  assert summary['images'] == {'train': 18, 'validation': 6}
  for split, recs in by_split.items():
    assert len(recs) == summary['records'][split] == info['splits'][split]
    assert len({r.id.rsplit('-', 1)[0] for r in recs}) == summary['images'][split]
  ids = [r.id for recs in by_split.values() for r in recs]
  assert len(ids) == len(set(ids))
  assert re.fullmatch(r'syn-train-000000-scene', ids[0])
  # The splits share no image.
  train_images = {r.image for r in by_split['train']}
  assert not train_images & {r.image for r in by_split['validation']}
  all_recs = [r for recs in by_split.values() for r in recs]
  assert summary['tasks'] == {t: sum(r.task == t for r in all_recs) for t in tasks.TASKS}
  assert summary['granularities'] == {
      g: sum(r.granularity == g for r in all_recs) for g in tasks.GRANULARITIES}
  # No temporary folders left next to it.
  assert sorted(p.name for p in data_dir.parent.iterdir()) == ['data']


def test_deterministic(dataset, tmp_path):
  data_dir, _ = dataset
  synthetic.generate(tmp_path / 'same', **PARAMS)
  assert _files(tmp_path / 'same') == _files(data_dir)
  synthetic.generate(tmp_path / 'other', **dict(PARAMS, seed=8))
  same, other = _files(data_dir), _files(tmp_path / 'other')
  shard = 'skymoe_synthetic-train.array_record-00000-of-00001'
  assert same[shard] != other[shard]


def test_ensure(tmp_path):
  out = tmp_path / 'data'
  params = dict(num_images=4, seed=1, image_size=64, val_fraction=0.25)
  assert synthetic.ensure(out, **params) == out
  (out / 'marker').write_text('still here')    # gone if the folder is regenerated
  synthetic.ensure(out, **params)
  assert (out / 'marker').exists()
  synthetic.ensure(out, **dict(params, seed=2))
  assert not (out / 'marker').exists()
  assert records.read_info(out)['metadata']['generator']['seed'] == 2
  # A missing data file also triggers regeneration.
  shard = out / 'skymoe_synthetic-train.array_record-00000-of-00001'
  shard.unlink()
  synthetic.ensure(out, **dict(params, seed=2))
  assert shard.exists()
  # A folder that is not a synthetic dataset is never replaced.
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('mine')
  with pytest.raises(FileExistsError):
    synthetic.ensure(foreign, **params)
  assert (foreign / 'notes.txt').exists()


def test_interrupted_run_keeps_old_dataset(tmp_path, monkeypatch):
  out = tmp_path / 'data'
  synthetic.generate(out, num_images=3, seed=1, image_size=64)
  before = _files(out)
  real = synthetic.image_records

  def failing(seed, split, index, image_size, difficulty):
    if split == 'train' and index == 1:
      raise RuntimeError('interrupted')
    return real(seed, split, index, image_size, difficulty)

  monkeypatch.setattr(synthetic, 'image_records', failing)
  with pytest.raises(RuntimeError, match='interrupted'):
    synthetic.generate(out, num_images=3, seed=2, image_size=64)
  assert _files(out) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ['data']


CLI_PARAMS = dict(num_images=5, seed=3, image_size=64, val_fraction=0.2)


@pytest.fixture(scope='module')
def cli_run(tmp_path_factory):
  """(output folder, stdout) of one run of data_prep/make_synthetic.py."""
  out = tmp_path_factory.mktemp('cli') / 'data'
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run(
      [sys.executable, str(REPO / 'data_prep' / 'make_synthetic.py'), f'--out={out}']
      + [f'--{k}={v}' for k, v in CLI_PARAMS.items()],
      capture_output=True, text=True, env=env, timeout=120, check=True)
  return out, proc.stdout


def test_cli(cli_run):
  out, stdout = cli_run
  summary = json.loads(stdout.strip().splitlines()[-1])
  info = records.read_info(out)
  assert summary['images'] == {'train': 4, 'validation': 1}
  assert summary['records'] == {s: info['splits'][s] for s in synthetic.SPLITS}
  assert summary['out'] == str(out)
  assert sum(summary['tasks'].values()) == sum(summary['records'].values())
  assert sum(summary['granularities'].values()) == sum(summary['records'].values())
  assert info['metadata']['generator'] == CLI_PARAMS


def test_same_records_across_processes(cli_run, tmp_path):
  out, _ = cli_run
  synthetic.generate(tmp_path / 'here', **CLI_PARAMS)
  for split in synthetic.SPLITS:
    theirs, ours = records.open_split(out, split), records.open_split(tmp_path / 'here', split)
    assert len(theirs) == len(ours)
    for i in range(len(ours)):
      a, b = theirs.record(i), ours.record(i)
      assert a.id == b.id and a.image == b.image and a.conversations == b.conversations
      assert a.labels == b.labels and np.array_equal(a.boxes, b.boxes)


def test_byte_identical_across_processes(cli_run, tmp_path):
  out, _ = cli_run
  synthetic.generate(tmp_path / 'here', **CLI_PARAMS)
  assert _files(out) == _files(tmp_path / 'here')
