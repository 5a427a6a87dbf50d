"""A multi-host job in which one process dies stops within a bounded time and resumes exactly.

Two local CPU processes of the real trainer (started as skymoe_jax/jobs/local.py starts them)
train configs/tiny.py:stage1 on one workdir; once the first checkpoint is on disk and the step
that starts the second one is logged, process 1 is SIGKILLed (usually while that save is in
flight). Process 0 then waits in a collective for a peer that will never come: the coordination
service must declare process 1 dead after config.distributed.heartbeat_timeout_seconds and abort
process 0 (non-zero exit) instead of a hang. (Before that setting existed, jax's 100 s default
applied: process 0 aborted some 90 s after the kill.) The aborted save stays an Orbax temporary
folder that no restore counts, and a lock process 0 left behind is stale. Rerunning the job
on the workdir resumes from the newest complete step and ends with the parameters (and losses)
of an uninterrupted two-process run, bit for bit.
"""
import json
import os
import pathlib
import re
import subprocess
import time

import jax
import numpy as np
import pytest

from skymoe_jax import config as config_lib
from skymoe_jax import workdir as workdir_lib
from skymoe_jax.jobs import common, local
from test_multihost import _gloo_missing

REPO = pathlib.Path(__file__).resolve().parents[1]
TINY = str(REPO / 'configs' / 'tiny.py') + ':stage1'  # dense: half the MoE config's compile
NUM_PROCESSES, DEVICES = 2, 2
STEPS, CHECKPOINT_EVERY = 8, 2
HEARTBEAT_S = 10
EXIT_BOUND_S = 60   # heartbeat + the service's polling, with room for a loaded machine
START_TIMEOUT_S = 400


def _overrides(tmp_path) -> dict:
  return {'data.synthetic.cache_dir': str(tmp_path / 'data'), 'train.total_steps': STEPS,
          'train.log_every': 1, 'train.checkpoint_every': CHECKPOINT_EVERY,
          'distributed.heartbeat_timeout_seconds': HEARTBEAT_S}


def _metrics(workdir) -> list:
  path = workdir / workdir_lib.METRICS_FILE
  rows = path.read_text().splitlines() if path.exists() else []
  return [json.loads(r) for r in rows if r.endswith('}')]  # a line being written: skip


def _logged_steps(workdir) -> list:
  return [r['step'] for r in _metrics(workdir)]


def _saved_steps(workdir) -> list:
  root = workdir_lib.checkpoint_dir(workdir)
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.exists() else []


def _tail(path, n=3000) -> str:
  return f'--- {path}:\n{path.read_text(errors="replace")[-n:]}'


def _run_job(workdir, overrides, *flags) -> None:
  """One 2-process job to the end, through jobs/local.py exactly as launch/local.py runs it."""
  argv = [f'--num_processes={NUM_PROCESSES}', f'--devices_per_process={DEVICES}',
          f'--timeout_s={START_TIMEOUT_S}', *flags, f'--config={TINY}', f'--workdir={workdir}',
          *config_lib.override_flags(overrides)]
  assert local.main(argv) == 0, '\n'.join(
      _tail(local.log_path(workdir, i)) for i in range(NUM_PROCESSES))


@pytest.mark.skipif(_gloo_missing() is not None, reason=str(_gloo_missing()))
def test_dead_process_stops_the_job_and_a_rerun_resumes_exactly(tmp_path, monkeypatch):
  # One compilation cache for the three jobs: the rerun and the reference compile nothing.
  for name, value in (('JAX_COMPILATION_CACHE_DIR', str(tmp_path / 'xla_cache')),
                      ('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5'),
                      ('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')):
    monkeypatch.setenv(name, value)
  overrides = _overrides(tmp_path)
  workdir = tmp_path / 'killed'
  job = common.Job(TINY, str(workdir), overrides)
  plan = local.plan(job, NUM_PROCESSES, DEVICES, common.free_port())
  assert common.execute(plan[:-NUM_PROCESSES]) == 0  # launch/prepare.py
  logs = [tmp_path / f'killed_process_{i}.log' for i in range(NUM_PROCESSES)]
  procs = []
  for step, log in zip(plan[-NUM_PROCESSES:], logs):
    with open(log, 'w') as out:
      procs.append(subprocess.Popen(step.argv, env={**os.environ, **step.env}, stdout=out,
                                    stderr=subprocess.STDOUT))
  try:
    deadline = time.monotonic() + START_TIMEOUT_S
    # Step 2 * CHECKPOINT_EVERY is logged just before its save starts.
    while not (_saved_steps(workdir) and
               max(_logged_steps(workdir) or [0]) >= 2 * CHECKPOINT_EVERY):
      assert all(p.poll() is None for p in procs), '\n'.join(map(_tail, logs))
      assert time.monotonic() < deadline, 'no checkpoint and step after it\n' + _tail(logs[0])
      time.sleep(0.05)
    procs[1].kill()
    killed = time.monotonic()
    try:
      code = procs[0].wait(timeout=EXIT_BOUND_S)
    except subprocess.TimeoutExpired:
      pytest.fail(f'process 0 still runs {EXIT_BOUND_S} s after process 1 died\n' +
                  _tail(logs[0]))
    waited = time.monotonic() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  assert code != 0, _tail(logs[0])  # aborted by the coordination service, not finished
  assert waited < EXIT_BOUND_S
  assert max(_logged_steps(workdir)) < STEPS  # the kill came before the end
  saved = _saved_steps(workdir)
  print(f'process 0 exited {code} {waited:.1f} s after process 1 was killed; checkpoints/: '
        f'{sorted(p.name for p in workdir_lib.checkpoint_dir(workdir).iterdir())}')
  # Process 0 releases its lock when the failed save raises before the abort, else leaves it.
  stale_lock = (workdir / workdir_lib.LOCK_FILE).exists()

  # The rerun (launcher, prepare included) resumes from the newest complete step.
  _run_job(workdir, overrides)
  for i in range(NUM_PROCESSES):
    log = local.log_path(workdir, i).read_text()
    assert re.findall(r'resumed from \S+ step (\d+)', log) == [str(saved[-1])], _tail(
        local.log_path(workdir, i))
  assert ('taking over the stale lock' in local.log_path(workdir, 0).read_text()) == stale_lock
  reference = tmp_path / 'reference'
  _run_job(reference, {**overrides, 'data.tokenizer': str(workdir_lib.tokenizer_path(workdir))},
           '--no_prepare')  # the data is there; the same tokenizer

  assert _logged_steps(workdir) == list(range(1, STEPS + 1))  # each step logged once
  assert [(r['step'], r['loss']) for r in _metrics(workdir)] == [
      (r['step'], r['loss']) for r in _metrics(reference)]
  step_a, params_a = workdir_lib.restore_params(workdir_lib.read_config(workdir), workdir)
  step_b, params_b = workdir_lib.restore_params(workdir_lib.read_config(reference), reference)
  assert step_a == step_b == STEPS
  flat_a, flat_b = _flat(params_a), _flat(params_b)
  assert flat_a.keys() == flat_b.keys()
  for name, value in flat_a.items():
    np.testing.assert_array_equal(value, flat_b[name], err_msg=name)


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize('field', ['heartbeat_timeout_seconds', 'shutdown_timeout_seconds'])
def test_timeouts_must_be_positive_seconds(tiny_config, field):
  tiny_config.distributed[field] = 0
  with pytest.raises(config_lib.ConfigError, match=f'config.distributed.{field}=0'):
    config_lib.validate(tiny_config)
