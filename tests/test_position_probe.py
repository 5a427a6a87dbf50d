"""benchmarks/position_probe.py: the probe's R^2 against data whose answer is known."""
import numpy as np

from benchmarks import position_probe
from conftest import load_config


def test_ridge_r2_finds_a_linear_position_and_nothing_in_noise():
  rng = np.random.default_rng(0)
  targets = rng.uniform(size=(400, 2))
  mixing = rng.normal(size=(2, 32))
  linear = targets @ mixing + 0.01 * rng.normal(size=(400, 32))
  train = np.arange(400) < 280
  assert np.all(position_probe.ridge_r2(linear, targets, train) > 0.99)
  noise = rng.normal(size=(400, 32))
  assert np.all(position_probe.ridge_r2(noise, targets, train) < 0.1)


def test_probe_objects_are_the_scenes_boxes():
  config = load_config('tiny')
  images, boxes = position_probe.objects_and_images(config, num_scenes=4)
  size = config.model.vision.image_size
  assert images.shape == (len(boxes), size, size, 3) and len(boxes) > 0
  assert np.all((boxes >= 0) & (boxes <= 1)) and np.all(boxes[:, 2:] > boxes[:, :2])
