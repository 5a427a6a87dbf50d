"""A run with its workdir in a bucket (gs://, on a local GCS emulator: tests/gcs_emulator.py).

The tiny config trains 3 steps into gs://BUCKET/run as the real command (a subprocess, so it
can be killed), is killed after its first checkpoint and resumes to the same losses as a local
run of the same config; then it is evaluated and exported to the bucket. Every command runs
with its cwd, HOME and TMPDIR in test folders, and no file may land there but caches.

What the emulator cannot stand in for, and so is off here (config overrides below):
  train.tensorboard=False    TensorFlow's GCS client (tf.summary's event files) cannot be
                             pointed at an emulator; on a real bucket it writes gs:// itself.
  train.checkpoint_ocdbt=False  tensorstore's OCDBT layout needs GCS's generation headers on
                             reads (x-goog-generation, ifGenerationNotMatch), which
                             gcp-storage-emulator does not send; orbax's per-array zarr layout
                             goes through the same tensorstore GCS driver without them.
The data is in the bucket too: the tiny config's synthetic scenes, rendered once in the test and
copied to gs://BUCKET/data (a tfds dataset, read by array_record's own GCS client); the local
reference run reads the same dataset from a local folder.
"""
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest
from etils import epath

REPO = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(REPO / 'configs' / 'tiny.py')
OVERRIDES = ['--config.train.total_steps=3', '--config.train.log_every=1',
             '--config.train.checkpoint_every=1', '--config.train.tensorboard=False',
             '--config.train.checkpoint_ocdbt=False']
CACHES = ('.cache', '.config', '.keras', '.nv', '.triton')  # under HOME: libraries' caches
# In TMPDIR: the code tf.data's autograph generates for the input pipeline's functions (a cache
# TensorFlow makes and never deletes, whatever the paths).
TEMP_CACHES = ('__autograph_generated_file',)


def _folders(root: pathlib.Path) -> dict:
  out = {name: root / name for name in ('cwd', 'home', 'tmp')}
  for folder in out.values():
    folder.mkdir(parents=True, exist_ok=True)
  return out


def _command(module: str, folders: dict, *args, wait=True, timeout=420):
  env = dict(os.environ, HOME=str(folders['home']), TMPDIR=str(folders['tmp']),
             JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
  argv = [sys.executable, '-m', f'skymoe_jax.{module}', *args]
  log = open(folders['logs'] / f'{module}-{time.monotonic_ns()}.log', 'w')
  proc = subprocess.Popen(argv, cwd=folders['cwd'], env=env, stdout=log,
                          stderr=subprocess.STDOUT)
  if not wait:
    return proc, log
  try:
    rc = proc.wait(timeout=timeout)
  finally:
    log.close()
  text = pathlib.Path(log.name).read_text()
  assert rc == 0, f'{" ".join(argv)} failed ({rc}):\n{text[-4000:]}'
  return text


def _losses(metrics: str) -> dict:
  return {row['step']: row['loss'] for row in map(json.loads, metrics.splitlines())}


def _stray_files(folders: dict) -> list:
  """Files in cwd, TMPDIR or HOME (outside its caches) after the run."""
  found = [p for p in folders['cwd'].rglob('*') if p.is_file()]
  found += [p for p in folders['tmp'].rglob('*') if p.is_file() and
            not p.name.startswith(TEMP_CACHES)]
  found += [p for p in folders['home'].rglob('*') if p.is_file() and
            p.relative_to(folders['home']).parts[0] not in CACHES]
  return sorted(found)


@pytest.mark.slow
def test_train_kill_resume_evaluate_export_in_a_bucket(gcs_bucket, tmp_path):
  logs = tmp_path / 'logs'
  logs.mkdir()
  local = dict(_folders(tmp_path / 'local'), logs=logs)
  remote = dict(_folders(tmp_path / 'remote'), logs=logs)
  # The tiny config's synthetic scenes as a tfds dataset, locally and in the bucket.
  from skymoe_jax import config as config_lib, storage
  from skymoe_jax.data import synthetic
  scenes = config_lib.load(CONFIG).data.synthetic
  synthetic.generate(tmp_path / 'data', scenes.num_images, scenes.seed, scenes.image_size,
                     scenes.val_fraction)
  storage.copy_tree(tmp_path / 'data', f'{gcs_bucket}/data')
  source = ['--config.data.sources.synthetic.generate=']
  local_data = source + [f'--config.data.sources.synthetic.data_dir={tmp_path / "data"}']
  data = source + [f'--config.data.sources.synthetic.data_dir={gcs_bucket}/data']
  run = f'{gcs_bucket}/run'

  # The reference: the same config, a local workdir, no interruption.
  _command('train', local, f'--config={CONFIG}', f'--workdir={tmp_path / "local_run"}',
           *OVERRIDES, *local_data)
  expected = _losses((tmp_path / 'local_run' / 'metrics.jsonl').read_text())
  assert sorted(expected) == [1, 2, 3]

  # Killed once its first checkpoint is complete (the manifest is written after the save).
  proc, log = _command('train', remote, f'--config={CONFIG}', f'--workdir={run}', *OVERRIDES,
                       *data, wait=False)
  manifest = epath.Path(run) / 'checkpoints' / '1' / 'skymoe_manifest.json'
  deadline = time.monotonic() + 420
  try:
    while not manifest.exists() and proc.poll() is None and time.monotonic() < deadline:
      time.sleep(0.5)
    killed = proc.poll() is None
    proc.kill()
    proc.wait()
  finally:
    log.close()
  text = pathlib.Path(log.name).read_text()
  assert killed, f"the run ended before it could be killed:\n{text[-3000:]}"
  assert manifest.exists()

  _command('train', remote, f'--config={CONFIG}', f'--workdir={run}', *OVERRIDES, *data)
  got = _losses((epath.Path(run) / 'metrics.jsonl').read_text())
  assert sorted(got) == [1, 2, 3]
  for step in expected:
    assert got[step] == pytest.approx(expected[step], rel=1e-6, abs=1e-6), (step, got, expected)
  assert not (epath.Path(run) / 'train.lock').exists()
  assert (epath.Path(run) / 'tokenizer.model').exists()

  _command('evaluate', remote, f'--config={CONFIG}', f'--workdir={run}', *data,
           '--config.eval.max_samples=2')
  report = json.loads((epath.Path(run) / 'eval' / '3' / 'metrics.json').read_text())
  assert report['step'] == 3 and report['tasks']
  assert (epath.Path(run) / 'eval' / '3' / 'answers.jsonl').exists()

  assert _stray_files(remote) == []  # training and evaluation: nothing local but caches

  out = f'{gcs_bucket}/export'
  _command('export', remote, f'--workdir={run}', f'--out={out}')
  exported = {p.name for p in epath.Path(out).iterdir()}
  assert {'config.json', 'tokenizer.model'} <= exported, exported
  assert any(n.endswith('.safetensors') for n in exported), exported

  assert _stray_files(remote) == []


def test_storage_helpers_and_the_trainer_lock_in_a_bucket(gcs_bucket, tmp_path):
  from skymoe_jax import storage, workdir as workdir_lib
  root = storage.path(gcs_bucket) / 'helpers'
  assert storage.is_remote(root) and storage.resolve(str(root)) == root
  storage.write_text_atomically(root / 'a.json', '{"x": 1}\n')
  storage.append_text(root / 'a.json', '{"x": 2}\n')
  storage.append_text(root / 'new.jsonl', 'first\n')
  assert (root / 'a.json').read_text() == '{"x": 1}\n{"x": 2}\n'
  assert (root / 'new.jsonl').read_text() == 'first\n'
  (tmp_path / 'tok.model').write_bytes(b'\x00model')
  storage.copy_file(tmp_path / 'tok.model', root / 'sub' / 'tok.model')
  with storage.local_folder(root) as local:
    assert (local / 'sub' / 'tok.model').read_bytes() == b'\x00model'
    (local / 'made.txt').write_text('x')
  assert not (root / 'made.txt').exists()  # read only unless write=True
  with storage.local_folder(root / 'out', read=False, write=True) as local:
    (local / 'made.txt').write_text('y')
  assert (root / 'out' / 'made.txt').read_text() == 'y'

  run = str(root / 'run')
  with workdir_lib.TrainerLock(run) as lock:
    assert lock.path.exists()
    with pytest.raises(workdir_lib.WorkdirLockedError, match='in use by another trainer'):
      workdir_lib.TrainerLock(run).__enter__()
  assert not lock.path.exists()
  # A lock left by a killed trainer on this host is taken over.
  (storage.path(run) / workdir_lib.LOCK_FILE).write_text(json.dumps(
      {'host': __import__('socket').gethostname(), 'pid': 2 ** 22 + 12345, 'since': 'then'}))
  with workdir_lib.TrainerLock(run):
    pass
  assert not (storage.path(run) / workdir_lib.LOCK_FILE).exists()
