"""The training loop end to end on the tiny config: metrics, determinism, exact resume,
preemption, stage I -> stage II upcycling, config errors before compiling, the NaN guard.

One synthetic dataset and one set of stage-I runs (module fixture) serve most tests: every
train() call after the first reuses XLA's in-memory compilation cache, since the train step's
program is the same.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import numpy as np
import pytest

from conftest import REPO, load_config
from skymoe_jax import config_defaults
from skymoe_jax.data import pipeline
from skymoe_jax.model import factory
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.parallel import sharded_state
from skymoe_jax.train import checkpoint as ckpt_lib
from skymoe_jax.train import optimizer as opt_lib
from skymoe_jax.train import stages
from skymoe_jax.train import trainer

STEPS = 24          # every stage-I run of the shared fixture
STOP = STEPS // 2   # where the preempted run stops and resumes
NAN_STEP = 5        # the step whose batch is poisoned in the NaN test
TIMING = ('steps_per_s', 'tokens_per_s', 'mfu')  # the only metrics allowed to differ


def _config(stage, cache_dir, **train):
  c = load_config('tiny', stage)
  c.data.synthetic.cache_dir = str(cache_dir)  # never the user's ~/.cache
  c.train.update(dict(total_steps=STEPS, log_every=1, checkpoint_every=STOP), **train)
  return c


def _metrics(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / trainer.METRICS_FILE).open()]


def _restore(config, workdir, step=None):
  """(step, host copy of the train state, data state) of a workdir's checkpoint."""
  model = factory.create_model(config)
  mesh = mesh_lib.create_mesh(config)
  abstract, shardings = sharded_state.state_shardings(config, model,
                                                      trainer.make_optimizer(config), mesh)
  with ckpt_lib.Checkpointer(pathlib.Path(workdir) / 'checkpoints') as ckpt:
    step = ckpt.latest_step() if step is None else step
    state, data = ckpt.restore(step, ckpt_lib.abstract_like(abstract, shardings))
  return step, jax.device_get(state), data


def _leaves(tree):
  return {opt_lib.param_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_bit_identical(a, b):
  a, b = _leaves(a), _leaves(b)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _sigterm_after(stop):
  """A MetricsLog.write that sends this process SIGTERM once step `stop` is logged: the
  trainer's own handler is installed then, so this is a preemption in the middle of a run."""
  write = trainer.MetricsLog.write

  def patched(self, step, scalars, expert_load):
    write(self, step, scalars, expert_load)
    if step == stop:
      os.kill(os.getpid(), signal.SIGTERM)
  return patched


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Stage-I runs of STEPS steps with one config: 'straight' in one go; 'resumed' preempted
  (SIGTERM) after STOP steps, then the same call again on its workdir."""
  root = tmp_path_factory.mktemp('train')
  config = _config('stage1', root / 'cache')
  out = {'root': root, 'config': config}
  out['straight'] = trainer.train(config, root / 'straight' / 'stage1')
  resumed = root / 'resumed' / 'stage1'
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer.MetricsLog, 'write', _sigterm_after(STOP))
    out['preempted'] = trainer.train(config, resumed)
  with ckpt_lib.Checkpointer(resumed / 'checkpoints') as ckpt:
    out['steps_at_preemption'] = ckpt.all_steps()
  out['resumed'] = trainer.train(config, resumed)
  return out


@pytest.fixture(scope='module')
def stage2(runs):
  """Two stage-II steps upcycled from the straight stage-I run (its sibling 'stage1')."""
  config = _config('stage2', runs['root'] / 'cache', total_steps=2, checkpoint_every=1)
  config.model.moe.renormalize = True
  workdir = runs['root'] / 'straight' / 'stage2'
  summary = trainer.train(config, workdir)
  return config, workdir, summary


# -- 1. metrics and learning ---------------------------------------------------------------------

def test_loss_decreases_and_metrics_are_logged(runs):
  config = runs['config']
  workdir = runs['root'] / 'straight' / 'stage1'
  records = _metrics(workdir)
  assert [r['step'] for r in records] == list(range(1, STEPS + 1))
  assert runs['straight'] == {'workdir': str(workdir), 'step': STEPS, 'preempted': False,
                              'skipped': {name: 0 for name in pipeline.COUNTERS}}
  schedule = opt_lib.learning_rate_schedule(config.optimizer, STEPS)
  for r in records:
    for key in ('loss', 'ce_loss', 'learning_rate', 'tokens_per_s', 'mfu', 'grad_norm'):
      assert np.isfinite(r[key]), (r['step'], key)
    assert r['tokens_per_s'] > 0 and r['mfu'] > 0
    assert r['loss'] == r['ce_loss']  # stage I: no MoE terms
    # The logged rate is the one the update of that step used (step - 1 updates before it).
    np.testing.assert_allclose(r['learning_rate'], float(schedule(r['step'] - 1)), rtol=1e-6)
    for name in pipeline.COUNTERS:
      assert r[f'skipped/{name}'] == 0
    assert 'expert_load' not in r and 'load_balance_loss' not in r
  # Batches differ from step to step, so compare means of the first and the last few steps.
  ce = np.array([r['ce_loss'] for r in records])
  assert ce[-4:].mean() < ce[:4].mean() - 0.2, ce
  assert list(workdir.glob('events.out.tfevents*')), 'no TensorBoard events'
  assert json.loads((workdir / trainer.CONFIG_FILE).read_text())['train']['total_steps'] == STEPS


def test_stage2_logs_moe_metrics(stage2):
  config, workdir, summary = stage2
  assert summary['step'] == 2
  moe = config.model.moe
  for r in _metrics(workdir):
    assert np.isfinite(r['load_balance_loss']) and r['load_balance_loss'] > 0
    np.testing.assert_allclose(
        r['loss'], r['ce_loss'] + moe.load_balance_weight * r['load_balance_loss'] +
        moe.z_loss_weight * r['router_z_loss'], rtol=1e-5)
    load = np.array(r['expert_load'])
    assert load.shape == (len(moe.layers), moe.num_experts)  # one row per MoE layer
    np.testing.assert_allclose(load.sum(axis=1), 1.0, atol=1e-3)
    assert r['dropped_fraction'] == 0  # the ragged backend is dropless


# -- 2, 3. determinism and exact resume ----------------------------------------------------------

def test_same_seed_same_metrics(runs):
  """The runs in two workdirs agree on every non-timing metric up to the preemption."""
  straight = _metrics(runs['root'] / 'straight' / 'stage1')
  resumed = _metrics(runs['root'] / 'resumed' / 'stage1')
  for a, b in zip(straight[:STOP], resumed[:STOP]):
    assert {k: v for k, v in a.items() if k not in TIMING} == \
        {k: v for k, v in b.items() if k not in TIMING}


def test_preempted_run_resumes_exactly(runs):
  config, root = runs['config'], runs['root']
  assert runs['preempted']['preempted'] and runs['preempted']['step'] == STOP
  assert runs['steps_at_preemption'] == [STOP]
  assert runs['resumed']['step'] == STEPS and not runs['resumed']['preempted']
  straight = _metrics(root / 'straight' / 'stage1')
  resumed = _metrics(root / 'resumed' / 'stage1')
  assert [r['step'] for r in resumed] == list(range(1, STEPS + 1))  # each step logged once
  for a, b in zip(straight[STOP:], resumed[STOP:]):
    assert {k: v for k, v in a.items() if k not in TIMING} == \
        {k: v for k, v in b.items() if k not in TIMING}
  step_a, state_a, data_a = _restore(config, root / 'straight' / 'stage1')
  step_b, state_b, data_b = _restore(config, root / 'resumed' / 'stage1')
  assert step_a == step_b == STEPS and data_a == data_b
  _assert_bit_identical(state_a, state_b)  # params, Adam moments, counters


# -- 4. preemption of a real process -------------------------------------------------------------

_WORKER = """
import json, sys
sys.path.insert(0, {tests!r})
from conftest import load_config  # sets the CPU/XLA environment before jax is imported
from skymoe_jax.train import trainer
config = load_config('tiny', 'stage1')
config.data.synthetic.cache_dir = {cache!r}
config.train.update(total_steps=100000, log_every=1, checkpoint_every=100000)
print('SUMMARY', json.dumps(trainer.train(config, {workdir!r})), flush=True)
"""


@pytest.mark.slow
def test_sigterm_saves_and_rerun_resumes(runs, tmp_path):
  workdir = tmp_path / 'stage1'
  code = _WORKER.format(tests=str(REPO / 'tests'), cache=str(runs['root'] / 'cache'),
                        workdir=str(workdir))
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen([sys.executable, '-c', code], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = workdir / trainer.METRICS_FILE
  deadline = time.monotonic() + 540
  try:
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
      assert proc.poll() is None, proc.stdout.read()
      assert time.monotonic() < deadline, 'no training progress'
      time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
  finally:
    if proc.poll() is None:
      proc.kill()
  assert proc.returncode == 0, output
  summary = json.loads(output.split('SUMMARY ', 1)[1])
  assert summary['preempted']
  logged = [r['step'] for r in _metrics(workdir)]
  assert logged == list(range(1, summary['step'] + 1))
  config = load_config('tiny', 'stage1')
  config.data.synthetic.cache_dir = str(runs['root'] / 'cache')
  config.train.update(total_steps=100000, log_every=1, checkpoint_every=100000)
  step, state, data = _restore(config, workdir)
  assert step == summary['step'] and data['next_step'] == step
  assert all(np.isfinite(x).all() for x in _leaves(state['params']).values())
  # Rerunning the same call resumes there; stop it again one step later.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer.MetricsLog, 'write', _sigterm_after(step + 1))
    again = trainer.train(config, workdir)
  assert again['step'] == step + 1 and again['preempted']
  assert [r['step'] for r in _metrics(workdir)] == list(range(1, step + 2))


# -- 5. stage I -> stage II ----------------------------------------------------------------------

def _randomize_lora_b(params, key):
  """LoRA B starts at zero; random values make the merge matter."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(key, len(leaves))
  return treedef.unflatten([
      0.1 * jax.random.normal(k, x.shape, x.dtype) if opt_lib.param_path(p).endswith('_lora/b')
      else x for (p, x), k in zip(leaves, keys)])


def test_upcycled_model_computes_the_stage1_function():
  c1, c2 = load_config('tiny', 'stage1'), load_config('tiny', 'stage2')
  c2.model.moe.renormalize = True  # top-k weights sum to 1: identical experts = the dense FFN
  m1, m2 = factory.create_model(c1), factory.create_model(c2)
  init = lambda m, c, seed: nn.unbox(  # noqa: E731
      m.init(jax.random.key(seed), *factory.example_inputs(c))['params'])
  p1 = _randomize_lora_b(jax.jit(lambda: init(m1, c1, 0))(), jax.random.key(2))
  assert any(k.endswith('_lora/b') for k in _leaves(p1))
  p2 = jax.jit(lambda p: stages.upcycle(p, c1.model, init(m2, c2, 1), c2.model))(p1)
  rng = np.random.default_rng(0)
  b, t = 4, 12
  mask = np.ones((b, t), bool)
  mask[1, :3] = False
  inputs = (rng.normal(size=(b, 32, 32, 3)).astype(np.float32),
            rng.integers(0, c1.model.llm.vocab_size, (b, t)).astype(np.int32), mask,
            np.array([0, 1, 2, 3], np.int32), np.array([0, 1, 2, 0], np.int32))
  logits1, _ = jax.jit(m1.apply)({'params': p1}, *inputs)
  logits2, aux2 = jax.jit(m2.apply)({'params': p2}, *inputs)
  assert aux2['moe'] is not None  # the MoE layers really ran
  np.testing.assert_allclose(np.asarray(logits2), np.asarray(logits1), atol=1e-5, rtol=1e-5)


def test_stage2_trains_only_experts_and_routers(runs, stage2):
  config, workdir, _ = stage2
  model, tx = factory.create_model(config), trainer.make_optimizer(config)
  mesh = mesh_lib.create_mesh(config)
  # The trainer's own starting point: stage-I checkpoint (step STEPS) upcycled.
  upcycled = jax.device_get(trainer.initial_state(config, model, tx, mesh, workdir)['params'])
  step, state, _ = _restore(config, workdir)
  assert step == 2
  mask = _leaves(opt_lib.trainable_mask(upcycled, tuple(config.optimizer.trainable)))
  before, after = _leaves(upcycled), _leaves(state['params'])
  assert before.keys() == after.keys()
  changed = {name for name in before if not np.array_equal(before[name], after[name])}
  frozen = {name for name, m in mask.items() if not m}
  assert frozen and not changed & frozen, sorted(changed & frozen)
  assert all('/moe/' in name for name in changed)
  # Every expert matrix and every router kernel moved (the task/granularity embeddings only
  # move in the rows of tasks present in the batches, so they are not required to).
  for name, m in mask.items():
    if m and ('/moe/w_' in name or '/moe/router/' in name):
      assert name in changed, name


# -- 6. bad configs ------------------------------------------------------------------------------

@pytest.mark.parametrize('field,value', [
    ('train.total_steps', 0),
    ('data.text_len', 10_000),
    ('optimizer.trainable', ('projector/(',)),
    ('data.cda.edit_fraction', 1.5),
])
def test_bad_config_fails_before_anything_is_built(tmp_path, field, value):
  config = _config('stage1', tmp_path / 'cache')
  parent, name = field.rsplit('.', 1)
  node = config
  for part in parent.split('.'):
    node = node[part]
  node[name] = value
  start = time.perf_counter()
  with pytest.raises(config_defaults.ConfigError, match=f'config.{field}='):
    trainer.train(config, tmp_path / 'run')
  assert time.perf_counter() - start < 5  # no data, no tokenizer, no compile
  assert not (tmp_path / 'run').exists() and not (tmp_path / 'cache').exists()


# -- 7. the NaN guard ----------------------------------------------------------------------------

def test_nonfinite_loss_stops_and_keeps_the_last_good_state(runs, monkeypatch):
  """Batch NAN_STEP has NaN pixels (a corrupt image): the step is skipped, the state of step
  NAN_STEP - 1 is saved, and resuming from it ends bit-identical to the straight run."""
  config, root = runs['config'], runs['root']
  workdir = root / 'nan' / 'stage1'
  original = pipeline.DataIterator.__next__

  def poisoned(self):
    batch = original(self)
    if self.next_step == NAN_STEP:
      batch = dict(batch, images=np.full_like(batch['images'], np.nan))
    return batch

  monkeypatch.setattr(pipeline.DataIterator, '__next__', poisoned)
  with pytest.raises(trainer.NonFiniteError, match=f'step {NAN_STEP}: loss nan'):
    trainer.train(config, workdir)
  monkeypatch.undo()
  step, state, data = _restore(config, workdir)
  assert step == NAN_STEP - 1 and data['next_step'] == NAN_STEP - 1
  assert all(np.isfinite(x).all() for x in _leaves(state).values() if x.dtype.kind == 'f')
  straight = _metrics(root / 'straight' / 'stage1')
  logged = _metrics(workdir)
  assert [r['loss'] for r in logged] == [r['loss'] for r in straight[:NAN_STEP - 1]]
  # The saved state is exactly the good one: resuming reproduces the straight run.
  assert trainer.train(config, workdir)['step'] == STEPS
  _assert_bit_identical(_restore(config, workdir)[1],
                        _restore(config, root / 'straight' / 'stage1')[1])
