"""Test setup: 8 forced CPU devices (set before jax is imported) and shared fixtures."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# rbg keys compile much faster than threefry on CPU; no test depends on particular random values.
os.environ.setdefault('JAX_DEFAULT_PRNG_IMPL', 'rbg')
# gs:// paths go through epath's fsspec backend (gcsfs) in every test, the only GCS client the
# emulator of tests/gcs_emulator.py can stand behind TensorFlow's; set before anything imports
# epath, which decides its backend once per process.
os.environ['EPATH_USE_TF'] = 'false'

import pathlib  # noqa: E402

import pytest  # noqa: E402

from skymoe_jax import config as config_lib  # noqa: E402
from skymoe_jax.data import sources  # noqa: E402
from skymoe_jax.training import loop  # noqa: E402
from gcs_emulator import gcs_bucket  # noqa: E402,F401  (the bucket tests' fixture)

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg=None):
  """configs/<name>.py's get_config(arg), loaded the way the command line loads it."""
  path = REPO / 'configs' / f'{name}.py'
  return config_lib.load(f'{path}:{arg}' if arg else str(path))


@pytest.fixture
def tiny_config():
  return load_config('tiny')


def train_tiny_run(root: pathlib.Path, **eval_settings):
  """(config, workdir) of the tiny MoE model trained for two steps into root/run, its data
  sources resolved for evaluation; eval_settings update config.eval."""
  config = load_config('tiny')
  config.data.synthetic.cache_dir = str(root / 'cache')
  config.train.update(total_steps=2, log_every=1)
  config.eval.update(**eval_settings)
  loop.train(config, root / 'run')
  sources.resolve_sources(config)
  return config, root / 'run'

