"""benchmarks/image_reliance.py: the loss gap between a row's own image and another's."""
import jax
from flax.core import meta
import numpy as np
import pytest

from benchmarks import image_reliance
from conftest import load_config
from skymoe_jax.data import pipeline, synthetic, tasks
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.model import factory


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  root = tmp_path_factory.mktemp('reliance')
  synthetic.generate(root / 'syn', num_images=16, seed=1, image_size=64, val_fraction=0.5)
  tok = tokenizer_lib.ensure(root / 'tok', [root / 'syn'], 256)
  config = load_config('tiny')
  config.data.sources.synthetic.update(data_dir=str(root / 'syn'), generate='')
  model = factory.create_model(config)
  params = meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0),
                                          *factory.example_inputs(config))['params'])
  return config, tok, params


def test_task_config_reads_one_task_of_the_evaluation_split(setup):
  config, tok, _ = setup
  c = image_reliance.task_config(config, 'grounding', 8)
  batch = pipeline.BatchBuilder(c, tok).build(0)
  assert (batch['task_id'] == tasks.task_id('grounding')).all()
  assert c.data.sources.synthetic.split == config.eval.split and not c.data.cda.enabled


def test_a_model_blind_to_the_image_gains_nothing_from_it(setup):
  config, tok, params = setup
  seeing = image_reliance.reliance(config, params, tok, rows=16, batch_size=8)
  assert set(seeing) == set(tasks.TASKS)
  # A random model's answers depend on the picture.
  assert any(abs(r['image_gain']) > 1e-4 for r in seeing.values())
  # With the projector's output at zero (and no position table), the image never reaches the
  # decoder: every image gives the same loss.
  blind = jax.tree_util.tree_map(np.asarray, params)
  blind['projector']['fc2'] = jax.tree_util.tree_map(np.zeros_like, blind['projector']['fc2'])
  assert config.model.vision.token_posemb == 'none'
  for task, r in image_reliance.reliance(config, blind, tok, rows=16, batch_size=8).items():
    assert r['image_gain'] == pytest.approx(0.0, abs=1e-6), task
    assert r['loss_blank_image'] == pytest.approx(r['loss_own_image'], abs=1e-6), task
    assert r['rows'] == 16
