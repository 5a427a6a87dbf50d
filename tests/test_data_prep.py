"""The instruction and NEON builders (data/builders.py over convert/instruct.py, convert/neon.py)
and their data_prep/ commands: small files in each layout, written here, built as tfds datasets
and read back through records.open_split. (The benchmark builders: test_benchmark_builders.py.)"""
import io
import json
import logging
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from skymoe_jax.data import boxes
from skymoe_jax.data import builders
from skymoe_jax.data import records
from skymoe_jax.data.convert import instruct, neon

REPO = pathlib.Path(__file__).resolve().parents[1]


def _pixels(size, seed):
  w, h = size
  return np.random.default_rng(seed).integers(0, 256, (h, w, 3), np.uint8)


def _save(path, size=(40, 20), seed=0, fmt=None):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  pixels = _pixels(size, seed)
  Image.fromarray(pixels).save(path, format=fmt)
  return pixels


def _decode(data):
  with Image.open(io.BytesIO(data)) as im:
    return im.format, np.asarray(im.convert('RGB'))


def _read(out, split):
  reader = records.open_split(out, split)
  try:
    return [reader.record(i) for i in range(len(reader))]
  finally:
    reader.close()


def _turns(*texts):
  return [{'from': 'human' if i % 2 == 0 else 'gpt', 'value': t} for i, t in enumerate(texts)]


# --------------------------------------------------------------------------- instruction data

def _instruct_files(tmp_path):
  images = tmp_path / 'images'
  a = _save(images / 'a.png', (40, 20), 1)
  _save(images / 'b.jpg', (50, 50), 2)
  c = _save(images / 'sub' / 'c.tif', (16, 8), 3)
  good_png = (images / 'a.png').read_bytes()
  (images / 'broken.png').write_bytes(good_png[:len(good_png) // 2])  # truncated: fails in load
  entries = [
      # 40x20 image: {<10><20><50><60>} -> x 4..20, y 4..12.
      {'id': 'g1', 'image': 'a.png', 'conversations': _turns(
          '<image>\n[refer] give me the location of <p>the red car</p>', '{<10><20><50><60>}')},
      {'id': 'g2', 'image': 'b.jpg', 'conversations': _turns(
          '<image>\n[grounding] Describe the image in detail',
          '<p>a car</p> {<0><0><50><50>} next to <p>a house</p> {<50><50><100><100>|<30>}')},
      {'id': 'g3', 'image': 'sub/c.tif', 'conversations': [
          {'from': 'human', 'value': '<image>\nHow many cars are there?'},
          {'from': 'bot', 'value': '3'}]},
      {'id': 7, 'image': 'a.png', 'conversations': _turns(
          '<image>\n[identify] What is this {<10><10><20><20>}?', 'A car.',
          'What colour is it?', 'Red.')},
      {'id': 'm1', 'image': 'missing.png', 'conversations': _turns('<image>\nWhat is here?', 'x')},
      {'id': 'u1', 'image': 'broken.png', 'conversations': _turns('<image>\nWhat is here?', 'x')},
      {'id': 'e1', 'image': 'a.png', 'conversations': []},
      {'id': 'o1', 'image': 'a.png', 'conversations': [
          {'from': 'gpt', 'value': 'x'}, {'from': 'human', 'value': '<image>\nq'}]},
      {'id': 'o2', 'image': 'a.png', 'conversations': _turns('no image placeholder', 'x')},
      {'id': 'o3', 'image': 'a.png', 'conversations': _turns('<image>\nq', 'a', '<image>\nq', 'a')},
      {'id': 'o4', 'image': 'a.png', 'conversations': _turns('<image>\nq')},  # no answer
      {'id': 't1', 'image': 'a.png', 'conversations': _turns('<image>\n[foo] q', 'x')},
      {'id': 'b1', 'image': 'a.png', 'conversations': _turns(
          '<image>\n[refer] the car', '{<10><20><50>}')},
      {'id': 'b2', 'image': 'a.png', 'conversations': _turns(
          '<image>\n[refer] the car', '{<10><20><150><60>}')},
      {'id': 'g1', 'image': 'a.png', 'conversations': _turns('<image>\nWhat is here?', 'dup')},
      {'id': 'f1', 'conversations': _turns('<image>\nWhat is here?', 'x')},
  ]
  want_skips = {'missing_image': 1, 'undecodable_image': 1, 'malformed_conversation': 5,
                'unknown_task_tag': 1, 'unparsable_box': 2, 'duplicate_id': 1,
                'missing_field': 1}
  return images, entries, want_skips, a, c


def test_instruct_geochat_records_and_skips(tmp_path, caplog):
  images, entries, want_skips, a_pixels, c_pixels = _instruct_files(tmp_path / 'geochat')
  (tmp_path / 'geochat' / 'train.json').write_text(json.dumps(entries))
  with caplog.at_level(logging.WARNING):
    summary = builders.build('instruct', tmp_path / 'geochat', tmp_path / 'tfds',
                             licence='test-licence')
  out = tmp_path / 'tfds' / 'skymoe_instruct' / 'geochat' / '1.0.0'
  assert summary['out'] == str(out)
  assert summary['skipped'] == want_skips
  assert summary['written'] == 4 and summary['splits'] == {'train': 4}
  assert summary['written'] + sum(summary['skipped'].values()) == len(entries)
  info = records.read_info(out)
  assert info['name'] == 'skymoe_instruct' and info['metadata']['skipped'] == want_skips
  assert info['metadata']['skipped_per_split'] == {'train': want_skips}
  assert info['licence'] == 'test-licence' and info['metadata']['box_dialect'] == 'geochat'
  # Every skip is logged with the file, the record and the field.
  assert any('train.json' in r.message and "'b1'" in r.message and 'conversations' in r.message
             and 'unparsable_box' in r.message for r in caplog.records)
  assert any("'f1'" in r.message and "'image'" in r.message for r in caplog.records)

  got = {r.id: r for r in _read(out, 'train')}
  assert list(got) == ['g1', 'g2', 'g3', '7']
  g1, g2, g3, g7 = got['g1'], got['g2'], got['g3'], got['7']
  assert (g1.task, g1.granularity, g1.source, g1.licence) == (
      'grounding', 'local', 'geochat', 'test-licence')   # source: the manual_dir's name
  np.testing.assert_allclose(g1.boxes, [[4, 4, 20, 12]])
  assert g1.labels == ['the red car']
  assert _decode(g1.image)[0] == 'PNG' and g1.image == (images / 'a.png').read_bytes()
  np.testing.assert_array_equal(_decode(g1.image)[1], a_pixels)
  # 50x50: {<0><0><50><50>} -> 0..25; {<50><50><100><100>} -> 25..50; labels from the answer.
  np.testing.assert_allclose(g2.boxes, [[0, 0, 25, 25], [25, 25, 50, 50]])
  assert g2.labels == ['a car', 'a house']
  assert g2.image == (images / 'b.jpg').read_bytes()
  # Boxes round trip: pixels -> dialect text -> the answer's boxes.
  assert boxes.format('geochat', [boxes.Box(*b) for b in g2.boxes.tolist()], 50, 50) == (
      '{<0><0><50><50>}{<50><50><100><100>}')
  # `bot` becomes gpt; TIFF is re-encoded to PNG with the same pixels.
  assert g3.conversations[1] == {'from': 'gpt', 'value': '3'}
  assert (g3.task, g3.granularity) == ('counting', 'local') and len(g3.boxes) == 0
  fmt, pixels = _decode(g3.image)
  assert fmt == 'PNG'
  np.testing.assert_array_equal(pixels, c_pixels)
  # [identify] is local VQA; its box is in the question, not an answer: no record boxes.
  assert (g7.task, g7.granularity, len(g7.conversations), len(g7.boxes)) == ('vqa', 'local', 4, 0)


def test_instruct_json_and_jsonl_splits(tmp_path):
  images, entries, want_skips, _, _ = _instruct_files(tmp_path / 'd')
  (tmp_path / 'd' / 'train.json').write_text(json.dumps(entries[:2]))
  lines = [json.dumps(e) for e in entries] + ['{not json', '']
  (tmp_path / 'd' / 'test.jsonl').write_text('\n'.join(lines))
  out = tmp_path / 'out'
  summary = builders.build_at(out, 'instruct', tmp_path / 'd', source='d')
  test_skips = dict(sorted({**want_skips, 'invalid_json': 1}.items()))
  assert summary['skipped'] == test_skips
  assert summary['splits'] == {'test': 4, 'train': 2}
  info = records.read_info(out)
  assert info['splits'] == {'train': 2, 'test': 4}
  assert info['metadata']['skipped_per_split'] == {'test': test_skips}
  assert [r.id for r in _read(out, 'train')] == ['g1', 'g2']
  assert [r.id for r in _read(out, 'test')] == ['g1', 'g2', 'g3', '7']
  # A split with both a .json and a .jsonl file is refused: which one is meant is unknown.
  (tmp_path / 'd' / 'test.json').write_text('[]')
  with pytest.raises(ValueError, match="split 'test' has two files"):
    builders.build_at(out, 'instruct', tmp_path / 'd')
  assert len(_read(out, 'test')) == 4


@pytest.mark.parametrize('dialect,answer,want', [
    ('vhm', 'at [100, 200, 500, 600]', [[4, 4, 20, 12]]),
    ('lhrs', 'at [0.10, 0.20, 0.50, 0.60]', [[4, 4, 20, 12]]),
    ('vhm', 'at [100, 200, 500]', None),
    ('paligemma', '<loc0256><loc0512><loc0768><loc1000><loc0001>', None),
])
def test_instruct_other_dialects(dialect, answer, want):
  if want is None:
    with pytest.raises(instruct.Skip, match='unparsable_box'):
      instruct.answer_boxes(dialect, answer, '[refer] it', 40, 20)
  else:
    found, labels = instruct.answer_boxes(dialect, answer, '[refer] <p>it</p>', 40, 20)
    np.testing.assert_allclose(found, want)
    assert labels == ['it']


def test_convert_instruct_cli(tmp_path):
  images, entries, want_skips, _, _ = _instruct_files(tmp_path / 'd')
  (tmp_path / 'd' / 'val.jsonl').write_text('\n'.join(json.dumps(e) for e in entries))
  proc = subprocess.run(
      [sys.executable, str(REPO / 'data_prep' / 'convert_instruct.py'),
       f'--manual_dir={tmp_path / "d"}', f'--out={tmp_path / "out"}', '--box_dialect=geochat'],
      capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().split('\n')[-1])
  assert summary['written'] == 4 and summary['skipped'] == want_skips
  assert summary['splits'] == {'val': 4} and summary['out'] == str(tmp_path / 'out')
  assert 'unparsable_box' in proc.stderr and 'val.jsonl' in proc.stderr


# ------------------------------------------------------------------------------------- NEON

def test_crop_starts_and_boxes():
  assert neon.crop_starts(400, 400) == [0] and neon.crop_starts(300, 400) == [0]
  assert neon.crop_starts(1000, 400) == [0, 300, 600]
  assert neon.crop_starts(1249, 400) == [0, 283, 566, 849]
  # Crop (100, 0) 200x200: box 1 inside, box 2 60% inside (kept, clipped), box 3 25% (dropped).
  kept, keep = neon.crop_boxes([[120, 10, 140, 30], [80, 0, 130, 10], [295, 0, 315, 10]],
                               100, 0, 200, 200)
  np.testing.assert_array_equal(keep, [True, True, False])
  np.testing.assert_allclose(kept, [[20, 10, 40, 30], [0, 0, 30, 10]])


def _check_neon(out, summary):
  """Every counting record's answer is its number of boxes; boxes lie in the crop; grounding
  answers parse back to the same boxes; returns {tile: crops}."""
  crops = {}
  for split in summary['splits']:
    for r in _read(out, split):
      fmt, pixels = _decode(r.image)
      h, w = pixels.shape[:2]
      assert r.boxes.shape[1] == 4 and np.all(r.boxes >= 0)
      assert np.all(r.boxes[:, [0, 2]] <= w) and np.all(r.boxes[:, [1, 3]] <= h)
      assert np.all(r.boxes[:, 2] > r.boxes[:, 0]) and np.all(r.boxes[:, 3] > r.boxes[:, 1])
      if r.task == 'counting':
        assert r.conversations[0]['value'] == '<image>\nHow many trees are there in the image?'
        assert int(r.conversations[1]['value']) == len(r.boxes)
        crops.setdefault(r.id.split('/')[1], []).append(r)
      else:
        assert r.task == 'grounding' and len(r.boxes) > 0
        got = boxes.parse('geochat', r.conversations[1]['value'], w, h)
        np.testing.assert_allclose([[b.x1, b.y1, b.x2, b.y2] for b in got], r.boxes,
                                   atol=0.5 * w / 100 + 1e-3)
  return crops


def test_neon_layout_synthetic(tmp_path):
  data = tmp_path / 'data'
  _save(data / 'tile.png', (500, 300), 0)
  _save(data / 'tile.tif', (500, 300), 0, fmt='TIFF')
  # Crops at x 0 and 100 (400x300). Boxes: A in both, B only in crop 100, C only in crop 0,
  # D straddles x=400 (crop 0 sees 50% -> kept), E is bad.
  rows = ['image_path,xmin,ymin,xmax,ymax,label',
          'tile.png,150,10,200,60,Tree', 'tile.png,420,100,480,160,Tree',
          'tile.png,10,200,60,250,Dead', 'tile.png,380,10,420,50,Tree',
          'tile.png,50,50,40,60,Tree']
  (data / 'trees.csv').write_text('\n'.join(rows) + '\n')
  (data / 'partial.csv').write_text(('\n'.join(rows[:2]) + '\n').replace('png', 'tif'))
  (data / 'classes.csv').write_text('Dead,0\nAlive,1\n')
  summary = builders.build_at(tmp_path / 'out', 'neon', data, test_tiles=())
  assert summary['written'] + sum(summary['skipped'].values()) == 4 + 1   # records + bad box
  assert summary['tiles'] == 1 and summary['crops'] == 2 and summary['boxes'] == 4
  assert summary['annotation_files'] == {'tile': 'trees.csv'}
  assert summary['skipped'] == {'bad_box': 1}
  crops = _check_neon(tmp_path / 'out', summary)
  counts = {r.id: int(r.conversations[1]['value']) for r in crops['tile']}
  assert counts == {'neon_trees/tile/0_0/count': 3, 'neon_trees/tile/100_0/count': 3}
  first = [r for r in crops['tile'] if r.id.endswith('0_0/count')][0]
  # Reading order (y, then x); D clipped at the crop edge x=400.
  np.testing.assert_allclose(first.boxes, [[150, 10, 200, 60], [380, 10, 400, 50],
                                           [10, 200, 60, 250]])
  assert first.labels == ['Tree', 'Tree', 'Dead']


def test_neon_deepforest_data(tmp_path):
  data = neon.find_data_dir()
  if data is None:
    pytest.skip('deepforest not installed (pip install --no-deps deepforest==2.1.0)')
  summary = builders.build_at(tmp_path / 'out', 'neon', None)   # found as the wheel's data/
  # docs/design.md section 5: 951 tree boxes; 4 distinct tiles (OSBS_029 ships as .tif and .png).
  assert summary['tiles'] == 4 and summary['boxes'] == 951 and summary['skipped'] == {}
  crops = _check_neon(tmp_path / 'out', summary)
  expected = sum(len(neon.crop_starts(w, 400)) * len(neon.crop_starts(h, 400))
                 for w, h in ((2299, 2472), (1249, 1035), (400, 400), (400, 400)))
  assert summary['crops'] == expected == sum(len(v) for v in crops.values())
  test_tiles = {r.id.split('/')[1] for r in _read(tmp_path / 'out', 'test')}
  assert test_tiles == set(neon.TEST_TILES)
  # The single-crop tiles count every box of their tile.
  assert int(crops['OSBS_029'][0].conversations[1]['value']) == 61
  assert int(crops['SOAP_061'][0].conversations[1]['value']) == 37
  assert records.read_info(tmp_path / 'out')['licence'].startswith('MIT')
