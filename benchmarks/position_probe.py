"""Does an image token the decoder reads say where it is? A linear probe on a trained workdir.

  python benchmarks/position_probe.py --workdir=DIR [--step=N] [--init] [--out=FILE.json]

For every object of the held-out synthetic scenes (the workdir's own data.synthetic), the image
token at the object's centre (the projector's output, what the decoder reads) is fed to a ridge
regression that predicts the object's centre and box; R^2 on the held-out 30% of the objects.
R^2 near 1 says the token carries its position linearly, near 0 that nothing is left to read a box
off. The grid cell of the token, a perfect guess to within half a patch, is the reference line.
--init probes the same model at its initialisation (the position table it starts with).
"""
import json
import sys

from absl import app, flags
from flax.core import meta
import jax
import numpy as np

from skymoe_jax import workdir as workdir_lib
from skymoe_jax.data import image_ops, sources, synthetic
from skymoe_jax.model import factory

FLAGS = flags.FLAGS

TRAIN_SHARE = 0.7
RIDGE = (1.0, 10.0, 100.0)   # the best of these on the held-out part is reported


def objects_and_images(config, num_scenes):
  """(normalised images [N, S, S, 3], boxes [N, 4] in 0-1): one row per object."""
  s, size = config.data.synthetic, config.model.vision.image_size
  difficulty = sources.synthetic_difficulty(config)
  num_val = synthetic.split_sizes(s.num_images, s.val_fraction)['validation']
  images, boxes = [], []
  for index in range(min(num_scenes, num_val)):
    record = synthetic.image_records(s.seed, 'validation', index, s.image_size, difficulty)[0]
    view = image_ops.normalize(image_ops.global_view(image_ops.decode(record.image), size))
    for box in record.boxes:
      images.append(view)
      boxes.append(np.asarray(box, np.float64) / s.image_size)
  if not boxes:
    raise ValueError(f'no objects in the first {num_scenes} held-out scenes')
  return np.stack(images), np.stack(boxes)


def ridge_r2(features, targets, train):
  """Held-out R^2 per target column of the best ridge penalty (features standardised on the
  training part, intercept not penalised)."""
  mean, std = features[train].mean(0), features[train].std(0) + 1e-6
  f = (features - mean) / std
  f = np.concatenate([f, np.ones((len(f), 1))], axis=1)
  centred = targets[~train] - targets[~train].mean(0)
  best = None
  for lam in RIDGE:
    penalty = lam * np.eye(f.shape[1])
    penalty[-1, -1] = 0.0
    w = np.linalg.solve(f[train].T @ f[train] + penalty, f[train].T @ targets[train])
    resid = f[~train] @ w - targets[~train]
    r2 = 1.0 - (resid ** 2).sum(0) / (centred ** 2).sum(0)
    if best is None or r2.mean() > best.mean():
      best = r2
  return best


def probe(config, params, num_scenes):
  model = factory.create_model(config)
  images, boxes = objects_and_images(config, num_scenes)
  encode = jax.jit(lambda p, x: model.apply({'params': p}, x, method='encode_images'))
  v = config.model.vision
  grid = v.image_size // v.patch_size
  centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], 1)
  cell = np.clip((centres * grid).astype(int), 0, grid - 1)      # (column, row)
  token = cell[:, 1] * grid + cell[:, 0]                           # row-major patches
  features = np.concatenate([np.asarray(encode(params, images[i:i + 64]))[
      np.arange(len(images[i:i + 64])), token[i:i + 64]] for i in range(0, len(images), 64)])
  train = np.arange(len(boxes)) < int(TRAIN_SHARE * len(boxes))
  return {'objects': int(len(boxes)), 'grid': grid,
          'centre_r2_from_token': ridge_r2(features, centres, train).round(3).tolist(),
          'box_r2_from_token': ridge_r2(features, boxes, train).round(3).tolist(),
          'centre_r2_from_grid_cell': ridge_r2((cell + 0.5) / grid, centres, train).round(3).tolist()}


def define_flags():
  """The command's flags (defined only when run as a script: tests import several tools)."""
  flags.DEFINE_string('workdir', None, 'A training workdir.', required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')
  flags.DEFINE_bool('init', False, 'Probe the model at its initialisation instead.')
  flags.DEFINE_integer('num_scenes', 450, 'Held-out scenes to read objects from.')
  flags.DEFINE_string('out', '', 'Also write the figures as JSON here.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  config = workdir_lib.read_config(FLAGS.workdir)
  step, params = workdir_lib.restore_params(config, FLAGS.workdir, FLAGS.step)
  if FLAGS.init:  # the same model as its training began (a from-scratch stage I)
    init = jax.jit(factory.create_model(config).init)
    step, params = 0, meta.unbox(init(jax.random.PRNGKey(config.seed),
                                      *factory.example_inputs(config))['params'])
  result = dict(workdir=str(FLAGS.workdir), step=int(step), **probe(config, params,
                                                                   FLAGS.num_scenes))
  print(json.dumps(result, indent=1))
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  define_flags()
  sys.exit(app.run(main))
