"""The package's layer contract (.importlinter), checked by import-linter as it is, and shown to
catch a layering break: the model importing the training package."""
import os
import pathlib
import shutil
import subprocess
import sys

from conftest import REPO

LINT = str(pathlib.Path(sys.executable).parent / 'lint-imports')


def _lint(root: pathlib.Path) -> subprocess.CompletedProcess:
  """lint-imports with REPO's contract over the skymoe_jax package found under `root`."""
  env = dict(os.environ, PYTHONPATH=str(root))
  return subprocess.run([LINT, '--config', str(REPO / '.importlinter'), '--no-cache'],
                        cwd=root, env=env, capture_output=True, text=True)


def test_layers_are_kept():
  r = _lint(REPO)
  assert r.returncode == 0, r.stdout + r.stderr
  assert 'Contracts: 2 kept, 0 broken.' in r.stdout


def test_model_importing_training_breaks_the_contract(tmp_path):
  shutil.copytree(REPO / 'skymoe_jax', tmp_path / 'skymoe_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  decoder = tmp_path / 'skymoe_jax' / 'model' / 'decoder.py'
  decoder.write_text(decoder.read_text() + '\nfrom skymoe_jax.training import loss  # noqa\n')
  r = _lint(tmp_path)
  assert r.returncode != 0
  assert 'BROKEN' in r.stdout and 'skymoe_jax.model.decoder -> skymoe_jax.training.loss' in r.stdout


def test_config_importing_the_pipeline_breaks_the_contract(tmp_path):
  shutil.copytree(REPO / 'skymoe_jax', tmp_path / 'skymoe_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  config = tmp_path / 'skymoe_jax' / 'config.py'
  config.write_text(config.read_text() + '\nfrom skymoe_jax.data import pipeline  # noqa\n')
  r = _lint(tmp_path)
  assert r.returncode != 0 and 'skymoe_jax.config -> skymoe_jax.data.pipeline' in r.stdout
