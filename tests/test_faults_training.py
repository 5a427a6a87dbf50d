"""Faults in training and in the workdir: nothing a user has is ever lost or silently wrong.

Each test is a probe that once failed on the tiny config: a learning rate or an update that
is not finite, damaged checkpoints and retention, a resume with another config, two trainers on
one workdir, Ctrl-C, the metrics of a resume after SIGKILL.

One base run, stopped (SIGTERM) after step 4 of 6 with checkpoints at 2 and 4, is copied for
every test that resumes. All runs share one config, so with test_train's persistent
compilation cache each train() call loads the compiled init and step instead of compiling them.
"""
import json
import logging
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from test_train import _config, _leaves, _metrics, _restore, _sigterm_after
from test_train import compilation_cache_dir  # noqa: F401  (autouse: the shared XLA cache)
from skymoe_jax import config as config_lib
from skymoe_jax import workdir as workdir_lib
from skymoe_jax.training import loop
from skymoe_jax.training import optimizer as opt_lib

STEPS, EVERY, STOP = 6, 2, 4   # the base run: checkpoints at 2 and 4, stopped after 4


def _train_config(cache_dir, **train):
  return _config('stage1', cache_dir, **dict(dict(total_steps=STEPS, checkpoint_every=EVERY),
                                             **train))


@pytest.fixture(scope='module')
def base(tmp_path_factory):
  root = tmp_path_factory.mktemp('faults')
  config = _train_config(root / 'cache')
  workdir = root / 'base'
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop.MetricsLog, 'write', _sigterm_after(STOP))
    summary = loop.train(config, workdir)
  assert summary['preempted'] and summary['step'] == STOP
  return {'config': config, 'workdir': workdir, 'root': root}


def _copy(base, tmp_path, name='run') -> pathlib.Path:
  out = tmp_path / name
  shutil.copytree(base['workdir'], out)
  return out


def _steps(workdir):
  return sorted(int(p.name) for p in (workdir / 'checkpoints').iterdir() if p.name.isdigit())


def _snapshot(workdir):
  """Every file of a workdir (relative path -> bytes): a refused run must leave it as it was."""
  return {str(p.relative_to(workdir)): p.read_bytes()
          for p in sorted(workdir.rglob('*')) if p.is_file()}


def _data_file(workdir, step) -> pathlib.Path:
  """The largest array file that a restore of `step` reads."""
  files = [p for p in (workdir / 'checkpoints' / str(step) / 'state' / 'd').iterdir()]
  return max(files, key=lambda p: p.stat().st_size)


def _damage(path: pathlib.Path, how: str):
  data = bytearray(path.read_bytes())
  if how == 'truncated':
    data = data[:len(data) // 2]
  else:  # same size, bytes in the middle flipped
    for i in range(len(data) // 3, len(data) // 3 + 16):
      data[i] ^= 0xFF
  path.write_bytes(bytes(data))


def _short_traceback(excinfo, frames=4):
  e = excinfo.value
  assert e.__cause__ is None and (e.__context__ is None or e.__suppress_context__)
  assert len(traceback.extract_tb(e.__traceback__)) <= frames


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- 3. non-finite learning rates and updates ----------------------------------------------------

def test_learning_rate_not_finite_in_the_param_dtype_is_refused_first(tmp_path):
  config = _train_config(tmp_path / 'cache')
  config.optimizer.learning_rate = 1e39  # inf in float32
  start = time.perf_counter()
  with pytest.raises(config_lib.ConfigError, match=r'config\.optimizer\.learning_rate=1e\+39'):
    loop.train(config, tmp_path / 'run')
  assert time.perf_counter() - start < 5
  assert not (tmp_path / 'run').exists() and not (tmp_path / 'cache').exists()


def test_nonfinite_update_is_skipped_and_only_a_finite_state_is_saved(base, tmp_path,
                                                                     monkeypatch):
  """Finite loss and gradients, but update 3 overflows the parameters (as a huge learning rate
  can): the step is skipped like a non-finite gradient and step 2's state is the one saved."""
  real = opt_lib.for_run

  def overflowing(config):  # updates x1, except update index 2 (step 3): x inf
    return optax.chain(real(config), optax.scale_by_schedule(
        lambda n: jnp.where(n == 2, jnp.inf, 1.0)))

  monkeypatch.setattr(opt_lib, 'for_run', overflowing)
  config, workdir = base['config'], tmp_path / 'run'
  with pytest.raises(loop.NonFiniteError, match=r'step 3: .*not finite'):
    loop.train(config, workdir)
  step, state, data = _restore(config, workdir)
  assert step == 2 and data['next_step'] == 2
  assert all(np.isfinite(x).all() for x in _leaves(state).values() if x.dtype.kind == 'f')
  monkeypatch.undo()
  _, good, _ = _restore(config, base['workdir'], 2)
  for name, x in _leaves(good['params']).items():
    np.testing.assert_allclose(_leaves(state['params'])[name], x, rtol=1e-6, atol=1e-7,
                               err_msg=name)


# -- 4. damaged checkpoints, verified restores, retention ----------------------------------------

@pytest.mark.parametrize('how', ['truncated', 'flipped'])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(base, tmp_path, caplog, how):
  workdir = _copy(base, tmp_path)
  damaged = _data_file(workdir, STOP)
  name = str(damaged.relative_to(workdir / 'checkpoints' / str(STOP)))
  _damage(damaged, how)
  damaged_bytes = damaged.read_bytes()
  with caplog.at_level(logging.WARNING):
    summary = loop.train(base['config'], workdir)
  assert summary['step'] == STEPS
  warned = [m for m in _warnings(caplog) if f'step {STOP}' in m and 'damaged' in m]
  assert warned and name in warned[0], _warnings(caplog)
  # Resumed from step 2; the damaged step is kept aside (not deleted), step 4 saved afresh.
  assert _steps(workdir) == [2, 4, 6]
  kept = workdir / 'checkpoints' / f'{STOP}.damaged'
  assert (kept / name).read_bytes() == damaged_bytes
  assert [r['step'] for r in _metrics(workdir)] == list(range(1, STEPS + 1))
  step, state, _ = _restore(base['config'], workdir)
  assert step == STEPS
  assert all(np.isfinite(x).all() for x in _leaves(state).values() if x.dtype.kind == 'f')


def test_every_checkpoint_damaged_is_one_message_and_nothing_moves(base, tmp_path):
  workdir = _copy(base, tmp_path)
  names = {}
  for step in (2, STOP):
    path = _data_file(workdir, step)
    names[step] = str(path.relative_to(workdir / 'checkpoints' / str(step)))
    _damage(path, 'truncated')
  before = _snapshot(workdir)
  with pytest.raises(workdir_lib.CheckpointDamagedError) as excinfo:
    loop.train(base['config'], workdir)
  message = str(excinfo.value)
  for step, name in names.items():
    assert f'step {step}' in message and name in message, message
  assert _snapshot(workdir) == before


def test_restore_params_verifies_and_falls_back(base, tmp_path, caplog):
  workdir = _copy(base, tmp_path)
  damaged = _data_file(workdir, STOP)
  _damage(damaged, 'truncated')
  name = str(damaged.relative_to(workdir / 'checkpoints' / str(STOP)))
  with pytest.raises(workdir_lib.CheckpointDamagedError,
                     match=rf'step {STOP}\b.*{re.escape(name)}') as excinfo:
    workdir_lib.restore_params(base['config'], workdir, step=STOP)
  _short_traceback(excinfo, frames=6)
  with caplog.at_level(logging.WARNING):
    step, params = workdir_lib.restore_params(base['config'], workdir)
  assert step == 2 and any(f'step {STOP}' in m for m in _warnings(caplog))
  _, state, _ = _restore(base['config'], base['workdir'], 2)
  for path, x in _leaves(state['params']).items():
    np.testing.assert_array_equal(_leaves(jax.device_get(params))[path], x, err_msg=path)


def _small_state(value, mesh):
  sh = jax.sharding.NamedSharding(mesh, jax.P('data'))
  return {'step': jnp.zeros((), jnp.int32),
          'params': {'w': jax.device_put(jnp.full((8, 4), value, jnp.float32), sh)}}


def _target(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                      state)


@pytest.fixture
def mesh():
  return jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))


def test_damaged_metadata_names_the_step_and_the_file(tmp_path, mesh, caplog):
  """A same-size garbled metadata file: one message naming the step and the file (not a
  decoder's traceback, not a 'mismatch' listing every parameter); the latest falls back."""
  with workdir_lib.Checkpointer(tmp_path) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _small_state(float(step), mesh), {'next_step': step})
    ckpt.wait()
  _damage(tmp_path / '2' / 'state' / '_METADATA', 'flipped')
  target = _target(_small_state(0.0, mesh))
  with workdir_lib.Checkpointer(tmp_path) as ckpt:
    with pytest.raises(workdir_lib.CheckpointDamagedError,
                       match=r'step 2\b.*state/_METADATA') as excinfo:
      ckpt.restore(2, target)
    _short_traceback(excinfo)
    assert 'mismatch' not in str(excinfo.value) and len(str(excinfo.value)) < 600
    with caplog.at_level(logging.WARNING):
      state, data = ckpt.restore(None, target)
  assert data == {'next_step': 1} and float(state['params']['w'][0, 0]) == 1.0
  assert any('step 2' in m and 'state/_METADATA' in m for m in _warnings(caplog))


def test_nonfinite_checkpoint_is_not_restored(tmp_path, mesh):
  with workdir_lib.Checkpointer(tmp_path) as ckpt:
    ckpt.save(1, _small_state(1.0, mesh), {'next_step': 1})
    ckpt.save(2, _small_state(np.nan, mesh), {'next_step': 2})
    ckpt.wait()
    target = _target(_small_state(0.0, mesh))
    with pytest.raises(workdir_lib.CheckpointDamagedError, match=r'step 2\b.*params/w'):
      ckpt.restore(2, target)
    state, data = ckpt.restore(None, target)
  assert data == {'next_step': 1} and np.isfinite(np.asarray(state['params']['w'])).all()


def test_retention_never_deletes_the_newest_verified_checkpoint(tmp_path, mesh):
  """keep 1: retention runs when a step is saved, before that step verifies, so the newest
  verified one stays beside it. Step 2 is damaged after it was saved: saving step 3 keeps 1
  (still the newest that verifies), not 2; once 3 verifies, saving 4 lets 1 go."""
  with workdir_lib.Checkpointer(tmp_path, max_to_keep=1) as ckpt:
    for step in (1, 2):
      ckpt.save(step, _small_state(float(step), mesh), {'next_step': step})
      ckpt.wait()
    assert ckpt.all_steps() == [1, 2]
    _damage(max((tmp_path / '2' / 'state' / 'd').iterdir(), key=lambda p: p.stat().st_size),
            'truncated')
    ckpt.save(3, _small_state(3.0, mesh), {'next_step': 3})
    ckpt.wait()
    assert ckpt.all_steps() == [1, 3]
    ckpt.save(4, _small_state(4.0, mesh), {'next_step': 4})
    ckpt.wait()
    assert ckpt.all_steps() == [3, 4]


# -- 5. a resume with another config --------------------------------------------------------------

@pytest.mark.parametrize('field,value', [
    ('optimizer.learning_rate', 1e-2),   # same shapes: was accepted silently (a mixed run)
    ('data.text_len', 64),               # same parameter shapes, other batches
    ('model.llm.mlp_dim', 64),           # other shapes: was refused, but config.json rewritten
])
def test_resume_with_another_computation_is_refused_and_the_workdir_untouched(
    base, tmp_path, field, value):
  workdir = _copy(base, tmp_path)
  config = _train_config(base['root'] / 'cache')
  parent, name = field.rsplit('.', 1)
  node = config
  for part in parent.split('.'):
    node = node[part]
  node[name] = value
  before = _snapshot(workdir)
  start = time.perf_counter()
  with pytest.raises(config_lib.ConfigError, match=re.escape(field)) as excinfo:
    loop.train(config, workdir)
  assert time.perf_counter() - start < 5  # refused before anything is built
  assert 'config.json' in str(excinfo.value)
  assert _snapshot(workdir) == before  # config.json, history, lock: nothing written or left


def test_resume_with_allowed_changes_is_kept_in_the_history(base, tmp_path, caplog):
  workdir = _copy(base, tmp_path)
  config = _train_config(base['root'] / 'cache', log_every=2, keep_checkpoints=2)
  config.eval.max_samples = 3
  with caplog.at_level(logging.INFO):
    assert loop.train(config, workdir)['step'] == STEPS
  history = [json.loads(line) for line in
             (workdir / workdir_lib.CONFIG_HISTORY_FILE).read_text().splitlines()]
  assert [{k: h[k] for k in ('step', 'field', 'old', 'new')} for h in history] == [
      {'step': STOP, 'field': 'eval.max_samples', 'old': 0, 'new': 3},
      {'step': STOP, 'field': 'train.keep_checkpoints', 'old': 3, 'new': 2},
      {'step': STOP, 'field': 'train.log_every', 'old': 1, 'new': 2}]
  assert any('train.log_every' in r.getMessage() for r in caplog.records)
  saved = workdir_lib.read_config(workdir)
  assert saved.train.log_every == 2 and saved.eval.max_samples == 3
  assert [r['step'] for r in _metrics(workdir)] == [1, 2, 3, 4, 6]


# -- two trainers, Ctrl-C, SIGKILL -----------------------------------------------------------------

def _lock_held_by(workdir, pid):
  (workdir / workdir_lib.LOCK_FILE).write_text(
      json.dumps({'host': socket.gethostname(), 'pid': pid, 'since': 'earlier'}))


def test_a_second_trainer_on_a_workdir_is_refused_naming_the_holder(base, tmp_path):
  workdir = _copy(base, tmp_path)
  other = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
  try:
    _lock_held_by(workdir, other.pid)
    before = _snapshot(workdir)
    with pytest.raises(workdir_lib.WorkdirLockedError,
                       match=rf'{re.escape(socket.gethostname())}.*pid {other.pid}'):
      loop.train(base['config'], workdir)
    assert _snapshot(workdir) == before  # the holder's lock is left alone
  finally:
    other.kill()
    other.wait()


def test_a_stale_lock_is_taken_over_and_released(base, tmp_path, caplog):
  workdir = _copy(base, tmp_path)
  gone = subprocess.Popen([sys.executable, '-c', 'pass'])
  gone.wait()
  _lock_held_by(workdir, gone.pid)
  with caplog.at_level(logging.WARNING):
    assert loop.train(base['config'], workdir)['step'] == STEPS
  assert any(f'pid {gone.pid}' in m and 'stale' in m for m in _warnings(caplog))
  assert not (workdir / workdir_lib.LOCK_FILE).exists()


class _Interrupted(Exception):
  """What this test's own SIGINT handler raises (never KeyboardInterrupt: that stops pytest)."""


def test_ctrl_c_saves_and_stops_like_sigterm(base, tmp_path):
  workdir = _copy(base, tmp_path)
  write = loop.MetricsLog.write

  def interrupt_at_5(self, step, scalars, expert_load):
    write(self, step, scalars, expert_load)
    if step == STOP + 1:
      os.kill(os.getpid(), signal.SIGINT)

  def ours(signum, frame):
    raise _Interrupted()

  previous = signal.signal(signal.SIGINT, ours)
  try:
    with pytest.MonkeyPatch.context() as mp:
      mp.setattr(loop.MetricsLog, 'write', interrupt_at_5)
      summary = loop.train(base['config'], workdir)
    assert signal.getsignal(signal.SIGINT) is ours  # the caller's handler is back
  finally:
    signal.signal(signal.SIGINT, previous)
  assert summary['preempted'] and summary['step'] == STOP + 1
  assert _steps(workdir) == [2, STOP, STOP + 1]
  assert not (workdir / workdir_lib.LOCK_FILE).exists()


class _Killed(BaseException):
  """Stands in for SIGKILL: the process stops after logging a step, nothing else runs."""


def test_resume_after_a_kill_logs_each_step_once(base, tmp_path):
  workdir = _copy(base, tmp_path)
  write = loop.MetricsLog.write

  def killed_after_5(self, step, scalars, expert_load):
    write(self, step, scalars, expert_load)
    if step == STOP + 1:
      raise _Killed()

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(loop.MetricsLog, 'write', killed_after_5)
    with pytest.raises(_Killed):
      loop.train(base['config'], workdir)
  with open(workdir / workdir_lib.METRICS_FILE, 'a') as f:
    f.write('{"step": 6, "loss": 1.')  # a line cut short by the kill
  assert _steps(workdir) == [2, STOP]
  assert loop.train(base['config'], workdir)['step'] == STEPS
  assert [r['step'] for r in _metrics(workdir)] == list(range(1, STEPS + 1))
