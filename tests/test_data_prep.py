"""Converters (data_prep/, skymoe_jax/data/convert/): small files in each published layout, written
here, converted and read back through records.ShardReader."""
import io
import json
import logging
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from skymoe_jax.data import boxes
from skymoe_jax.data import records
from skymoe_jax.data.convert import benchmarks, instruct, neon

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
  reader = records.ShardReader(out, split)
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
  images, entries, want_skips, a_pixels, c_pixels = _instruct_files(tmp_path)
  src = tmp_path / 'geochat.json'
  src.write_text(json.dumps(entries))
  out = tmp_path / 'out'
  with caplog.at_level(logging.WARNING):
    summary = instruct.convert(src, images, out, split='train', licence='test-licence')
  assert summary['skipped'] == want_skips
  assert summary['written'] == 4 and summary['splits'] == {'train': 4}
  info = records.read_info(out)
  assert info['name'] == 'geochat' and info['skipped'] == want_skips
  # Every skip is logged with the file, the record and the field.
  assert any('geochat.json' in r.message and "'b1'" in r.message and 'conversations' in r.message
             and 'unparsable_box' in r.message for r in caplog.records)
  assert any("'f1'" in r.message and "'image'" in r.message for r in caplog.records)

  got = {r.id: r for r in _read(out, 'train')}
  assert list(got) == ['g1', 'g2', 'g3', '7']
  g1, g2, g3, g7 = got['g1'], got['g2'], got['g3'], got['7']
  assert (g1.task, g1.granularity, g1.source, g1.licence) == (
      'grounding', 'local', 'geochat', 'test-licence')
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


def test_instruct_jsonl_merges_splits(tmp_path):
  images, entries, want_skips, _, _ = _instruct_files(tmp_path)
  out = tmp_path / 'out'
  (tmp_path / 'd.json').write_text(json.dumps(entries[:2]))
  instruct.convert(tmp_path / 'd.json', images, out, split='train')
  lines = [json.dumps(e) for e in entries] + ['{not json', '']
  (tmp_path / 'd.jsonl').write_text('\n'.join(lines))
  summary = instruct.convert(tmp_path / 'd.jsonl', images, out, split='test', source='d')
  assert summary['skipped'] == dict(sorted({**want_skips, 'invalid_json': 1}.items()))
  info = records.read_info(out)
  assert {s: e['records'] for s, e in info['splits'].items()} == {'train': 2, 'test': 4}
  assert info['skipped_per_split'] == {'test': summary['skipped']}
  assert [r.id for r in _read(out, 'train')] == ['g1', 'g2']
  assert [r.id for r in _read(out, 'test')] == ['g1', 'g2', 'g3', '7']
  # Another dataset's folder is refused before anything in it is touched.
  with pytest.raises(ValueError, match="holds dataset 'd'"):
    instruct.convert(tmp_path / 'd.jsonl', images, out, split='test', source='other')
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
  images, entries, want_skips, _, _ = _instruct_files(tmp_path)
  (tmp_path / 'd.jsonl').write_text('\n'.join(json.dumps(e) for e in entries))
  proc = subprocess.run(
      [sys.executable, str(REPO / 'data_prep' / 'convert_instruct.py'),
       f'--input={tmp_path / "d.jsonl"}', f'--images={images}', f'--out={tmp_path / "out"}',
       '--split=val'], capture_output=True, text=True, cwd=REPO, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().split('\n')[-1])
  assert summary['written'] == 4 and summary['skipped'] == want_skips
  assert summary['splits'] == {'val': 4}
  assert 'unparsable_box' in proc.stderr and 'd.jsonl' in proc.stderr


# --------------------------------------------------------------------------------- benchmarks

@pytest.mark.filterwarnings('ignore:Corrupt EXIF')  # PIL, on the deliberately broken TIFF
def test_ucmerced_stratified_split(tmp_path):
  images = tmp_path / 'manual' / 'UCMerced_LandUse' / 'Images'
  pixels = {}
  for k, cls in enumerate(('agricultural', 'denseresidential', 'airplane')):
    for i in range(5):
      pixels[f'{cls}{i:02d}'] = _save(images / cls / f'{cls}{i:02d}.tif', (8, 8), 10 * k + i,
                                      fmt='TIFF')
  # A class of one broken image: one image goes to train (20% of 1 rounds to 0), and is skipped.
  (images / 'beach').mkdir()
  (images / 'beach' / 'beach00.tif').write_bytes(b'II*\x00not a tiff')
  (images / 'airplane' / 'Thumbs.db').write_bytes(b'x')
  summary = benchmarks.convert('ucmerced', tmp_path / 'manual', tmp_path / 'out', seed=3)
  assert summary['skipped'] == {'not_an_image_file': 1, 'undecodable_image': 1}
  # 5 per class: 60/20/20 -> 3/1/1.
  assert summary['splits'] == {'train': 9, 'val': 3, 'test': 3}
  per_split = {s: _read(tmp_path / 'out', s) for s in ('train', 'val', 'test')}
  for split, recs in per_split.items():
    answers = sorted(r.conversations[1]['value'] for r in recs)
    if split != 'train':
      assert answers == ['agricultural', 'airplane', 'dense residential']
  r = per_split['test'][0]
  assert (r.task, r.granularity, r.source) == ('scene_classification', 'global', 'ucmerced')
  assert r.conversations[0]['value'].startswith('<image>\nClassify the scene of this image')
  assert 'dense residential' in r.conversations[0]['value']
  fmt, got = _decode(r.image)
  assert fmt == 'PNG'
  np.testing.assert_array_equal(got, pixels[r.id.split('/')[-1]])
  # The split is a function of the seed.
  ids = lambda out: sorted(r.id for r in _read(out, 'test'))
  benchmarks.convert('ucmerced', tmp_path / 'manual', tmp_path / 'again', seed=3)
  assert ids(tmp_path / 'again') == ids(tmp_path / 'out')


def test_resisc45_split_lists(tmp_path):
  root = tmp_path / 'manual' / 'NWPU-RESISC45'
  for cls in ('airplane', 'baseball_diamond'):
    for i in range(1, 4):
      _save(root / cls / f'{cls}_{i:03d}.jpg', (8, 8), i)
  manual = tmp_path / 'manual'
  (manual / 'resisc45-train.txt').write_text('airplane_001.jpg\nairplane_002.jpg\n'
                                             'baseball_diamond_001.jpg\n')
  (manual / 'resisc45-test.txt').write_text('airplane_003.jpg\nbaseball_diamond_002.jpg\n')
  summary = benchmarks.convert('nwpu_resisc45', manual, tmp_path / 'out')
  assert summary['splits'] == {'train': 3, 'test': 2}
  assert summary['skipped'] == {'not_in_split_lists': 1}   # baseball_diamond_003.jpg
  test = _read(tmp_path / 'out', 'test')
  assert [r.conversations[1]['value'] for r in test] == ['airplane', 'baseball diamond']
  assert test[0].image == (root / 'airplane' / 'airplane_003.jpg').read_bytes()
  assert records.read_info(tmp_path / 'out')['licence'] == benchmarks.LICENCES['nwpu_resisc45']


def _rsvqa_files(root):
  _save(root / 'Images_LR' / '0.tif', (16, 16), 0, fmt='TIFF')
  _save(root / 'Images_LR' / '1.tif', (16, 16), 1, fmt='TIFF')
  qs = [  # (id, img_id, type, question, answer)
      (10, 0, 'presence', 'Is a road present?', 'yes'),
      (11, 0, 'comparison', 'Are there more buildings than water areas?', 'no'),
      (12, 1, 'rural_urban', 'Is it a rural or an urban area', 'rural'),
      (13, 1, 'count', 'How many buildings are there?', '4'),
      (14, 2, 'presence', 'Is there a farmland?', 'no'),   # image 2 listed, file missing
  ]
  questions = [dict(id=q, img_id=i, type=t, question=text, answers_ids=[100 + q], active=True)
               for q, i, t, text, _ in qs]
  questions.append(dict(id=15, img_id=0, type='presence', question='old', answers_ids=[115],
                        active=False))
  questions.append(dict(id=16, img_id=0, type='presence', question='Is there water?',
                        answers_ids=[999], active=True))     # no such answer
  answers = [dict(id=100 + q, question_id=q, answer=a, active=True) for q, _, _, _, a in qs]
  images = [dict(id=i, questions_ids=[], active=True) for i in range(3)]
  for split in ('train', 'val', 'test'):
    for key, value in (('questions', questions), ('answers', answers), ('images', images)):
      (root / f'LR_split_{split}_{key}.json').write_text(json.dumps({key: value}))


def test_rsvqa_lr(tmp_path):
  _rsvqa_files(tmp_path)
  summary = benchmarks.convert('rsvqa_lr', tmp_path, tmp_path / 'out')
  assert summary['splits'] == {'train': 4, 'val': 4, 'test': 4}
  assert summary['skipped'] == {'inactive_question': 3, 'missing_answer': 3, 'missing_image': 3}
  test = _read(tmp_path / 'out', 'test')
  assert [r.id for r in test] == ['rsvqa_lr/test/10/presence', 'rsvqa_lr/test/11/comparison',
                                  'rsvqa_lr/test/12/rural_urban', 'rsvqa_lr/test/13/count']
  assert [r.meta['question_type'] for r in test] == [
      'presence', 'comparison', 'rural_urban', 'count']
  assert test[0].meta == {'question_type': 'presence', 'question_id': 10, 'image_id': 0}
  assert [r.conversations[1]['value'] for r in test] == ['yes', 'no', 'rural', '4']
  assert test[0].conversations[0]['value'] == (
      '<image>\nIs a road present? Answer the question using a single word or phrase.')
  assert [(r.task, r.granularity) for r in test] == [('vqa', 'mixed')] * 3 + [('counting', 'local')]
  np.testing.assert_array_equal(_decode(test[3].image)[1], _pixels((16, 16), 1))


def _voc(path, filename, size, objects):
  root = ET.Element('annotation')
  ET.SubElement(root, 'filename').text = filename
  sz = ET.SubElement(root, 'size')
  for k, v in zip(('width', 'height', 'depth'), (*size, 3)):
    ET.SubElement(sz, k).text = str(v)
  for name, box, description in objects:
    obj = ET.SubElement(root, 'object')
    ET.SubElement(obj, 'name').text = name
    bb = ET.SubElement(obj, 'bndbox')
    for k, v in zip(('xmin', 'ymin', 'xmax', 'ymax'), box):
      ET.SubElement(bb, k).text = str(v)
    if description is not None:
      ET.SubElement(obj, 'description').text = description
  path.parent.mkdir(parents=True, exist_ok=True)
  ET.ElementTree(root).write(path)


def test_dior_rsvg(tmp_path):
  root = tmp_path / 'DIOR_RSVG'
  for stem in ('00001', '00002', '00010'):
    _save(root / 'JPEGImages' / f'{stem}.jpg', (80, 40), int(stem))
  # Object indices in file order: 0, 1 (00001), 2 (00002), 3, 4 (00010).
  _voc(root / 'Annotations' / '00001.xml', '00001.jpg', (80, 40), [
      ('vehicle', (8, 4, 40, 20), 'the white car on the left'),
      ('ship', (0, 0, 80, 40), 'the big ship')])
  _voc(root / 'Annotations' / '00002.xml', '00002.jpg', (80, 40), [
      ('dam', (10, 10, 5, 30), 'a broken box')])          # x2 < x1
  _voc(root / 'Annotations' / '00010.xml', '00010.jpg', (80, 40), [
      ('bridge', (20, 8, 60, 32), None),                  # no description
      ('windmill', (40, 20, 60, 40), 'the windmill at the bottom')])
  (root / 'train.txt').write_text('0\n2\n')
  (root / 'val.txt').write_text('1\n3\n')
  (root / 'test.txt').write_text('4\n9\n')
  summary = benchmarks.convert('dior_rsvg', tmp_path, tmp_path / 'out')
  assert summary['splits'] == {'train': 1, 'val': 1, 'test': 1}
  assert summary['skipped'] == {'bad_box': 1, 'index_not_found': 1, 'missing_field': 1}
  train, test = _read(tmp_path / 'out', 'train'), _read(tmp_path / 'out', 'test')
  r = train[0]
  assert r.id == 'dior_rsvg/train/0' and (r.task, r.granularity) == ('grounding', 'local')
  assert r.conversations[0]['value'] == '<image>\n[refer] the white car on the left'
  # 80x40: 8/80 -> 10, 4/40 -> 10, 40/80 -> 50, 20/40 -> 50.
  assert r.conversations[1]['value'] == '{<10><10><50><50>}'
  np.testing.assert_allclose(r.boxes, [[8, 4, 40, 20]])
  assert r.labels == ['vehicle']
  assert r.image == (root / 'JPEGImages' / '00001.jpg').read_bytes()
  # The answer parses back to the record's box within half a quantisation step (0.5% of a side).
  t = test[0]
  got = boxes.parse('geochat', t.conversations[1]['value'], 80, 40)[0]
  np.testing.assert_allclose([got.x1, got.y1, got.x2, got.y2], t.boxes[0], atol=0.4)
  assert t.labels == ['windmill']


def test_ucm_captions(tmp_path):
  manual = tmp_path / 'manual'
  for i in (1, 2, 3):
    _save(manual / 'imgs' / f'{i}.tif', (8, 8), i, fmt='TIFF')
  caps = lambda *c: [{'raw': x, 'tokens': x.split()} for x in c]
  (manual / 'dataset.json').write_text(json.dumps({'dataset': 'ucm', 'images': [
      {'filename': '1.tif', 'imgid': 0, 'split': 'train',
       'sentences': caps('There is a farmland .', ' Many fields . ')},
      {'filename': '2.tif', 'imgid': 1, 'split': 'test', 'sentences': caps('A runway .')},
      {'filename': '3.tif', 'imgid': 2, 'split': 'test', 'sentences': []},
      {'filename': '4.tif', 'imgid': 3, 'split': 'val', 'sentences': caps('Missing image .')},
  ]}))
  summary = benchmarks.convert('ucm_captions', manual, tmp_path / 'out')
  assert summary['splits'] == {'train': 1, 'test': 1}
  assert summary['skipped'] == {'missing_field': 1, 'missing_image': 1}
  r = _read(tmp_path / 'out', 'train')[0]
  assert (r.id, r.task, r.granularity) == ('ucm_captions/train/0', 'captioning', 'global')
  assert r.conversations[1]['value'] == 'There is a farmland .'
  assert r.meta == {'references': ['There is a farmland .', 'Many fields .']}
  assert _decode(r.image)[0] == 'PNG'


@pytest.mark.parametrize('name,expected', [
    ('ucmerced', 'UCMerced_LandUse/Images'), ('nwpu_resisc45', 'NWPU-RESISC45/<class>'),
    ('rsvqa_lr', 'Images_LR'), ('dior_rsvg', 'DIOR_RSVG/Annotations'),
    ('ucm_captions', 'dataset.json')])
def test_missing_layout_names_expected_path(tmp_path, name, expected):
  with pytest.raises(benchmarks.LayoutError, match='published layout') as e:
    benchmarks.convert(name, tmp_path, tmp_path / 'out')
  assert expected in str(e.value) and str(tmp_path) in str(e.value)


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
  summary = neon.convert(tmp_path / 'out', data_dir=data, test_tiles=())
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
  summary = neon.convert(tmp_path / 'out', data_dir=data)
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
