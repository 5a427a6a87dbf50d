"""benchmarks/column_major.py: its model is the plain one on the transposed image, and the
trainer's and the generator's models become it."""
import flax.linen as nn
import jax
import numpy as np

from benchmarks import column_major
from conftest import load_config
from skymoe_jax.evaluation import generate
from skymoe_jax.model import factory, skymoe


def test_column_major_model_reads_the_transposed_image(monkeypatch):
  config = load_config('tiny')
  plain = factory.create_model(config)
  args = factory.example_inputs(config, 2, 4)
  params = nn.unbox(plain.init(jax.random.key(0), *args)['params'])
  for module in (skymoe, factory, generate):  # restored after the test
    monkeypatch.setattr(module, 'SkyMoE', module.SkyMoE)
  column_major.use_column_major()
  swapped = factory.create_model(config)
  assert isinstance(swapped, column_major.ColumnMajor)
  assert generate.SkyMoE is column_major.ColumnMajor
  v = config.model.vision
  images = np.random.default_rng(0).normal(size=(2, v.image_size, v.image_size, 3))
  encode = lambda model, x: np.asarray(model.apply(  # noqa: E731
      {'params': params}, x.astype(np.float32), method='encode_images'))
  np.testing.assert_allclose(encode(swapped, images),
                             encode(plain, np.swapaxes(images, 1, 2)), atol=1e-6)
  assert np.abs(encode(swapped, images) - encode(plain, images)).max() > 1e-3
