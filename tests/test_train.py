"""The training loop end to end on the tiny config: metrics, determinism, exact resume,
preemption, stage I -> stage II upcycling, config errors before compiling, the NaN guard.

One synthetic dataset, one set of stage-I runs and one short stage-II run (module fixtures)
serve most tests. Each train() call jits new closures, so XLA's in-memory cache never hits;
a persistent compilation cache, on for this module only, lets every call after the first load
the same init and train-step executables instead of compiling them again (~20 s each here).
"""
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
from jax.experimental.compilation_cache import compilation_cache
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import REPO, load_config
from skymoe_jax import config as config_lib
from skymoe_jax.data import pipeline
from skymoe_jax.model import factory, layout
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax import workdir as ckpt_lib
from skymoe_jax.training import optimizer as opt_lib
from skymoe_jax.training import loop
from skymoe_jax.training import stages
from skymoe_jax.training import state as state_lib

STEPS = 24          # every stage-I run of the shared fixture
STOP = STEPS // 2   # where the preempted run stops and resumes
NAN_STEP = 5        # the step whose batch is poisoned in the NaN test
TIMING = ('steps_per_s', 'tokens_per_s', 'mfu')  # the only metrics allowed to differ


def _config(stage, cache_dir, **train):
  c = load_config('tiny', stage)
  c.data.synthetic.cache_dir = str(cache_dir)  # never the user's ~/.cache
  # Still a sharded run (batch split, replicated parameters written by two replicas), but much
  # cheaper to compile and checkpoint than the default 8-way data mesh.
  c.mesh.data = 2
  c.train.update(dict(total_steps=STEPS, log_every=1, checkpoint_every=STOP), **train)
  return c


def _metrics(workdir):
  return [json.loads(line) for line in (pathlib.Path(workdir) / ckpt_lib.METRICS_FILE).open()]


def _restore(config, workdir, step=None):
  """(step, host copy of the train state, data state) of a workdir's checkpoint."""
  model = factory.create_model(config)
  mesh = mesh_lib.create_mesh(config)
  abstract, shardings = state_lib.state_shardings(config, model,
                                                      opt_lib.for_run(config), mesh)
  with ckpt_lib.Checkpointer(pathlib.Path(workdir) / 'checkpoints') as ckpt:
    step = ckpt.latest_step() if step is None else step
    state, data = ckpt.restore(step, ckpt_lib.abstract_like(abstract, shardings))
  return step, jax.device_get(state), data


def _leaves(tree):
  return {layout.param_path(p): np.asarray(x)
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_bit_identical(a, b):
  a, b = _leaves(a), _leaves(b)
  assert a.keys() == b.keys()
  for name in a:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _sigterm_after(stop):
  """A MetricsLog.write that sends this process SIGTERM once step `stop` is logged: the
  trainer's own handler is installed then, so this is a preemption in the middle of a run."""
  write = loop.MetricsLog.write

  def patched(self, step, scalars, expert_load):
    write(self, step, scalars, expert_load)
    if step == stop:
      os.kill(os.getpid(), signal.SIGTERM)
  return patched


@pytest.fixture(scope='module', autouse=True)
def compilation_cache_dir(tmp_path_factory):
  """A persistent compilation cache for this module, then the previous settings again."""
  options = {'jax_compilation_cache_dir': str(tmp_path_factory.mktemp('xla_cache')),
             'jax_persistent_cache_min_compile_time_secs': 0.5,
             'jax_persistent_cache_min_entry_size_bytes': 0}
  previous = {name: getattr(jax.config, name) for name in options}
  for name, value in options.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()  # the cache is set up once, at the next compile
  yield options
  for name, value in previous.items():
    jax.config.update(name, value)
  compilation_cache.reset_cache()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Stage-I runs of STEPS steps with one config: 'straight' in one go; 'resumed' preempted
  (SIGTERM) after STOP steps, then the same call again on its workdir."""
  root = tmp_path_factory.mktemp('train')
  config = _config('stage1', root / 'cache')
  out = {'root': root, 'config': config}
  out['straight'] = loop.train(config, root / 'straight' / 'stage1')
  resumed = root / 'resumed' / 'stage1'
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop.MetricsLog, 'write', _sigterm_after(STOP))
    out['preempted'] = loop.train(config, resumed)
  with ckpt_lib.Checkpointer(resumed / 'checkpoints') as ckpt:
    out['steps_at_preemption'] = ckpt.all_steps()
  out['resumed'] = loop.train(config, resumed)
  return out


@pytest.fixture(scope='module')
def stage2(runs):
  """Two stage-II steps upcycled from the straight stage-I run (its sibling 'stage1')."""
  config = _config('stage2', runs['root'] / 'cache', total_steps=2)
  config.model.moe.renormalize = True
  workdir = runs['root'] / 'straight' / 'stage2'
  summary = loop.train(config, workdir)
  # The trainer's own starting point: the stage-I checkpoint (step STEPS) upcycled.
  model, tx = factory.create_model(config), opt_lib.for_run(config)
  state = loop.initial_state(config, model, tx, mesh_lib.create_mesh(config), workdir)
  return config, workdir, summary, jax.device_get(state['params'])


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
  assert json.loads((workdir / ckpt_lib.CONFIG_FILE).read_text())['train']['total_steps'] == STEPS


def test_stage2_logs_moe_metrics(stage2):
  config, workdir, summary, _ = stage2
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
import json
import conftest  # the CPU/XLA environment, set before jax is imported
from test_train import _config
from skymoe_jax.training import loop
config = _config('stage1', {cache!r}, total_steps=100000, checkpoint_every=100000)
print('SUMMARY', json.dumps(loop.train(config, {workdir!r})), flush=True)
"""


@pytest.mark.slow
def test_sigterm_saves_and_rerun_resumes(runs, tmp_path, compilation_cache_dir):
  workdir = tmp_path / 'stage1'
  code = _WORKER.format(cache=str(runs['root'] / 'cache'), workdir=str(workdir))
  # The worker imports the test modules (PYTHONPATH) and shares the compilation cache: its
  # executables serve the rerun here too.
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO / 'tests'),
             **{name.upper(): str(value) for name, value in compilation_cache_dir.items()})
  proc = subprocess.Popen([sys.executable, '-c', code], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  metrics = workdir / ckpt_lib.METRICS_FILE
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
  config = _config('stage1', runs['root'] / 'cache', total_steps=100000,
                   checkpoint_every=100000)  # the worker's
  step, state, data = _restore(config, workdir)
  assert step == summary['step'] and data['next_step'] == step
  assert all(np.isfinite(x).all() for x in _leaves(state['params']).values())
  # Rerunning the same call resumes there; stop it again one step later.
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop.MetricsLog, 'write', _sigterm_after(step + 1))
    again = loop.train(config, workdir)
  assert again['step'] == step + 1 and again['preempted']
  assert [r['step'] for r in _metrics(workdir)] == list(range(1, step + 2))


# -- 5. stage I -> stage II ----------------------------------------------------------------------

def test_upcycled_model_computes_the_stage1_function(runs, stage2):
  """With renormalised top-k weights (stage-II config) every token's MoE output is a convex
  combination of identical experts, so the upcycled model = the trained stage-I model."""
  c1, (c2, _, _, upcycled) = runs['config'], stage2
  assert c2.model.moe.renormalize
  _, stage1_state, _ = _restore(c1, runs['root'] / 'straight' / 'stage1')
  p1 = stage1_state['params']
  assert any(name.endswith('_lora/b') and np.abs(x).max() > 0  # trained: the merge matters
             for name, x in _leaves(p1).items())
  # The trainer upcycled its stage-I workdir's last checkpoint (routers: its fresh init).
  direct = _leaves(stages.upcycle(p1, c1.model, upcycled, c2.model))
  for name, x in _leaves(upcycled).items():
    np.testing.assert_allclose(direct[name], x, rtol=1e-6, atol=1e-6, err_msg=name)
  rng = np.random.default_rng(0)
  b, t = 4, 12
  mask = np.ones((b, t), bool)
  mask[1, :3] = False
  v = c1.model.vision
  inputs = (rng.normal(size=(b, v.image_size, v.image_size, 3)).astype(np.float32),
            rng.integers(0, c1.model.llm.vocab_size, (b, t)).astype(np.int32), mask,
            np.array([0, 1, 2, 3], np.int32), np.array([0, 1, 2, 0], np.int32))
  logits1, _ = jax.jit(factory.create_model(c1).apply)({'params': p1}, *inputs)
  logits2, aux2 = jax.jit(factory.create_model(c2).apply)({'params': upcycled}, *inputs)
  assert aux2['moe'] is not None  # the MoE layers really ran
  # Padding tokens are not routed (the MoE leaves them at zero), so only real tokens compare.
  np.testing.assert_allclose(np.asarray(logits2)[mask], np.asarray(logits1)[mask], atol=1e-5,
                             rtol=1e-5)
  # A single expert twice the FFN's width (the ablations' dense baseline with top-2's active
  # parameters) also starts as the stage-I function: its extra units are switched off.
  wide = ml_collections.ConfigDict(c2.to_dict())
  wide.model.moe.update(num_experts=1, top_k=1, mlp_dim=2 * c2.model.llm.mlp_dim)
  fresh = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype),
                       nn.unbox(factory.abstract_params(wide)))
  widened = stages.upcycle(p1, c1.model, fresh, wide.model)
  logits3, _ = jax.jit(factory.create_model(wide).apply)({'params': widened}, *inputs)
  np.testing.assert_allclose(np.asarray(logits3)[mask], np.asarray(logits1)[mask], atol=1e-5,
                             rtol=1e-5)


def test_stage2_trains_only_experts_and_routers(stage2):
  config, workdir, _, upcycled = stage2
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
  with pytest.raises(config_lib.ConfigError, match=re.escape(f'config.{field}=')):
    loop.train(config, tmp_path / 'run')
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
  with pytest.raises(loop.NonFiniteError, match=f'step {NAN_STEP}: loss nan'):
    loop.train(config, workdir)
  monkeypatch.undo()
  step, state, data = _restore(config, workdir)
  assert step == NAN_STEP - 1 and data['next_step'] == NAN_STEP - 1
  assert all(np.isfinite(x).all() for x in _leaves(state).values() if x.dtype.kind == 'f')
  straight = _metrics(root / 'straight' / 'stage1')
  logged = _metrics(workdir)
  assert [r['loss'] for r in logged] == [r['loss'] for r in straight[:NAN_STEP - 1]]
  # The saved state is exactly the good one: resuming reproduces the straight run.
  assert loop.train(config, workdir)['step'] == STEPS
  _assert_bit_identical(_restore(config, workdir)[1],
                        _restore(config, root / 'straight' / 'stage1')[1])
