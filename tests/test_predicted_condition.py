"""model.moe.condition='predicted': the condition head that routes without tags.

Config errors; the soft condition's one-hot case equals the tag (gather) path; the head pools
only the prompt; its loss term against a numpy cross-entropy; upcycling starts it fresh; a
short training run teaches it the synthetic tasks; generation equals the full forward pass;
evaluation with a predicted condition and with eval.tags='stripped'; eval.max_per_task.
"""
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from skymoe_jax import config as config_lib
from skymoe_jax import workdir as workdir_lib
from skymoe_jax.data import records, sources, tasks
from skymoe_jax.evaluation import generate as gen_lib
from skymoe_jax.evaluation import chat, prompts, runner
from skymoe_jax.interop import to_torch
from skymoe_jax.model import factory, skymoe
from skymoe_jax.model.moe import layer as moe_layer
from skymoe_jax.registry import ConfigError
from skymoe_jax.training import loop, loss as loss_lib, stages

P = 7
NEW = 5
LENGTHS = np.array([7, 3, 5, 1, 6, 2])
PAD = 0
NEVER = -1
STEPS = 150  # about 13 steps a second here


def _predicted(arg=None):
  config = load_config('tiny', arg)
  config.model.moe.condition = 'predicted'
  return config


def _perturb(params, key):
  """Random condition projections (they start at zero) and a random condition head, so that
  the condition really changes the routing and differs between prompts."""
  def visit(path, leaf):
    names = [getattr(k, 'key', '') for k in path]
    if names[-1] == 'condition_proj' or 'condition_head' in names:
      sub = jax.random.fold_in(key, hash(jax.tree_util.keystr(path)) % (2 ** 31))
      return 2.0 * jax.random.normal(sub, leaf.shape, leaf.dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(visit, params)


def _init(config, key=0):
  model = factory.create_model(config)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(key), *factory.example_inputs(
      config))['params']))()
  return model, _perturb(params, jax.random.key(5))


# -- config --------------------------------------------------------------------------------------

@pytest.mark.parametrize('field, value, needle', [
    ('model.moe.condition', 'guessed', 'config.model.moe.condition'),
    ('model.moe.adaptive', False, 'config.model.moe.condition'),
    ('train.condition_loss_weight', -1.0, 'config.train.condition_loss_weight'),
    ('eval.tags', 'none', 'config.eval.tags'),
    ('eval.max_per_task', -1, 'config.eval.max_per_task'),
])
def test_bad_settings_name_the_field(field, value, needle):
  config = _predicted()
  section, _, name = field.rpartition('.')
  target = config
  for part in section.split('.'):
    target = target[part]
  target[name] = value
  with pytest.raises(ConfigError, match=needle.replace('.', r'\.')):
    config_lib.validate(config)


def test_defaults_and_a_dense_stage_accept_predicted():
  c = config_lib.base_config()
  assert c.model.moe.condition == 'tags' and c.eval.tags == 'given'
  assert c.eval.max_per_task == 0 and c.train.condition_loss_weight == 1.0
  config_lib.validate(_predicted('stage1'))  # stage I is dense: waits for stage II's MoE
  assert not skymoe.predicts_condition(_predicted('stage1').model)
  assert any(re.fullmatch(p, 'condition_head/kernel')
             for p in config_lib.STAGE_II_TRAINABLE)


def test_export_takes_a_predicted_condition_and_refuses_an_unknown_one():
  """The PyTorch export carries the condition head (tests/test_export.py: its logits are
  ours); a condition it does not compute is refused naming the field."""
  to_torch.check_exportable(_predicted().model)
  to_torch.check_exportable(load_config('tiny').model)
  config = _predicted()
  config.model.moe.condition = 'guessed'  # past config.validate, as a newer config might be
  with pytest.raises(to_torch.ExportError, match=r'config\.model\.moe\.condition'):
    to_torch.check_exportable(config.model)


# -- the soft condition --------------------------------------------------------------------------

def test_one_hot_mix_equals_the_gather():
  table = jax.random.normal(jax.random.key(1), (5, 8), jnp.float32) * 3.0
  ids = jnp.asarray([0, 4, 2, 2, 1, 3], jnp.int32)
  gathered = moe_layer.mix_condition(table, ids)
  mixed = moe_layer.mix_condition(table, jax.nn.one_hot(ids, 5, dtype=jnp.float32))
  np.testing.assert_array_equal(np.asarray(gathered), np.asarray(table)[np.asarray(ids)])
  np.testing.assert_array_equal(np.asarray(mixed), np.asarray(gathered))


def test_tag_model_routes_the_same_by_ids_and_by_one_hot_distributions():
  config = load_config('tiny')
  config.model.moe.backend = 'loop'
  model, params = _init(config)
  rng = np.random.default_rng(0)
  images, tokens, mask, task, gran = factory.example_inputs(config, 4, 8)
  tokens = jnp.asarray(rng.integers(1, 256, tokens.shape), jnp.int32)
  task = jnp.asarray([0, 1, 3, 4], jnp.int32)
  gran = jnp.asarray([2, 0, 1, 1], jnp.int32)
  apply = jax.jit(model.apply)
  by_ids, aux_ids = apply({'params': params}, images, tokens, mask, task, gran)
  one_hot = (jax.nn.one_hot(task, 5), jax.nn.one_hot(gran, 3))
  by_dist, aux_dist = apply({'params': params}, images, tokens, mask, task, gran,
                            condition=one_hot)
  np.testing.assert_array_equal(np.asarray(by_ids), np.asarray(by_dist))
  np.testing.assert_array_equal(np.asarray(aux_ids['moe']['counts_by_condition']),
                                np.asarray(aux_dist['moe']['counts_by_condition']))
  # The statistics stay keyed by the tags when something else routes.
  other = (jnp.asarray([1, 1, 1, 1]), jnp.asarray([0, 0, 0, 0]))
  _, aux_other = apply({'params': params}, images, tokens, mask, task, gran, condition=other)
  counts = np.asarray(aux_other['moe']['counts_by_condition'])  # [layers, T, G, E]
  cells = {(int(t), int(g)) for t, g in zip(task, gran)}
  for t in range(5):
    for g in range(3):
      assert (counts[:, t, g].sum() > 0) == ((t, g) in cells)


# -- the head ------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def predicted_model():
  config = _predicted()
  config.model.moe.backend = 'loop'
  return (config,) + _init(config)


def test_head_pools_only_the_prompt(predicted_model):
  config, model, params = predicted_model
  rng = np.random.default_rng(3)
  images, tokens, mask, task, gran = factory.example_inputs(config, 2, 12)
  tokens = np.asarray(rng.integers(1, 256, tokens.shape), np.int32)
  loss_mask = np.zeros(tokens.shape, bool)
  loss_mask[:, 7:10] = True
  mask = np.asarray(mask).copy()
  mask[:, 11:] = False
  prompt = skymoe.prompt_mask(jnp.asarray(mask), jnp.asarray(loss_mask))
  np.testing.assert_array_equal(np.asarray(prompt), np.arange(12)[None].repeat(2, 0) < 7)
  apply = jax.jit(lambda t: model.apply({'params': params}, images, t, mask, task, gran,
                                        prompt_mask=prompt)[1]['condition_logits']['task'])
  base = np.asarray(apply(tokens))
  answer_changed = tokens.copy()
  answer_changed[:, 8] = (answer_changed[:, 8] + 1) % 256
  answer_changed[:, 11] = 5  # a padding token too
  np.testing.assert_array_equal(np.asarray(apply(answer_changed)), base)
  prompt_changed = tokens.copy()
  prompt_changed[:, 2] = (prompt_changed[:, 2] + 1) % 256
  assert not np.allclose(np.asarray(apply(prompt_changed)), base)


def test_condition_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = {'task': rng.normal(size=(6, 5)).astype(np.float32),
            'granularity': rng.normal(size=(6, 3)).astype(np.float32)}
  task = rng.integers(0, 5, 6).astype(np.int32)
  gran = rng.integers(0, 3, 6).astype(np.int32)

  def ce(x, y):
    x = x.astype(np.float64)
    logp = x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(
        1, keepdims=True)
    return -logp[np.arange(len(y)), y].mean()
  term, task_acc, gran_acc = loss_lib.condition_loss(
      jax.tree.map(jnp.asarray, logits), jnp.asarray(task), jnp.asarray(gran))
  np.testing.assert_allclose(float(term), ce(logits['task'], task) + ce(
      logits['granularity'], gran), rtol=1e-5)
  assert float(task_acc) == pytest.approx(np.mean(logits['task'].argmax(1) == task))
  assert float(gran_acc) == pytest.approx(np.mean(logits['granularity'].argmax(1) == gran))


def test_model_loss_adds_the_weighted_term(predicted_model):
  config, model, params = predicted_model
  rng = np.random.default_rng(4)
  images, tokens, mask, task, gran = factory.example_inputs(config, 3, 10)
  loss_mask = np.zeros(tokens.shape, bool)
  loss_mask[:, 6:] = True
  batch = dict(images=images, tokens=jnp.asarray(rng.integers(1, 256, tokens.shape), jnp.int32),
               token_mask=mask, loss_mask=jnp.asarray(loss_mask),
               task_id=jnp.asarray([0, 2, 4], jnp.int32),
               granularity_id=jnp.asarray([1, 1, 0], jnp.int32))
  out = {}
  for weight in (0.0, 2.5):
    config.train.condition_loss_weight = weight
    out[weight] = loss_lib.model_loss(params, model, batch, config)
  config.train.condition_loss_weight = 1.0
  (l0, m0), (l2, _) = out[0.0], out[2.5]
  assert {'condition_loss', 'condition_accuracy'} <= set(m0)
  np.testing.assert_allclose(float(l2 - l0), 2.5 * float(m0['condition_loss']), rtol=1e-5)
  # The head's logits come from the prompt (before loss_mask) only.
  logits = model.apply({'params': params}, batch['tokens'],
                       jnp.asarray(np.arange(10)[None].repeat(3, 0) < 6),
                       method='predict_condition')
  expected, _, _ = loss_lib.condition_loss(logits, batch['task_id'], batch['granularity_id'])
  np.testing.assert_allclose(float(m0['condition_loss']), float(expected), rtol=1e-6)


def test_upcycling_starts_the_head_fresh():
  c1, c2 = load_config('tiny', 'stage1'), _predicted('stage2')
  m1, m2 = factory.create_model(c1), factory.create_model(c2)
  p1 = m1.init(jax.random.key(0), *factory.example_inputs(c1))['params']
  init2 = m2.init(jax.random.key(1), *factory.example_inputs(c2))['params']
  out = stages.upcycle(p1, c1.model, init2, c2.model)
  fresh = nn.unbox(init2)['condition_head']
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
               out['condition_head'], fresh)


# -- generation ----------------------------------------------------------------------------------

def _inputs(config, seed=1):
  rng = np.random.default_rng(seed)
  n, v = len(LENGTHS), config.model.vision
  images = rng.normal(size=(n, v.image_size, v.image_size, 3)).astype(np.float32)
  mask = np.arange(P)[None, :] < LENGTHS[:, None]
  tokens = np.where(mask, rng.integers(1, config.model.llm.vocab_size, (n, P)), PAD)
  task = rng.integers(0, config.model.moe.num_tasks, n).astype(np.int32)
  gran = rng.integers(0, config.model.moe.num_granularities, n).astype(np.int32)
  return images, tokens.astype(np.int32), mask, task, gran


def test_generate_equals_full_forward_with_predicted_condition(predicted_model):
  config, model, params = predicted_model
  inputs = _inputs(config)
  greedy = gen_lib.make_generate_fn(model, config, NEW, eos_id=NEVER, pad_id=PAD)
  tokens, _ = greedy(params, *inputs)
  tokens = np.asarray(tokens)
  # The tags route nothing: other ids, the same answers.
  images, prompt, mask, task, gran = inputs
  other, _ = greedy(params, images, prompt, mask, (task + 1) % 5, (gran + 2) % 3)
  np.testing.assert_array_equal(np.asarray(other), tokens)
  # Oracle: no cache, the whole sequence, the head pooling the prompt positions only.
  n, lengths = len(prompt), mask.sum(1)
  seq = np.full((n, P + NEW), PAD, np.int32)
  seq[:, :P] = prompt
  seq_mask = np.zeros(seq.shape, bool)
  seq_mask[:, :P] = mask
  prompt_only = seq_mask.copy()
  apply = jax.jit(model.apply)
  out = []
  for i in range(NEW):
    logits, _ = apply({'params': params}, images, seq, seq_mask, task, gran,
                      prompt_mask=prompt_only)
    nxt = np.asarray(logits)[np.arange(n), lengths + i - 1].argmax(-1)
    seq[np.arange(n), lengths + i] = nxt
    seq_mask[np.arange(n), lengths + i] = True
    out.append(nxt)
  np.testing.assert_array_equal(tokens, np.stack(out, axis=1))
  assert len(np.unique(tokens)) > NEW
  # The condition matters: the same prompts routed by their (arbitrary) tags answer otherwise.
  tag_model = factory.create_model(load_config('tiny'))
  tag_params = {k: v for k, v in params.items() if k != 'condition_head'}
  by_tags, _ = gen_lib.make_generate_fn(tag_model, load_config('tiny'), NEW, eos_id=NEVER,
                                        pad_id=PAD)(tag_params, *inputs)
  assert not np.array_equal(np.asarray(by_tags), tokens)


# -- training and evaluation ---------------------------------------------------------------------

@pytest.fixture(scope='module')
def trained(tmp_path_factory):
  """The tiny MoE with a predicted condition, stage-II trainables, trained STEPS steps at stage
  II's learning rate."""
  root = tmp_path_factory.mktemp('predicted')
  config = _predicted()
  config.model.lora.rank = 0
  config.optimizer.update(trainable=config_lib.STAGE_II_TRAINABLE, learning_rate=3e-4,
                          min_lr_ratio=1.0)
  config.data.synthetic.cache_dir = str(root / 'cache')
  config.mesh.data = 2
  config.train.update(total_steps=STEPS, log_every=1, checkpoint_every=STEPS)
  config.eval.update(max_samples=8, max_new_tokens=4, batch_size=4)
  loop.train(config, root / 'run')
  sources.resolve_sources(config)
  return config, root / 'run'


def test_training_teaches_the_head(trained):
  _, workdir = trained
  rows = [json.loads(l) for l in (workdir / workdir_lib.METRICS_FILE).read_text().splitlines()]
  rows = [r for r in rows if 'condition_loss' in r]
  assert len(rows) >= STEPS - 1
  first = np.mean([r['condition_loss'] for r in rows[:5]])
  last = np.mean([r['condition_loss'] for r in rows[-10:]])
  assert last < 0.5 * first, (first, last)
  assert np.mean([r['condition_accuracy'] for r in rows[-10:]]) >= 0.9


def test_evaluate_predicted_and_stripped(trained):
  config, workdir = trained
  report = runner.evaluate(config, workdir)
  assert report['condition'] == 'predicted'
  head = report['condition_head']
  answers = [json.loads(l) for l in (workdir / 'eval' / str(STEPS) / 'answers.jsonl')
             .read_text().splitlines()]
  assert head['n'] == len(answers) > 0
  expected = np.mean([a['predicted_task'] == a['task'] for a in answers])
  assert head['task_accuracy'] == pytest.approx(expected)
  assert set(head['by_task']) == {a['task'] for a in answers}
  # The head pools at evaluation what it pooled in training (the prompt before the answer):
  # what it learnt carries over to the held-out questions.
  assert head['task_accuracy'] >= 0.75 and head['granularity_accuracy'] >= 0.75, head
  metrics = json.loads((workdir / 'eval' / str(STEPS) / 'metrics.json').read_text())
  assert metrics['condition_head'] == head and metrics['tags'] == 'given'
  routing = json.loads((workdir / 'eval' / str(STEPS) / 'routing.json').read_text())
  cells = {f'{a["task"]}/{a["granularity"]}' for a in answers}
  assert set(next(iter(routing['layers'].values()))['by_condition']) == cells

  # The same weights as a tag-routed model, its questions' tags stripped for routing.
  tag_config = load_config('tiny')
  tag_config.model.lora.rank = 0
  tag_config.data = config.data
  tag_config.eval.update(config.eval.to_dict(), tags='stripped')
  tag_config.mesh.data = 2
  _, params = workdir_lib.restore_params(config, workdir)
  params = {k: v for k, v in params.items() if k != 'condition_head'}
  stripped = runner.evaluate(tag_config, workdir, step=STEPS, params=params)
  assert stripped['condition'] == 'tags' and stripped['tags'] == 'stripped'
  assert stripped['settings']['tags'] == 'stripped'
  rows = [json.loads(l) for l in (workdir / 'eval' / str(STEPS) / 'answers.jsonl')
          .read_text().splitlines()]
  for row in rows:
    record_id = row['question_id'].split('/', 1)[1]
    assert row['routed_task'] in tasks.TASKS, record_id
  guess = stripped['stripped_tags']
  assert guess['n'] == len(rows)
  assert guess['task_accuracy'] == pytest.approx(
      np.mean([r['routed_task'] == r['task'] for r in rows]))
  routing = json.loads((workdir / 'eval' / str(STEPS) / 'routing.json').read_text())
  assert set(next(iter(routing['layers'].values()))['by_condition']) == cells


def test_max_per_task_takes_the_first_of_each_task(trained):
  config, _ = trained
  config = config.copy_and_resolve_references()
  config.eval.update(max_samples=0, max_per_task=1)
  questions = runner.eval_questions(config)
  reader = records.open_split(config.data.sources.synthetic.data_dir, config.eval.split)
  first = {}
  for i in range(len(reader)):
    r = reader.record(i)
    first.setdefault(r.task, f'synthetic/{r.id}')
  reader.close()
  # In split order: each task's first record, in the order the tasks first appear.
  assert [q['question_id'] for q in questions] == list(first.values())
  # Both caps: max_samples first, then the per-task cap over those records.
  config.eval.update(max_samples=3, max_per_task=1)
  capped = runner.eval_questions(config)
  assert len(capped) <= 3 and len({q['record'].task for q in capped}) == len(capped)


def test_default_settings_hash_is_the_one_before_these_options():
  """eval.tags and model.moe.condition at their defaults leave answer_settings (and so the
  reuse of earlier answers) as it was before they existed."""
  config = load_config('tiny')
  template, tokenizer_hash = runner.template_lib.get_template('llava_v1'), 'x'
  now = runner.answer_settings(config, template, tokenizer_hash)
  del config.model.moe['condition'], config.eval['tags'], config.eval['max_per_task']
  assert runner.answer_settings(config, template, tokenizer_hash) == now
  config = _predicted()
  config.eval.tags = 'stripped'
  other = runner.answer_settings(config, template, tokenizer_hash)
  assert other['model_hash'] != now['model_hash'] and other['tags'] == 'stripped'


def test_chat_reports_the_heads_condition(trained):
  """Chat on a predicted-condition run shows what routed: the head's most likely task, not the
  keyword guess (a '[refer]' question is grounding to both on this data, so compare with the
  head itself)."""
  _, workdir = trained
  engine = chat.Chat(workdir, max_new_tokens=4)
  record = records.open_split(engine.config.data.sources.synthetic.data_dir, 'validation'
                              ).record(0)
  question = record.conversations[0]['value'].split('\n', 1)[1]
  reply = engine.ask(record.image, question)
  prepared = prompts.prepare(record.image, [{'from': 'human', 'value': '<image>\n' + question}],
                             engine.config, engine.tokenizer, engine.template)
  _, tokens, mask = prompts.pad_batch([prepared], 1, engine.config.data.text_len)
  logits = engine.model.apply({'params': engine.params}, tokens, mask,
                              method='predict_condition')
  assert reply.task == tasks.TASKS[int(np.argmax(logits['task'][0]))]
  assert reply.granularity == tasks.GRANULARITIES[int(np.argmax(logits['granularity'][0]))]
  assert reply.routing is not None
