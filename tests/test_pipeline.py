"""The input pipeline: batch layout, loss masks, CDA edits, mixtures, bad data, exact resume."""
import json

import numpy as np
import pytest

from conftest import load_config
from skymoe_jax import config as config_lib
from skymoe_jax.data import boxes, builders, cda, image_ops, pipeline, records, synthetic, tasks
from skymoe_jax.data import template as template_lib
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.registry import ConfigError


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  """A small synthetic dataset and a tokenizer trained on it."""
  root = tmp_path_factory.mktemp('pipeline')
  synthetic.generate(root / 'syn', num_images=12, seed=3, image_size=64, val_fraction=0.25)
  tok = tokenizer_lib.ensure(root / 'tok', [root / 'syn'], 256)
  return root, tok


def _config(root, **data):
  c = load_config('tiny')
  c.data.sources.synthetic.update(data_dir=str(root / 'syn'), generate='')
  c.data.update(**data)
  return c


def _sample(rng_seed=0, index=0):
  """A decoded synthetic training record with at least two objects."""
  for i in range(index, index + 200):
    for r in synthetic.image_records(rng_seed, 'train', i, 96):
      if len(r.boxes) >= 2:
        return cda.Sample(r.id, image_ops.decode(r.image), r.conversations, r.task,
                          r.granularity, r.boxes, r.labels, r.colors)
  raise AssertionError('no record with two objects')


def test_batch_shapes_and_loss_mask(data):
  root, tok = data
  config = _config(root)
  builder = pipeline.BatchBuilder(config, tok)
  batch = builder.build(0)
  spec = builder.output_signature()
  assert set(batch) == set(spec)
  for k, s in spec.items():
    assert batch[k].shape == tuple(s.shape), k
  b, t = batch['tokens'].shape
  assert (b, t) == (config.data.batch_size, config.data.text_len)
  assert np.isfinite(batch['images']).all()
  reader = records.open_split(root / 'syn', 'train')
  answers = {}
  for i in range(len(reader)):
    r = reader.record(i)
    answers[r.id] = r
  for row in range(b):
    n = int(batch['token_mask'][row].sum())
    assert batch['token_mask'][row, :n].all() and not batch['token_mask'][row, n:].any()
    ids = batch['tokens'][row]
    assert ids[0] == tok.bos_id
    masked = ids[batch['loss_mask'][row]]
    # The loss falls on the answer and its eos, nothing else.
    assert masked[-1] == tok.eos_id
    answer = tok.decode(masked)
    prompt = tok.decode(ids[:n][~batch['loss_mask'][row, :n]][1:])
    assert prompt.startswith(template_lib.LLAVA_V1.system)
    matches = [r for r in answers.values() if r.conversations[-1]['value'] == answer]
    assert matches, f'row {row}: {answer!r} is no answer of the dataset'
    assert batch['task_id'][row] in {tasks.task_id(r.task) for r in matches}


def assert_resumes_exactly(config, tok):
  """4 batches straight, and batches 3-4 again from the state saved after two (through JSON, as
  the checkpoint stores it): equal in every field. Returns (the 4 straight batches, the state)."""
  straight = pipeline.DataIterator(pipeline.BatchBuilder(config, tok, palette=synthetic.COLORS))
  batches = [next(straight) for _ in range(4)]
  first = pipeline.DataIterator(pipeline.BatchBuilder(config, tok, palette=synthetic.COLORS))
  next(first), next(first)
  state = json.loads(json.dumps(first.state()))
  resumed = pipeline.DataIterator.restore(
      pipeline.BatchBuilder(config, tok, palette=synthetic.COLORS), state)
  for expected in batches[2:]:
    got = next(resumed)
    for k in expected:
      np.testing.assert_array_equal(got[k], expected[k], err_msg=k)
  return batches, state


def test_same_seed_same_batches_and_exact_resume(data):
  root, tok = data
  config = _config(root, local_views=True)
  config.data.cda.enabled = True
  batches, state = assert_resumes_exactly(config, tok)
  other = config.copy_and_resolve_references()
  other.seed = 1
  different = pipeline.BatchBuilder(other, tok).build(0)
  assert not np.array_equal(different['tokens'], batches[0]['tokens'])
  with pytest.raises(pipeline.DataError, match='seed'):
    pipeline.DataIterator.restore(pipeline.BatchBuilder(other, tok), state)


def test_hosts_split_the_global_batch(data):
  root, tok = data
  config = _config(root)
  whole = pipeline.BatchBuilder(config, tok).build(5)
  parts = [pipeline.BatchBuilder(config, tok, process_index=h, process_count=2).build(5)
           for h in range(2)]
  for k in ('tokens', 'images', 'task_id'):
    np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), whole[k])


def test_cda_rows_sit_next_to_their_originals(data):
  root, tok = data
  config = _config(root, batch_size=8)
  config.data.cda.update(enabled=True, edit_fraction=0.25)
  builder = pipeline.BatchBuilder(config, tok, palette=synthetic.COLORS)
  batch = builder.build(2)
  originals, edits = builder.num_originals, builder.num_edits
  assert (originals, edits) == (6, 2)
  assert (batch['pair_index'][:originals] == -1).all()
  assert ((batch['pair_index'][originals:] >= 0) &
          (batch['pair_index'][originals:] < originals)).all()
  edited_tasks = {tasks.task_id(t) for t in ('counting', 'vqa', 'grounding')}
  assert set(batch['task_id'][originals:].tolist()) <= edited_tasks


def test_cutout_rewrites_the_count_and_keeps_the_rest():
  sample = _sample()
  for seed in range(20):
    edited = cda.cutout(sample, np.random.default_rng(seed))
    assert edited is not None
    question, answer = edited.conversations[0]['value'], edited.conversations[1]['value']
    label = next(l for l in set(sample.labels) if f' {cda.plural(l)} ' in question)
    assert int(answer) == edited.labels.count(label)  # the instances left visible
    assert tasks.classify(question)[:2] == (tasks.task_id('counting'),
                                           tasks.granularity_id('local'))
    removed = [b for b in sample.boxes.tolist() if b not in edited.boxes.tolist()]
    assert len(removed) == sample.labels.count(label) - int(answer) >= 1
    # Global context: every pixel outside the removed boxes is untouched, and every remaining
    # object is still fully drawn.
    outside = np.ones(sample.image.shape[:2], bool)
    for x1, y1, x2, y2 in removed:
      outside[int(np.floor(y1)):int(np.ceil(y2)), int(np.floor(x1)):int(np.ceil(x2))] = False
    np.testing.assert_array_equal(edited.image[outside], sample.image[outside])
    for box in edited.boxes:
      np.testing.assert_array_equal(synthetic.object_mask(edited.image, box),
                                    synthetic.object_mask(sample.image, box))


def test_recolour_and_move():
  sample = _sample()
  rng = np.random.default_rng(0)
  edited = cda.recolour(sample, rng, synthetic.COLORS)
  assert edited is not None
  i = next(i for i, (a, b) in enumerate(zip(sample.colors, edited.colors)) if a != b)
  assert edited.conversations[1]['value'] == edited.colors[i]
  mask = synthetic.object_mask(sample.image, sample.boxes[i])
  # The flat fill takes the new colour; nothing outside the object's box changes.
  assert (edited.image[mask] == synthetic.COLORS[edited.colors[i]]).all(axis=-1).mean() > 0.5
  x1, y1, x2, y2 = sample.boxes[i].astype(int)
  outside = np.ones(mask.shape, bool)
  outside[y1:y2, x1:x2] = False
  np.testing.assert_array_equal(edited.image[outside], sample.image[outside])

  for seed in range(10):
    moved = cda.move(sample, np.random.default_rng(seed))
    if moved is None:
      continue
    j = next(j for j in range(len(sample.boxes))
             if not np.array_equal(sample.boxes[j], moved.boxes[j]))
    h, w = sample.image.shape[:2]
    (parsed,) = boxes.parse('geochat', moved.conversations[1]['value'], w, h)
    assert abs(parsed.x1 - moved.boxes[j][0]) <= 0.01 * w + 1e-6
    assert abs(parsed.y2 - moved.boxes[j][3]) <= 0.01 * h + 1e-6
    np.testing.assert_array_equal(synthetic.object_mask(moved.image, moved.boxes[j]).sum(),
                                  synthetic.object_mask(sample.image, sample.boxes[j]).sum())
    break
  else:
    raise AssertionError('no move applied in 10 seeds')


def test_mixture_weights_are_exact_and_epochs_do_not_repeat():
  mix = pipeline.Mixture([7, 5], [3.0, 1.0], seed=0, names=['a', 'b'])
  drawn = [mix(p) for p in range(pipeline.MIXTURE_BLOCK)]
  sources = np.asarray([s for s, _ in drawn])
  assert (sources == 0).sum() == 750 and (sources == 1).sum() == 250
  first_epoch_a = [i for s, i in drawn if s == 0][:7]
  assert sorted(first_epoch_a) == list(range(7))
  with pytest.raises(pipeline.DataError, match='data.sources.b.weight'):
    pipeline.Mixture([7, 5], [1.0, 1e-5], seed=0, names=['a', 'b'])


def test_bad_records_are_counted_and_replaced(data, tmp_path):
  root, tok = data
  good = records.open_split(root / 'syn', 'train').record(0)
  bad_image = records.Record(**{**good.__dict__, 'id': 'bad-image', 'image': b'not an image'})
  empty = records.Record(**{**good.__dict__, 'id': 'empty', 'conversations': []})
  builders.write_records(tmp_path / 'broken', {'train': [good, bad_image, empty]})
  config = _config(root, batch_size=8)
  config.data.sources.synthetic.data_dir = str(tmp_path / 'broken')
  batch = pipeline.BatchBuilder(config, tok).build(0)
  counts = dict(zip(pipeline.COUNTERS, batch['counters'].tolist()))
  assert counts['undecodable_image'] >= 1 and counts['malformed_conversation'] >= 1
  # Every row is the one good record.
  assert (batch['tokens'] == batch['tokens'][0]).all()


def test_long_conversations_are_truncated_and_counted(data):
  root, tok = data
  config = _config(root, text_len=20)
  batch = pipeline.BatchBuilder(config, tok).build(0)
  assert batch['token_mask'].all()
  assert batch['counters'][pipeline.COUNTERS.index('truncated')] == config.data.batch_size


def test_task_repeats_shape_each_epoch(data):
  root, tok = data
  config = _config(root)
  config.data.task_repeats.update(grounding=3, counting=0)
  builder = pipeline.BatchBuilder(config, tok)
  reader = records.open_split(root / 'syn', 'train')
  stored = [reader.record(i).task for i in range(len(reader))]
  want = {t: stored.count(t) * config.data.task_repeats[t] for t in tasks.TASKS}
  assert want['grounding'] > 0 and want['counting'] == 0
  epoch = sum(want.values())
  # The rows of the first epoch, batch after batch, hold each task exactly that often.
  b = config.data.batch_size
  rows = np.concatenate([builder.build(s)['task_id'] for s in range(-(-epoch // b))])[:epoch]
  got = {t: int((rows == tasks.task_id(t)).sum()) for t in tasks.TASKS}
  assert got == want
  # With every repeat at 1 the epoch is the split itself, record i at position i.
  [plain] = pipeline.BatchBuilder(_config(root), tok).epochs
  assert plain.tolist() == list(range(len(reader)))


def test_task_repeats_that_leave_nothing_are_refused(data):
  root, tok = data
  config = _config(root)
  config.data.task_repeats.update({t: 0 for t in tasks.TASKS})
  with pytest.raises(ConfigError, match='data.task_repeats'):
    config_lib.validate(config)
  config.data.task_repeats.update({t: 0 for t in tasks.TASKS}, grounding=1)
  only_scene = records.open_split(root / 'syn', 'train').record(0)
  only_scene = records.Record(**{**only_scene.__dict__, 'task': 'scene_classification'})
  builders.write_records(root / 'scene_only', {'train': [only_scene]})
  config.data.sources.synthetic.data_dir = str(root / 'scene_only')
  with pytest.raises(pipeline.DataError, match='data.sources.synthetic: data.task_repeats'):
    pipeline.BatchBuilder(config, tok)
