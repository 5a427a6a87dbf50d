"""The config's data sources on disk: generated ones made when missing, every one checked early.

config.data.sources maps a name to {data_dir, split, weight, generate}; data_dir is a tfds
version folder (data/builders.py, e.g. .../skymoe_ucmerced/1.0.0; a bucket URL works too);
generate='synthetic' renders the synthetic scenes (data/synthetic.py) into a cache folder named
by their settings. A folder in the old shard format is refused here, with its migration command.
"""

from absl import logging
import jax
from jax.experimental import multihost_utils

from skymoe_jax import storage
from skymoe_jax.data import records, synthetic


def sync(name: str) -> None:
  """All processes wait here (no-op in one process): files process 0 wrote are then ready."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def synthetic_difficulty(config) -> synthetic.Difficulty:
  s = config.data.synthetic
  return synthetic.Difficulty(s.object_scale, s.max_objects, s.scene_mix, s.local_questions)


def synthetic_dir(config):
  s = config.data.synthetic
  name = synthetic.dataset_name(s.num_images, s.seed, s.image_size, s.val_fraction,
                                synthetic_difficulty(config))
  return storage.path(s.cache_dir) / f'synthetic-{name}'


def resolve_sources(config) -> None:
  """Fills in data_dir of generated sources (making the data if missing); checks the rest."""
  for name, source in config.data.sources.items():
    if source.get('generate', '') == 'synthetic':
      s = config.data.synthetic
      path = synthetic_dir(config)
      if jax.process_index() == 0:
        synthetic.ensure(path, s.num_images, s.seed, s.image_size, s.val_fraction,
                         synthetic_difficulty(config))
      sync('synthetic data')
      source.data_dir = str(path)
    records.read_info(source.data_dir)  # fails early, naming the folder, if there is no data
    logging.info('data source %s: %s split %s weight %s', name, source.data_dir, source.split,
                 source.weight)
