"""The synthetic generator's difficulty knobs and CDA's re-rendered counterfactuals.

Oracles: the exact-pixel properties of the scenes (odd red background, even red objects, tight
boxes: test_synthetic's _check_objects), the unedited image outside what an edit touches, and
the layout's own background where an object was taken away.
"""
import numpy as np
import pytest

from conftest import load_config
from test_synthetic import _check_objects
from skymoe_jax.config import ConfigError, validate
from skymoe_jax.data import builders, cda, image_ops, pipeline, records, synthetic
from skymoe_jax.data import tokenizer as tokenizer_lib

HARD = synthetic.Difficulty(object_scale=2.0, max_objects=5, scene_mix=0.7)


def test_default_difficulty_renders_the_original_scenes():
  # The refactor into layout + paint draws the same pixels; the knobs at their defaults too.
  a = synthetic.image_records(3, 'train', 5, 96)
  b = synthetic.image_records(3, 'train', 5, 96, synthetic.Difficulty())
  assert [r.image for r in a] == [r.image for r in b]
  assert synthetic.dataset_name(2000, 0, 128, 0.1) == 'n2000-s0-i128-v0.1'
  assert synthetic.dataset_name(2000, 0, 128, 0.1, HARD) == 'n2000-s0-i128-v0.1-o2.0-m5-x0.7-q1'


def test_difficulty_knobs():
  sizes, easy_sizes, counts = [], [], []
  for i in range(60):
    scene = synthetic.SCENES[i % len(synthetic.SCENES)]
    easy_img, easy = synthetic.render_scene(np.random.default_rng([1, i]), scene, 128)
    img, objects = synthetic.render_scene(np.random.default_rng([1, i]), scene, 128, HARD)
    _check_objects(img, objects)   # the blend keeps the odd/even-red invariant
    assert len(objects) <= HARD.max_objects
    counts.append(len(objects))
    sizes += [(o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) for o in objects]
    easy_sizes += [(o.box[2] - o.box[0]) * (o.box[3] - o.box[1]) for o in easy]
    assert not np.array_equal(img, easy_img)
  # Twice the sides: about four times the area (placement favours the smaller ones a little).
  assert 2.5 < np.median(sizes) / np.median(easy_sizes) < 5
  assert max(counts) <= 5 and min(counts) == 0
  for bad in (dict(object_scale=0.0), dict(max_objects=-1), dict(scene_mix=1.0)):
    with pytest.raises(ValueError, match=next(iter(bad))):
      synthetic.Difficulty(**bad).check()
  c = load_config('tiny')
  c.data.synthetic.scene_mix = 1.5
  with pytest.raises(ConfigError, match='data.synthetic.scene_mix'):
    validate(c)


def test_scene_mix_blends_another_scene():
  # With the mix the background moves away from the scene's own (same draws up to the blend).
  for i in range(10):
    scene = synthetic.SCENES[i % len(synthetic.SCENES)]
    own = synthetic.layout_scene(np.random.default_rng([2, i]), scene, 64)
    mixed = synthetic.layout_scene(np.random.default_rng([2, i]), scene, 64,
                                   synthetic.Difficulty(scene_mix=0.9))
    assert (mixed.background[..., 0] % 2 == 1).all()
    assert np.abs(own.background.astype(int) - mixed.background.astype(int)).mean() > 0.5


def _samples(difficulty, n=40):
  out = []
  for i in range(n):
    for r in synthetic.image_records(7, 'train', i, 128, difficulty)[:1]:
      if len(r.boxes) >= 2:
        out.append(cda.Sample(r.id, image_ops.decode(r.image), r.conversations, r.task,
                              r.granularity, r.boxes, r.labels, r.colors))
  return out


PARAMS = dict(seed=7, image_size=128, difficulty=HARD)


def _box_mask(shape, box):
  m = np.zeros(shape[:2], bool)
  x1, y1, x2, y2 = (int(round(v)) for v in box)
  m[y1:y2, x1:x2] = True
  return m


@pytest.mark.parametrize('kind', sorted(cda.EDITS))
def test_counterfactual_is_the_scene_drawn_with_the_edit(kind):
  applied = 0
  for sample in _samples(HARD):
    split, index = synthetic.record_position(sample.id)
    layout = synthetic.image_layout(7, split, index, 128, HARD)
    rng_seed = applied + 11
    pixel = cda.EDITS[kind](sample, np.random.default_rng(rng_seed), synthetic.COLORS)
    re = synthetic.counterfactual(sample, kind, np.random.default_rng(rng_seed),
                                  synthetic.COLORS, PARAMS)
    if re is None:
      continue
    applied += 1
    # Same question, answer and objects as the pixel edit would give (moves may differ in
    # where: the re-render only puts an object where its class may stand).
    if kind != 'move':
      assert pixel is not None
      assert re.conversations == pixel.conversations and re.changes == pixel.changes
      np.testing.assert_array_equal(re.boxes, pixel.boxes)
    objects = [synthetic.SceneObject(l, c, tuple(int(v) for v in b))
               for l, c, b in zip(re.labels, re.colors, re.boxes)]
    _check_objects(re.image, objects)   # exactly the edited objects are drawn, nothing else
    touched = np.zeros(sample.image.shape[:2], bool)
    if kind == 'cutout':
      for i in re.changes['removed']:
        box = sample.boxes[i]
        touched |= _box_mask(sample.image.shape, box)
      # Where an object was, the true background shows (the pixel edit only interpolates).
      np.testing.assert_array_equal(re.image[touched], layout.background[touched])
    elif kind == 'recolour':
      i, colour = re.changes['recoloured']
      touched = _box_mask(sample.image.shape, sample.boxes[i])
      mask = synthetic.object_mask(sample.image, sample.boxes[i])
      shade = mask & ~(np.isin(sample.image, synthetic.COLORS[sample.colors[i]]).all(-1))
      assert (re.image[mask & ~shade] == synthetic.COLORS[colour]).all()
      assert (re.image[shade] == synthetic.SHADES[colour]).all()   # the shadow follows
    elif kind == 'move':
      i, box = re.changes['moved']
      assert synthetic.allowed_at(layout, re.labels[i], box)
      touched = _box_mask(sample.image.shape, sample.boxes[i]) | _box_mask(
          sample.image.shape, box)
      old = _box_mask(sample.image.shape, sample.boxes[i]) & ~_box_mask(sample.image.shape, box)
      np.testing.assert_array_equal(re.image[old], layout.background[old])
    np.testing.assert_array_equal(re.image[~touched], sample.image[~touched])
    if applied >= 5:
      break
  assert applied >= 3, f'{kind}: applied to {applied} samples only'


@pytest.mark.parametrize('kind', sorted(cda.EDITS))
def test_an_edit_without_paint_makes_the_same_choices_and_leaves_the_picture(kind):
  applied = 0
  for k, sample in enumerate(_samples(HARD)):
    painted = cda.EDITS[kind](sample, np.random.default_rng(k), synthetic.COLORS)
    unpainted = cda.EDITS[kind](sample, np.random.default_rng(k), synthetic.COLORS, paint=False)
    assert (painted is None) == (unpainted is None)
    if painted is None:
      continue
    applied += 1
    assert unpainted.image is sample.image   # not drawn, not copied
    assert (unpainted.conversations, unpainted.changes, unpainted.labels, unpainted.colors) == (
        painted.conversations, painted.changes, painted.labels, painted.colors)
    np.testing.assert_array_equal(unpainted.boxes, painted.boxes)
    if kind != 'copy':
      assert not np.array_equal(painted.image, sample.image)
  assert applied >= 3, f'{kind}: applied to {applied} samples only'


def test_counterfactual_refuses_a_record_of_other_params():
  sample = _samples(HARD, 10)[0]
  with pytest.raises(ValueError, match='differ from the scene'):
    synthetic.counterfactual(sample, 'cutout', np.random.default_rng(0), synthetic.COLORS,
                             dict(PARAMS, seed=8))
  with pytest.raises(ValueError, match='not a synthetic scene id'):
    synthetic.record_position('ucm-000001')


@pytest.fixture(scope='module')
def hard_data(tmp_path_factory):
  root = tmp_path_factory.mktemp('counterfactual')
  synthetic.generate(root / 'syn', 16, 5, 64, 0.25, HARD)
  tok = tokenizer_lib.ensure(root / 'tok', [root / 'syn'], 256)
  return root, tok


def _builder(root, tok, counterfactual):
  c = load_config('tiny')
  c.data.sources.synthetic.update(data_dir=str(root / 'syn'), generate='')
  c.data.update(batch_size=8)
  c.data.cda.update(enabled=True, edit_fraction=0.5, counterfactual=counterfactual)
  return pipeline.BatchBuilder(c, tok, palette=synthetic.COLORS)


def test_pipeline_rerenders_the_edited_rows(hard_data):
  root, tok = hard_data
  info = records.read_info(root / 'syn')
  assert synthetic.generator_params(info) == dict(num_images=16, seed=5, image_size=64,
                                                  val_fraction=0.25, difficulty=HARD)
  pixel, rerender = _builder(root, tok, 'pixel'), _builder(root, tok, 'rerender')
  differ = 0
  for step in range(4):
    a, b = pixel.build(step), rerender.build(step)
    n = pixel.num_originals
    # The originals are the same rows; the edited rows' pictures differ.
    np.testing.assert_array_equal(a['images'][:n], b['images'][:n])
    np.testing.assert_array_equal(a['tokens'][:n], b['tokens'][:n])
    differ += int((np.abs(a['images'][n:] - b['images'][n:]).reshape(n, -1).max(1) > 0).sum())
  assert differ > 0


def test_rerender_needs_synthetic_sources(hard_data, tmp_path):
  root, tok = hard_data
  builders.write_records(tmp_path / 'other', {'train': synthetic.image_records(0, 'train', 0, 64)})
  c = load_config('tiny')
  c.data.sources.synthetic.update(data_dir=str(root / 'syn'), generate='')
  c.data.sources.other = dict(data_dir=str(tmp_path / 'other'), split='train', weight=1.0,
                              generate='')
  c.data.update(batch_size=8)
  c.data.cda.update(enabled=True, counterfactual='rerender')
  with pytest.raises(pipeline.DataError, match='source other .* is not skymoe_synthetic'):
    pipeline.BatchBuilder(c, tok, palette=synthetic.COLORS)
  c.data.cda.counterfactual = 'perfect'
  with pytest.raises(ConfigError, match='data.cda.counterfactual'):
    validate(c)
