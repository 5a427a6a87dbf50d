"""A local GCS emulator for the bucket tests: `gcp-storage-emulator` on a free localhost port.

The `gcs_bucket` fixture starts it in a subprocess (in memory, one bucket), points each library
that talks to GCS at it through its own environment variable, yields the bucket's URL
('gs://skymoe-test') and stops the server after the test:

  epath (fsspec/gcsfs)   EPATH_USE_TF=false, STORAGE_EMULATOR_HOST
  tensorstore (orbax)    TENSORSTORE_GCS_HTTP_URL, GOOGLE_AUTH_TOKEN_FOR_TESTING
  array_record (tfds)    CLOUD_STORAGE_EMULATOR_ENDPOINT

TensorFlow's own GCS client (tf.io.gfile, used by tf.summary for TensorBoard event files)
cannot be pointed at an emulator: runs against it turn TensorBoard off (train.tensorboard).
The variables reach subprocesses too (os.environ is patched), so `python -m skymoe_jax.train
--workdir=gs://...` started by a test talks to the same server.
"""
import pathlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

BUCKET = 'skymoe-test'
EMULATOR = pathlib.Path(sys.executable).with_name('gcp-storage-emulator')


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _wait_until_up(url: str, proc: subprocess.Popen, timeout: float = 30.0) -> None:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      raise RuntimeError(f'{EMULATOR} exited with {proc.returncode} before serving {url}')
    try:
      urllib.request.urlopen(f'{url}/storage/v1/b', timeout=1).read()
      return
    except OSError:
      time.sleep(0.2)
  raise RuntimeError(f'{EMULATOR} did not answer on {url} within {timeout:.0f} s')


def emulator_env(url: str) -> dict:
  """The variables that point epath, tensorstore and array_record at the emulator at url."""
  return {'EPATH_USE_TF': 'false', 'STORAGE_EMULATOR_HOST': url,
          'TENSORSTORE_GCS_HTTP_URL': url, 'GOOGLE_AUTH_TOKEN_FOR_TESTING': 'x',
          'CLOUD_STORAGE_EMULATOR_ENDPOINT': url, 'GOOGLE_CLOUD_PROJECT': 'test'}


@pytest.fixture
def gcs_bucket(monkeypatch, tmp_path_factory):
  """'gs://skymoe-test' on a fresh in-memory emulator, with the environment pointed at it."""
  if not EMULATOR.exists():
    pytest.skip(f'{EMULATOR} is not installed (pip install gcp-storage-emulator)')
  port = _free_port()
  url = f'http://127.0.0.1:{port}'
  log = tmp_path_factory.mktemp('gcs_emulator') / 'emulator.log'
  with open(log, 'wb') as out:
    proc = subprocess.Popen([str(EMULATOR), 'start', '--host=127.0.0.1', f'--port={port}',
                             '--in-memory', f'--default-bucket={BUCKET}'],
                            stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
  try:
    _wait_until_up(url, proc)
    for key, value in emulator_env(url).items():
      monkeypatch.setenv(key, value)
    yield f'gs://{BUCKET}'
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
