"""Two processes on localhost (4 CPU devices each) train like one process with 8 devices.

The workers (tests/multihost_worker.py) join through jax.distributed with gloo collectives,
build the mesh data=2 x expert=4 over the 8 global devices, load only their own rows of each
global batch and run 3 sharded SGD steps. The reference is the same 3 steps in this process
(8 forced devices from conftest), with the whole batch placed by the train step itself.
"""
import json
import os
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import multihost_worker as worker
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.parallel import multihost

NUM_PROCESSES = 2
TIMEOUT_S = 300


def _gloo_missing():
  """Why this jax build cannot run CPU processes together, or None."""
  if not hasattr(jax, 'distributed') or not hasattr(jax.distributed, 'initialize'):
    return 'jax.distributed is not available in this jax build'
  try:
    from jax._src.lib import _jax  # pylint: disable=g-import-not-at-top
  except ImportError:
    return 'jaxlib has no _jax extension to look for gloo in'
  if not hasattr(_jax, 'make_gloo_tcp_collectives'):
    return 'this jaxlib is built without gloo CPU collectives'
  return None


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _worker_env():
  env = dict(os.environ)
  # The worker forces its own 4 devices; drop the 8 this process was given by conftest.
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags)
  env['JAX_PLATFORMS'] = 'cpu'
  for name in (multihost.ENV_COORDINATOR, multihost.ENV_NUM_PROCESSES, multihost.ENV_PROCESS_ID):
    env.pop(name, None)
  return env


def _start_workers(tmp_path):
  port = _free_port()
  procs = []
  for pid in range(NUM_PROCESSES):
    out = open(tmp_path / f'worker{pid}.log', 'w+')
    cmd = [sys.executable, worker.__file__, f'--process_id={pid}',
           f'--num_processes={NUM_PROCESSES}', f'--port={port}']
    procs.append((subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=_worker_env(),
                                   cwd=str(worker.REPO)), out))
  return procs


def _wait(procs, deadline):
  """Waits for all workers; kills all of them as soon as one fails or time runs out."""
  try:
    while any(p.poll() is None for p, _ in procs):
      if any(p.returncode not in (None, 0) for p, _ in procs):
        break
      if time.monotonic() > deadline:
        break
      time.sleep(0.5)
  finally:
    for p, _ in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  logs = []
  for p, out in procs:
    out.seek(0)
    logs.append(out.read())
    out.close()
  failed = [i for i, (p, _) in enumerate(procs) if p.returncode != 0]
  if failed:
    why = 'timed out' if time.monotonic() > deadline else 'failed'
    tails = '\n'.join(f'--- worker {i} (rc={procs[i][0].returncode}):\n{logs[i][-3000:]}'
                      for i in failed)
    pytest.fail(f'workers {failed} {why}:\n{tails}')
  return [json.loads(log.strip().splitlines()[-1]) for log in logs]


@pytest.mark.skipif(_gloo_missing() is not None, reason=str(_gloo_missing()))
def test_two_processes_train_like_one(tmp_path):
  procs = _start_workers(tmp_path)
  deadline = time.monotonic() + TIMEOUT_S
  try:  # the reference runs while the workers start and compile
    config = worker.tiny_config()
    reference = worker.train_losses(config, mesh_lib.create_mesh(config), lambda batch: batch)
  except BaseException:
    for p, _ in procs:
      p.kill()
    raise
  reports = _wait(procs, deadline)

  for i, report in enumerate(reports):
    assert report['process_index'] == i and report['process_count'] == NUM_PROCESSES
    assert report['rows'] == [4 * i, 4 * (i + 1)]
    # The mesh is process-major: process i's devices are the i-th half of it.
    mesh_procs = [p for _, p in report['mesh_devices']]
    assert mesh_procs == [0] * 4 + [1] * 4
    assert report['interleaved_mesh_rejected']
    np.testing.assert_allclose(report['losses'], reference, rtol=1e-5)
    # The loss is a mean over rows, blind to rows in the wrong place; this number is not.
    np.testing.assert_allclose(report['checksums'], [
        worker.numpy_position_checksum(worker.global_batch(config, i))
        for i in range(worker.STEPS)], rtol=1e-5)
  assert reports[0]['losses'] == reports[1]['losses']  # one replicated value, seen twice
  assert len(set(reference)) == worker.STEPS  # the steps really changed the model


def test_distributed_settings_from_config_and_environment():
  env = {multihost.ENV_COORDINATOR: 'h:1', multihost.ENV_NUM_PROCESSES: '4',
         multihost.ENV_PROCESS_ID: '3'}
  config = worker.tiny_config()
  assert multihost.distributed_settings(config, environ={}) is None  # single process
  # The timeouts always go to jax (a dead process must not hang the others), defaults included.
  timeouts = dict(heartbeat_timeout_seconds=60, shutdown_timeout_seconds=120)
  assert multihost.distributed_settings(config, environ=env) == dict(
      coordinator_address='h:1', num_processes=4, process_id=3, **timeouts)
  config.distributed.heartbeat_timeout_seconds = 10
  assert multihost.distributed_settings(config, environ=env)['heartbeat_timeout_seconds'] == 10
  config.distributed = dict(process_id=1)  # a config field wins over its variable
  settings = multihost.distributed_settings(config, environ=env)
  assert settings['process_id'] == 1 and settings['heartbeat_timeout_seconds'] == 60
  assert multihost.distributed_settings(
      None, environ={multihost.ENV_COORDINATOR: 'auto'}) == timeouts
  config.distributed = dict(auto=True, process_id=None)
  assert multihost.distributed_settings(config, environ={}) == timeouts
  with pytest.raises(ValueError, match=r'config.distributed.num_processes'):
    multihost.distributed_settings(None, environ={multihost.ENV_COORDINATOR: 'h:1',
                                                  multihost.ENV_PROCESS_ID: '0'})
  with pytest.raises(ValueError, match=r'process_id=4: must be in \[0, num_processes=4\)'):
    multihost.distributed_settings(None, environ=dict(env, **{multihost.ENV_PROCESS_ID: '4'}))


def test_host_batch_slice_and_single_process_global_batch():
  assert multihost.host_batch_slice(8, 1, 2) == slice(4, 8)
  assert multihost.host_batch_slice(12, 0, 3) == slice(0, 4)
  with pytest.raises(ValueError, match='not divisible by the 3 processes'):
    multihost.host_batch_slice(8, 0, 3)
  config = worker.tiny_config()
  mesh = mesh_lib.create_mesh(config)
  batch = worker.global_batch(config, 0)
  placed = multihost.make_global_batch(batch, mesh, config)
  for name, value in batch.items():
    np.testing.assert_array_equal(np.asarray(placed[name]), value)
    assert placed[name].sharding.spec[0] == ('data', 'fsdp', 'expert')
  with pytest.raises(ValueError, match='not divisible by the 8 batch shards'):
    multihost.make_global_batch({k: v[:4] for k, v in batch.items()}, mesh, config)
