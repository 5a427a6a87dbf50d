"""Test setup: 8 forced CPU devices (set before jax is imported) and shared fixtures."""
import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# rbg keys compile much faster than threefry on CPU; no test depends on particular random values.
os.environ.setdefault('JAX_DEFAULT_PRNG_IMPL', 'rbg')

import pathlib  # noqa: E402

import pytest  # noqa: E402

from skymoe_jax import config as config_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def load_config(name: str, arg=None):
  """configs/<name>.py's get_config(arg), loaded the way the command line loads it."""
  path = REPO / 'configs' / f'{name}.py'
  return config_lib.load(f'{path}:{arg}' if arg else str(path))


@pytest.fixture
def tiny_config():
  return load_config('tiny')
