"""The evaluation sources' tfds builders (convert/benchmarks.py SOURCES, data/builders.py): small
files made here in each source's published layout, broken inputs included, built with
builders.build and read back through records.open_split. For every source: written +
skipped-with-reason == the inputs, and the answers are counted by hand."""
import json
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

from skymoe_jax.data import boxes
from skymoe_jax.data import builders
from skymoe_jax.data import image_ops
from skymoe_jax.data import records
from skymoe_jax.data.convert import Skips
from skymoe_jax.data.convert import benchmarks, counting
from test_data_prep import _decode, _pixels, _save  # the same small-image helpers

REPO = pathlib.Path(__file__).resolve().parents[1]



def _build(name, manual, tmp_path, **options):
  return builders.build(name, manual, tmp_path / 'data', **options)


def _read(out, split):
  reader = records.open_split(out, split)
  try:
    return [reader.record(i) for i in range(len(reader))]
  finally:
    reader.close()


def _all(summary):
  return {s: _read(summary['out'], s) for s in summary['splits']}


def _answers(recs):
  return [r.conversations[1]['value'] for r in recs]


def _voc(path, filename, size, objects):
  """A Pascal VOC annotation; objects: (name, box or None, description or None)."""
  root = ET.Element('annotation')
  ET.SubElement(root, 'filename').text = filename
  sz = ET.SubElement(root, 'size')
  for k, v in zip(('width', 'height', 'depth'), (*size, 3)):
    ET.SubElement(sz, k).text = str(v)
  for name, box, description in objects:
    obj = ET.SubElement(root, 'object')
    ET.SubElement(obj, 'name').text = name
    if box is not None:
      bb = ET.SubElement(obj, 'bndbox')
      for k, v in zip(('xmin', 'ymin', 'xmax', 'ymax'), box):
        ET.SubElement(bb, k).text = str(v)
    if description is not None:
      ET.SubElement(obj, 'description').text = description
  path.parent.mkdir(parents=True, exist_ok=True)
  ET.ElementTree(root).write(path)


# ------------------------------------------------------------------------ the table itself

def test_every_source_is_described_and_has_a_builder():
  assert list(benchmarks.SOURCES) == [
      'ucmerced', 'nwpu_resisc45', 'aid', 'whu_rs19', 'rsvqa_lr', 'rsvqa_hr', 'dior_rsvg',
      'ucm_captions', 'sydney_captions', 'rsicd', 'nwpu_captions', 'dota_v2_counting',
      'hrrsd_counting', 'rsod_counting']
  for name, spec in benchmarks.SOURCES.items():
    assert spec.name == name and spec.version == '1.0.0'
    assert spec.citation.startswith('@') and spec.citation.rstrip().endswith('}'), name
    assert 'title={' in spec.citation and 'year={' in spec.citation, name
    assert spec.homepage.startswith('http') and spec.layout and spec.licence, name
    assert set(spec.splits) <= {'train', 'val', 'test', 'test_phili'}, name
    assert builders.BUILDERS[f'skymoe_{name}'].SOURCE == name
  assert benchmarks.SOURCES['rsvqa_hr'].splits == ('train', 'val', 'test', 'test_phili')
  assert benchmarks.SOURCES['dota_v2_counting'].splits == ('train', 'val')


_EXPECTED_PATHS = {
    'ucmerced': 'UCMerced_LandUse/Images', 'nwpu_resisc45': 'NWPU-RESISC45/<class>',
    'aid': 'AID/<class>', 'whu_rs19': 'WHU-RS19/<class>', 'rsvqa_lr': 'RSVQA_LR/Images_LR',
    'rsvqa_hr': 'RSVQA_HR/Data', 'dior_rsvg': 'DIOR_RSVG/Annotations',
    'ucm_captions': 'UCM_captions/dataset.json', 'sydney_captions': 'Sydney_captions/dataset.json',
    'rsicd': 'RSICD/dataset_rsicd.json', 'nwpu_captions': 'NWPU-Captions/dataset_nwpu.json',
    'dota_v2_counting': 'DOTA-v2.0/train', 'hrrsd_counting': 'HRRSD/OPT2017/Annotations',
    'rsod_counting': 'RSOD-Dataset/aircraft'}


@pytest.mark.parametrize('name', list(_EXPECTED_PATHS))
def test_missing_layout_names_expected_path(tmp_path, name):
  spec = benchmarks.SOURCES[name]
  with pytest.raises(benchmarks.LayoutError, match='published layout') as e:
    spec.samples(tmp_path, Skips(), seed=0, licence='x',
                 max_image_pixels=image_ops.MAX_IMAGE_PIXELS)
  assert _EXPECTED_PATHS[name] in str(e.value) and str(tmp_path) in str(e.value)


def test_missing_layout_through_the_builder(tmp_path):
  (tmp_path / 'manual').mkdir()
  (tmp_path / 'manual' / 'README').write_text('the wrong files')   # tfds refuses an empty one
  with pytest.raises(benchmarks.LayoutError, match='UCMerced_LandUse/Images'):
    _build('ucmerced', tmp_path / 'manual', tmp_path)


# ------------------------------------------------------------------- scene classification

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
  summary = _build('ucmerced', tmp_path / 'manual', tmp_path, seed=3)
  assert summary['skipped'] == {'not_an_image_file': 1, 'undecodable_image': 1}
  # 5 per class: 60/20/20 -> 3/1/1.
  assert summary['splits'] == {'train': 9, 'val': 3, 'test': 3}
  assert summary['written'] + 2 == 17   # 16 images and Thumbs.db
  per_split = _all(summary)
  for split, recs in per_split.items():
    if split != 'train':
      assert sorted(_answers(recs)) == ['agricultural', 'airplane', 'dense residential']
  r = per_split['test'][0]
  assert (r.task, r.granularity, r.source) == ('scene_classification', 'global', 'ucmerced')
  assert r.conversations[0]['value'].startswith('<image>\nClassify the scene of this image')
  assert 'dense residential' in r.conversations[0]['value']
  fmt, got = _decode(r.image)
  assert fmt == 'PNG'
  np.testing.assert_array_equal(got, pixels[r.id.split('/')[-1]])
  assert records.read_info(summary['out'])['licence'] == benchmarks.LICENCES['ucmerced']
  # The split is a function of the seed.
  again = builders.build('ucmerced', tmp_path / 'manual', tmp_path / 'again', seed=3)
  ids = lambda s: sorted(r.id for r in _read(s['out'], 'test'))
  assert ids(again) == ids(summary)


def test_resisc45_split_lists(tmp_path):
  root = tmp_path / 'manual' / 'NWPU-RESISC45'
  for cls in ('airplane', 'baseball_diamond'):
    for i in range(1, 4):
      _save(root / cls / f'{cls}_{i:03d}.jpg', (8, 8), i)
  manual = tmp_path / 'manual'
  (manual / 'resisc45-train.txt').write_text('airplane_001.jpg\nairplane_002.jpg\n'
                                             'baseball_diamond_001.jpg\n')
  (manual / 'resisc45-test.txt').write_text('airplane_003.jpg\nbaseball_diamond_002.jpg\n')
  summary = _build('nwpu_resisc45', manual, tmp_path)
  assert summary['splits'] == {'train': 3, 'test': 2}
  assert summary['skipped'] == {'not_in_split_lists': 1}   # baseball_diamond_003.jpg
  test = _read(summary['out'], 'test')
  assert _answers(test) == ['airplane', 'baseball diamond']
  assert test[0].image == (root / 'airplane' / 'airplane_003.jpg').read_bytes()
  assert records.read_info(summary['out'])['licence'] == benchmarks.LICENCES['nwpu_resisc45']


def test_aid_camel_case_classes(tmp_path):
  root = tmp_path / 'AID'
  for cls in ('BareLand', 'Airport'):
    for i in range(1, 6):
      _save(root / cls / f'{cls.lower()}_{i}.jpg', (12, 12), i)
  good = (root / 'Airport' / 'airport_5.jpg').read_bytes()
  (root / 'Airport' / 'airport_5.jpg').write_bytes(good[:len(good) // 2])  # truncated JPEG
  (root / 'Airport' / 'Thumbs.db').write_bytes(b'x')
  summary = _build('aid', tmp_path, tmp_path)
  # 11 files: 10 images (one truncated) and Thumbs.db.
  assert summary['skipped'] == {'not_an_image_file': 1, 'undecodable_image': 1}
  assert summary['written'] == 9 and sum(summary['splits'].values()) == 9
  recs = [r for rs in _all(summary).values() for r in rs]
  assert sorted(set(_answers(recs))) == ['airport', 'bare land']
  prompt = recs[0].conversations[0]['value']
  # The prompt lists all 30 published classes, in words, sorted.
  names = prompt.split('one of these classes: ')[1].split('. Answer')[0].split(', ')
  assert len(names) == 30 and names == sorted(names)
  assert {'bare land', 'baseball field', 'dense residential', 'storage tanks'} <= set(names)
  r = next(r for r in recs if r.id == 'aid/BareLand/bareland_1')
  assert r.image == (root / 'BareLand' / 'bareland_1.jpg').read_bytes()


def test_whu_rs19_split_lists(tmp_path):
  root = tmp_path / 'WHU-RS19'
  for cls in ('Airport', 'railwayStation'):
    for i in range(1, 4):
      _save(root / cls / f'{cls.lower()}_{i:02d}.jpg', (10, 10), i)
  (tmp_path / 'whu_rs19-train.txt').write_text('airport_01.jpg\nrailwaystation_01.jpg\n')
  (tmp_path / 'whu_rs19-val.txt').write_text('airport_02\n')          # a list without extensions
  (tmp_path / 'whu_rs19-test.txt').write_text('railwaystation_02.jpg\n')
  summary = _build('whu_rs19', tmp_path, tmp_path)
  assert summary['splits'] == {'train': 2, 'val': 1, 'test': 1}
  assert summary['skipped'] == {'not_in_split_lists': 2}   # the two _03 images; 4 + 2 == 6
  per_split = _all(summary)
  assert _answers(per_split['train']) == ['airport', 'railway station']
  assert [r.id for r in per_split['val']] == ['whu_rs19/Airport/airport_02']
  assert 'football field' in per_split['test'][0].conversations[0]['value']


# ------------------------------------------------------------------------------ RSVQA LR, HR

_QUESTIONS = [  # (id, img_id, type, question, answer)
    (10, 0, 'presence', 'Is a road present?', 'yes'),
    (11, 0, 'comparison', 'Are there more buildings than water areas?', 'no'),
    (12, 1, 'rural_urban', 'Is it a rural or an urban area', 'rural'),
    (13, 1, 'count', 'How many buildings are there?', '4'),
    (14, 2, 'presence', 'Is there a farmland?', 'no'),   # image 2 listed, file missing
]


def _rsvqa_files(root, prefix, images_dir, splits, questions=_QUESTIONS):
  _save(root / images_dir / '0.tif', (16, 16), 0, fmt='TIFF')
  _save(root / images_dir / '1.tif', (16, 16), 1, fmt='TIFF')
  qs = [dict(id=q, img_id=i, type=t, question=text, answers_ids=[100 + q], active=True)
        for q, i, t, text, _ in questions]
  qs.append(dict(id=15, img_id=0, type='presence', question='old', answers_ids=[115],
                 active=False))
  qs.append(dict(id=16, img_id=0, type='presence', question='Is there water?',
                 answers_ids=[999], active=True))     # no such answer
  answers = [dict(id=100 + q, question_id=q, answer=a, active=True) for q, _, _, _, a in questions]
  images = [dict(id=i, questions_ids=[], active=True) for i in range(3)]
  for split in splits:
    for key, value in (('questions', qs), ('answers', answers), ('images', images)):
      (root / f'{prefix}_{split}_{key}.json').write_text(json.dumps({key: value}))


def test_rsvqa_lr(tmp_path):
  _rsvqa_files(tmp_path, 'LR_split', 'Images_LR', ('train', 'val', 'test'))
  summary = _build('rsvqa_lr', tmp_path, tmp_path)
  assert summary['splits'] == {'train': 4, 'val': 4, 'test': 4}
  # 7 questions per split: 4 written, 3 skipped.
  assert summary['skipped'] == {'inactive_question': 3, 'missing_answer': 3, 'missing_image': 3}
  test = _read(summary['out'], 'test')
  assert [r.id for r in test] == ['rsvqa_lr/test/10/presence', 'rsvqa_lr/test/11/comparison',
                                  'rsvqa_lr/test/12/rural_urban', 'rsvqa_lr/test/13/count']
  assert [r.meta['question_type'] for r in test] == [
      'presence', 'comparison', 'rural_urban', 'count']
  assert test[0].meta == {'question_type': 'presence', 'question_id': 10, 'image_id': 0}
  assert _answers(test) == ['yes', 'no', 'rural', '4']
  assert test[0].conversations[0]['value'] == (
      '<image>\nIs a road present? Answer the question using a single word or phrase.')
  assert [(r.task, r.granularity) for r in test] == [('vqa', 'mixed')] * 3 + [('counting', 'local')]
  np.testing.assert_array_equal(_decode(test[3].image)[1], _pixels((16, 16), 1))


def test_rsvqa_hr_with_test_phili(tmp_path):
  root = tmp_path / 'RSVQA_HR'
  questions = _QUESTIONS[:3] + [(13, 1, 'area', 'What is the area covered by buildings?',
                                 'between 10m2 and 100m2'),
                                (17, 0, 'count', 'How many roads are there?', '2')]
  splits = ('train', 'val', 'test', 'test_phili')
  _rsvqa_files(root, 'USGS_split', 'Data', splits, questions)
  summary = _build('rsvqa_hr', tmp_path, tmp_path)
  assert summary['splits'] == {s: 5 for s in splits}
  # 7 questions per split: 5 written, an inactive one and one without an answer.
  assert summary['skipped'] == {'inactive_question': 4, 'missing_answer': 4}
  phili = _read(summary['out'], 'test_phili')
  assert [r.id for r in phili] == [
      'rsvqa_hr/test_phili/10/presence', 'rsvqa_hr/test_phili/11/comparison',
      'rsvqa_hr/test_phili/12/rural_urban', 'rsvqa_hr/test_phili/13/area',
      'rsvqa_hr/test_phili/17/count']
  assert _answers(phili)[3:] == ['between 10m2 and 100m2', '2']
  assert [(r.task, r.granularity) for r in phili][3:] == [('vqa', 'mixed'), ('counting', 'local')]
  assert phili[4].source == 'rsvqa_hr' and phili[4].meta['image_id'] == 0
  np.testing.assert_array_equal(_decode(phili[4].image)[1], _pixels((16, 16), 0))


# ----------------------------------------------------------------------------------- DIOR-RSVG

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
  summary = _build('dior_rsvg', tmp_path, tmp_path)
  assert summary['splits'] == {'train': 1, 'val': 1, 'test': 1}
  assert summary['skipped'] == {'bad_box': 1, 'index_not_found': 1, 'missing_field': 1}
  train, test = _read(summary['out'], 'train'), _read(summary['out'], 'test')
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


# ---------------------------------------------------------------------------------- captions

def _caps(*c):
  return [{'raw': x, 'tokens': x.split()} for x in c]


def test_ucm_captions(tmp_path):
  manual = tmp_path / 'manual'
  for i in (1, 2, 3):
    _save(manual / 'imgs' / f'{i}.tif', (8, 8), i, fmt='TIFF')
  (manual / 'dataset.json').write_text(json.dumps({'dataset': 'ucm', 'images': [
      {'filename': '1.tif', 'imgid': 0, 'split': 'train',
       'sentences': _caps('There is a farmland .', ' Many fields . ')},
      {'filename': '2.tif', 'imgid': 1, 'split': 'test', 'sentences': _caps('A runway .')},
      {'filename': '3.tif', 'imgid': 2, 'split': 'test', 'sentences': []},
      {'filename': '4.tif', 'imgid': 3, 'split': 'val', 'sentences': _caps('Missing image .')},
  ]}))
  summary = _build('ucm_captions', manual, tmp_path)
  assert summary['splits'] == {'train': 1, 'test': 1}
  assert summary['skipped'] == {'missing_field': 1, 'missing_image': 1}
  r = _read(summary['out'], 'train')[0]
  assert (r.id, r.task, r.granularity) == ('ucm_captions/train/0', 'captioning', 'global')
  assert r.conversations[1]['value'] == 'There is a farmland .'
  assert r.meta == {'references': ['There is a farmland .', 'Many fields .']}
  assert _decode(r.image)[0] == 'PNG'


def test_rsicd(tmp_path):
  root = tmp_path / 'RSICD'
  for stem in ('airport_1', 'beach_2', 'center_5'):
    _save(root / 'RSICD_images' / f'{stem}.jpg', (10, 10), len(stem))
  _save(tmp_path / 'secret.jpg', (10, 10), 9)   # exists, but outside RSICD_images/
  (root / 'dataset_rsicd.json').write_text(json.dumps({'dataset': 'rsicd', 'images': [
      {'filename': 'airport_1.jpg', 'imgid': 0, 'split': 'train',
       'sentences': _caps('many planes are parked .', 'an airport .', '', 'runways .')},
      {'filename': 'beach_2.jpg', 'imgid': 1, 'split': 'val', 'sentences': _caps('a beach .')},
      {'filename': '../../secret.jpg', 'imgid': 2, 'split': 'test', 'sentences': _caps('x')},
      {'filename': 'bridge_3.jpg', 'imgid': 3, 'split': 'restval', 'sentences': _caps('x')},
      {'filename': 'church_4.jpg', 'imgid': 4, 'split': 'test', 'sentences': _caps('x')},
      {'filename': 'center_5.jpg', 'imgid': 5, 'split': 'test', 'sentences': _caps('a centre .')},
  ]}))
  summary = _build('rsicd', tmp_path, tmp_path)
  assert summary['splits'] == {'train': 1, 'val': 1, 'test': 1}
  assert summary['skipped'] == {'image_outside_images_dir': 1, 'missing_image': 1,
                                'unknown_split': 1}   # 3 + 3 == 6 entries
  per_split = _all(summary)
  r = per_split['train'][0]
  assert r.id == 'rsicd/train/0' and r.source == 'rsicd'
  assert r.meta['references'] == ['many planes are parked .', 'an airport .', 'runways .']
  assert r.image == (root / 'RSICD_images' / 'airport_1.jpg').read_bytes()
  assert [x.id for x in per_split['test']] == ['rsicd/test/5']


def test_sydney_captions(tmp_path):
  root = tmp_path / 'Sydney_captions'
  for i in (1, 2, 3):
    _save(root / 'imgs' / f'{i}.tif', (6, 6), i, fmt='TIFF')
  (root / 'dataset.json').write_text(json.dumps({'images': [
      {'filename': '1.tif', 'imgid': 0, 'split': 'train', 'sentences': _caps('A port .')},
      {'filename': '2.tif', 'imgid': 1, 'split': 'val', 'sentences': _caps('Houses .')},
      {'filename': '3.tif', 'imgid': 2, 'split': 'test', 'sentences': _caps('A river .')},
      {'filename': '3.tif', 'imgid': 3, 'split': 'test'},            # no sentences
  ]}))
  summary = _build('sydney_captions', tmp_path, tmp_path)
  assert summary['splits'] == {'train': 1, 'val': 1, 'test': 1}
  assert summary['skipped'] == {'missing_field': 1}
  r = _read(summary['out'], 'test')[0]
  assert (r.id, _answers([r])) == ('sydney_captions/test/2', ['A river .'])
  fmt, got = _decode(r.image)
  assert fmt == 'PNG'
  np.testing.assert_array_equal(got, _pixels((6, 6), 3))


def test_nwpu_captions(tmp_path):
  root = tmp_path / 'NWPU-Captions'
  for name in ('airplane/airplane_001', 'airplane/airplane_002', 'beach/beach_001'):
    _save(root / 'NWPU_images' / f'{name}.jpg', (8, 8), len(name))
  five = {'raw': 'a plane .', 'raw_1': 'two planes . ', 'raw_2': 'planes on a runway .',
          'raw_3': 'an apron .', 'raw_4': 'white planes .'}
  (root / 'dataset_nwpu.json').write_text(json.dumps({
      'beach': [
          {'filename': 'beach_001.jpg', 'imgid': 0, 'split': 'test', 'raw': 'sand and sea .',
           'raw_1': 'a beach .', 'raw_2': 'waves .', 'raw_3': 'a coast .', 'raw_4': 'blue sea .'},
          {'filename': 'beach_002.jpg', 'imgid': 1, 'split': 'dev', **five},
          {'filename': 'beach_003.jpg', 'imgid': 2, 'split': 'train'},    # no captions
      ],
      'airplane': [
          {'filename': 'airplane_001.jpg', 'imgid': 0, 'split': 'train', 'sentids': [0, 1],
           **five},
          {'filename': 'airplane_002.jpg', 'imgid': 1, 'split': 'val', **five, 'raw_2': ' '},
          {'filename': 'airplane_003.jpg', 'imgid': 2, 'split': 'test', **five},   # no file
      ]}))
  summary = _build('nwpu_captions', tmp_path, tmp_path)
  assert summary['splits'] == {'train': 1, 'val': 1, 'test': 1}
  assert summary['skipped'] == {'missing_field': 1, 'missing_image': 1, 'unknown_split': 1}
  per_split = _all(summary)
  r = per_split['train'][0]
  assert r.id == 'nwpu_captions/train/airplane/airplane_001'
  assert r.meta['references'] == ['a plane .', 'two planes .', 'planes on a runway .',
                                  'an apron .', 'white planes .']
  assert len(per_split['val'][0].meta['references']) == 4          # raw_2 was blank
  assert per_split['test'][0].id == 'nwpu_captions/test/beach/beach_001'
  assert per_split['test'][0].image == (
      root / 'NWPU_images' / 'beach' / 'beach_001.jpg').read_bytes()


# ----------------------------------------------------------------------------------- counting

def _quad(x1, y1, x2, y2):
  return f'{x1} {y1} {x2} {y1} {x2} {y2} {x1} {y2}'


def _counts(recs):
  """{(image id, class): (answer, boxes, labels)} of counting records."""
  return {(r.meta['image_id'], r.meta['category']):
          (r.conversations[1]['value'], r.boxes.tolist(), r.labels) for r in recs}


def test_dota_v2_counting(tmp_path):
  root = tmp_path / 'DOTA-v2.0'
  train_img = root / 'train' / 'images'
  train_lbl = root / 'train' / 'labelTxt-v2.0' / 'DOTA-v2.0_train'
  train_lbl.mkdir(parents=True)
  pixels = _save(train_img / 'P0001.png', (64, 48), 1)
  for stem in ('P0002', 'P0003', 'P0004', 'P0006', 'P0007', 'P0008'):
    _save(train_img / f'{stem}.png', (64, 48), 2)
  (train_lbl / 'P0001.txt').write_text('\n'.join([
      'imagesource:GoogleEarth', 'gsd:0.146',
      f'{_quad(10, 5, 20, 15)} plane 0',
      '30 10 36 14 32 20 26 16 plane 1',            # a rotated quadrilateral, difficult
      f'{_quad(60, 30, 70, 40)} plane 0',           # cut by the right border: clipped to x 64
      f'{_quad(1, 1, 4, 3)} small-vehicle 0', '']))
  (train_lbl / 'P0002.txt').write_text(f'{_quad(1, 1, 4, 3)} plane 0\n1 2 3 4 5 6 7 ship 0\n')
  (train_lbl / 'P0003.txt').write_text(f'{_quad(1, 1, 4, 3)} tank 0\n')
  (train_lbl / 'P0004.txt').write_text(f'{_quad(100, 5, 120, 15)} ship 0\n')  # no overlap
  (train_lbl / 'P0005.txt').write_text(f'{_quad(1, 1, 4, 3)} ship 0\n')       # no P0005.png
  (train_lbl / 'P0007.txt').write_text('imagesource:GF2\ngsd:1.0\n')          # no objects
  (train_lbl / 'P0008.txt').write_bytes(b'\xff\xfe1 1 4 1 4 3 1 3 ship 0\n')    # not UTF-8
  # P0006.png has no annotation. val: the other accepted label folder and an image part folder.
  _save(root / 'val' / 'images' / 'part2' / 'P0100.png', (32, 32), 3)
  (root / 'val' / 'labelTxt').mkdir(parents=True)
  (root / 'val' / 'labelTxt' / 'P0100.txt').write_text(
      f'{_quad(2, 2, 10, 10)} ship 0\n{_quad(12, 12, 30, 30)} harbor\n')      # 9 fields
  summary = _build('dota_v2_counting', tmp_path, tmp_path)
  # 9 images: P0001, P0007 and P0100 written, 6 skipped.
  assert summary['skipped'] == {'box_outside_image': 1, 'malformed_annotation': 1,
                                'malformed_line': 1,
                                'missing_annotation': 1, 'missing_image': 1,
                                'unknown_category': 1}
  # P0001: plane, small-vehicle + 1 absent class; P0007: only an absent class; P0100: 2 + 1.
  assert summary['splits'] == {'train': 4, 'val': 3}
  per_split = _all(summary)
  train = _counts(per_split['train'])
  assert train['P0001', 'plane'] == ('3', [[10, 5, 20, 15], [26, 10, 36, 20], [60, 30, 64, 40]],
                                     ['plane'] * 3)
  assert train['P0001', 'small-vehicle'] == ('1', [[1, 1, 4, 3]], ['small-vehicle'])
  absent = [k for k in train if k[0] == 'P0001' and k[1] not in ('plane', 'small-vehicle')]
  assert len(absent) == 1 and train[absent[0]] == ('0', [], [])
  assert [v[0] for k, v in train.items() if k[0] == 'P0007'] == ['0']
  r = next(r for r in per_split['train'] if r.id == 'dota_v2_counting/train/P0001/small-vehicle')
  assert r.conversations[0]['value'] == (
      '<image>\nHow many small vehicles are in this image? Answer with a number.')
  assert (r.task, r.granularity, r.source) == ('counting', 'local', 'dota_v2_counting')
  assert r.meta == {'category': 'small-vehicle', 'count': 1, 'image_id': 'P0001'}
  np.testing.assert_array_equal(_decode(r.image)[1], pixels)
  val = _counts(per_split['val'])
  assert val['P0100', 'ship'][0] == '1' and val['P0100', 'harbor'] == (
      '1', [[12, 12, 30, 30]], ['harbor'])
  assert records.read_info(summary['out'])['licence'].startswith('academic use only')
  # The absent classes are a function of the seed: the same build again gives the same records.
  again = builders.build('dota_v2_counting', tmp_path, tmp_path / 'again')
  assert sorted(_counts(_read(again['out'], 'train'))) == sorted(train)


def test_hrrsd_counting(tmp_path):
  root = tmp_path / 'HRRSD' / 'OPT2017'
  ann, main = root / 'Annotations', root / 'ImageSets' / 'Main'
  for stem in ('00001', '00002', '00003', '00004', '00005', '00006', '00007', '00009'):
    _save(root / 'JPEGImages' / f'{stem}.jpg', (50, 40), int(stem))
  _voc(ann / '00001.xml', '00001.jpg', (50, 40), [
      ('T_junction', (1, 1, 10, 10), None), ('T junction', (20, 20, 30, 30), None),
      ('vehicle', (5, 30, 9, 35), None)])
  (ann / '00002.xml').write_text('<annotation><object><name>ship</name>')   # does not parse
  _voc(ann / '00003.xml', '00003.jpg', (50, 40), [('ship', (30, 5, 20, 15), None)])  # x2 < x1
  _voc(ann / '00004.xml', '00004.jpg', (50, 40), [('storage_tank', (0, 0, 50, 40), None)])
  _voc(ann / '00005.xml', '00005.jpg', (50, 40), [('airplane', None, None)])  # no bndbox
  _voc(ann / '00006.xml', '00006.jpg', (50, 40), [('ship', (1, 1, 5, 5), None)])  # in no list
  _voc(ann / '00007.xml', '00007.jpg', (50, 40), [('harbor', (10, 10, 40, 30), None)])
  main.mkdir(parents=True)
  (main / 'train.txt').write_text('00001\n00002\n')
  (main / 'val.txt').write_text('00003\n00004\n')
  (main / 'test.txt').write_text('00005\n00007\n00009\n')    # 00009.xml does not exist
  (main / 'airplane_train.txt').write_text('00001 -1\n')       # VOC per-class lists: not splits
  summary = _build('hrrsd_counting', tmp_path, tmp_path)
  # 7 listed ids + 1 unlisted annotation: 3 images written, 5 skipped.
  assert summary['skipped'] == {'bad_box': 1, 'malformed_annotation': 2, 'missing_annotation': 1,
                                'not_in_split': 1}
  assert summary['splits'] == {'train': 3, 'val': 2, 'test': 2}
  per_split = _all(summary)
  train = _counts(per_split['train'])
  assert train['00001', 'T junction'] == ('2', [[1, 1, 10, 10], [20, 20, 30, 30]],
                                          ['T junction'] * 2)
  assert train['00001', 'vehicle'] == ('1', [[5, 30, 9, 35]], ['vehicle'])
  # Questions in the vocabulary's order (vehicle before T junction), then the absent class.
  assert [r.meta['category'] for r in per_split['train']][:2] == ['vehicle', 'T junction']
  r = per_split['train'][1]
  assert r.id == 'hrrsd_counting/train/00001/T_junction'
  assert r.conversations[0]['value'] == (
      '<image>\nHow many T junctions are in this image? Answer with a number.')
  assert _counts(per_split['val'])['00004', 'storage tank'][0] == '1'
  assert sorted(v[0] for v in _counts(per_split['test']).values()) == ['0', '1']
  assert r.image == (root / 'JPEGImages' / '00001.jpg').read_bytes()


def test_rsod_counting(tmp_path):
  root = tmp_path / 'RSOD-Dataset'
  for i in range(1, 6):
    _voc(root / 'playground' / 'Annotations' / f'playground_{i}.xml',   # the other spelling
         f'playground_{i}.jpg', (30, 30), [('playground', (2, 2, 20 + i, 20), None)])
    _save(root / 'playground' / 'JPEGImages' / f'playground_{i}.jpg', (30, 30), i)
    objects = [('aircraft', (1, 1, 5, 5), None)]
    if i == 1:
      objects = [('aircraft', (1, 1, 5, 5), None), ('aircraft', (10, 10, 15, 15), None),
                 ('oiltank', (20, 20, 28, 28), None)]
    if i == 4:
      objects = [('helicopter', (1, 1, 5, 5), None)]
    _voc(root / 'aircraft' / 'Annotation' / 'xml' / f'aircraft_{i}.xml', f'aircraft_{i}.jpg',
         (30, 30), objects)
    if i != 5:                                         # aircraft_5.jpg is missing
      _save(root / 'aircraft' / 'JPEGImages' / f'aircraft_{i}.jpg', (30, 30), 10 + i)
  _save(root / 'playground' / 'JPEGImages' / 'playground_9.jpg', (30, 30), 9)   # no xml
  summary = _build('rsod_counting', tmp_path, tmp_path)
  # 10 annotations + 1 unannotated image: 8 images written, 3 skipped.
  assert summary['skipped'] == {'missing_annotation': 1, 'missing_image': 1,
                                'unknown_category': 1}
  # One question per present class, no absent-class questions: 8 images + aircraft_1's oiltank.
  assert summary['written'] == 9
  assert sum(summary['splits'].values()) == 9
  recs = {k: v for rs in _all(summary).values() for k, v in _counts(rs).items()}
  assert recs['aircraft/aircraft_1', 'aircraft'] == (
      '2', [[1, 1, 5, 5], [10, 10, 15, 15]], ['aircraft'] * 2)
  assert recs['aircraft/aircraft_1', 'oiltank'] == ('1', [[20, 20, 28, 28]], ['oiltank'])
  assert '0' not in {v[0] for v in recs.values()}
  assert len({k[0] for k in recs}) == 8
  r = next(r for rs in _all(summary).values() for r in rs
           if r.id.endswith('aircraft_1/oiltank'))
  assert r.conversations[0]['value'] == (
      '<image>\nHow many oil tanks are in this image? Answer with a number.')


def test_counting_questions_and_parsers():
  vocab = counting.DOTA_V2_CLASSES
  objects = counting.parse_dota(f'gsd:0.5\n{_quad(1, 2, 3, 4)} ship 1\n', vocab)
  assert objects == counting.Objects(('ship',), ((1.0, 2.0, 3.0, 4.0),))
  # The absent class is never present, depends only on (seed, key), and varies with the key.
  drawn = set()
  for n in range(20):
    asked = counting.questions(objects, vocab, counting.absent_rng(0, f'k{n}'))
    assert [c for c, _ in asked][0] == 'ship' and len(asked) == 2 and asked[1][1] == []
    assert asked[1][0] != 'ship'
    assert asked == counting.questions(objects, vocab, counting.absent_rng(0, f'k{n}'))
    drawn.add(asked[1][0])
  assert len(drawn) > 3
  assert counting.questions(objects, vocab, None) == [('ship', [(1.0, 2.0, 3.0, 4.0)])]
  find = counting.lookup(counting.HRRSD_CLASSES)
  assert find('T_junction') == find('t junction') == 'T junction'
  assert find('Storage-Tank') == 'storage tank'


# ---------------------------------------------------------------------------------------- CLI

def test_convert_benchmark_cli(tmp_path):
  root = tmp_path / 'UCM_captions'
  _save(root / 'imgs' / '1.jpg', (8, 8), 1)
  (root / 'dataset.json').write_text(json.dumps({'images': [
      {'filename': '1.jpg', 'imgid': 0, 'split': s, 'sentences': _caps('a field .')}
      for s in ('train', 'val', 'test')] + [{'filename': '1.jpg', 'split': 'x'}]}))
  out = tmp_path / 'ucm'
  result = subprocess.run(
      [sys.executable, str(REPO / 'data_prep' / 'convert_benchmark.py'), '--name=ucm_captions',
       f'--manual_dir={tmp_path}', f'--out={out}'],
      capture_output=True, text=True, check=True, cwd=REPO)
  summary = json.loads(result.stdout.strip().split('\n')[-1])
  assert summary['written'] == 3 and summary['skipped'] == {'unknown_split': 1}
  assert summary['splits'] == {'train': 1, 'val': 1, 'test': 1} and summary['out'] == str(out)
  assert _read(out, 'val')[0].conversations[1]['value'] == 'a field .'
