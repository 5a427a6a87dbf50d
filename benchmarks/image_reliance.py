"""Does a trained model read the image to answer? Answer loss with each row's own image against
another row's, per task, on a workdir's held-out data.

  python benchmarks/image_reliance.py --workdir=DIR [--step=N] [--rows=256] [--out=FILE.json]

For every task of the workdir's sources, rows of that task alone (data.task_repeats) from the
evaluation split go through the training loss (training/loss.py, next-token cross-entropy on the
answer tokens) three times: with their own images, with the images rolled by one row (each
question sees another scene), and with blank images (every pixel at the normalisation mean).
`image_gain` = loss(other image) - loss(own image), in nats per answer token: about 0 says the
answers come from the question and the data's priors alone, whatever the picture shows.
"""
import json
import sys

from absl import app, flags
import jax
import ml_collections
import numpy as np

from skymoe_jax import workdir as workdir_lib
from skymoe_jax.data import pipeline, sources, tasks
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.model import factory
from skymoe_jax.training import loss as loss_lib

FLAGS = flags.FLAGS


def task_config(config, task, batch_size):
  """The workdir's config reading `task`'s rows of the evaluation split, unedited."""
  c = ml_collections.ConfigDict(config.to_dict())
  for name in c.data.sources:
    c.data.sources[name].split = c.eval.split
  c.data.task_repeats.update({t: int(t == task) for t in tasks.TASKS})
  c.data.batch_size = batch_size
  c.data.cda.enabled = False
  c.data.local_views = False
  c.train.contrastive_weight = 0.0
  return c


def reliance(config, params, tokenizer, rows, batch_size):
  """{task: {loss_own_image, loss_other_image, loss_blank_image, image_gain, rows}}."""
  model = factory.create_model(config)
  ce = jax.jit(lambda p, b: loss_lib.model_loss(p, model, b, config)[1]['ce_loss'])
  steps = max(1, rows // batch_size)
  out = {}
  for task in tasks.TASKS:
    try:
      builder = pipeline.BatchBuilder(task_config(config, task, batch_size), tokenizer)
    except pipeline.DataError:  # no rows of this task in any source
      continue
    losses = {'own': [], 'other': [], 'blank': []}
    for step in range(steps):
      batch = {k: v for k, v in builder.build(step).items() if k != 'counters'}
      images = batch['images']
      for name, shown in (('own', images), ('other', np.roll(images, 1, axis=0)),
                          ('blank', np.zeros_like(images))):
        losses[name].append(float(ce(params, dict(batch, images=shown))))
    mean = {k: float(np.mean(v)) for k, v in losses.items()}
    out[task] = {'loss_own_image': round(mean['own'], 4),
                 'loss_other_image': round(mean['other'], 4),
                 'loss_blank_image': round(mean['blank'], 4),
                 'image_gain': round(mean['other'] - mean['own'], 4),
                 'rows': steps * batch_size}
  return out


def define_flags():
  """The command's flags (defined only when run as a script: tests import several tools)."""
  flags.DEFINE_string('workdir', None, 'A training workdir.', required=True)
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')
  flags.DEFINE_integer('rows', 256, 'Held-out rows per task.')
  flags.DEFINE_integer('batch_size', 64, 'Rows per forward pass.')
  flags.DEFINE_string('out', '', 'Also write the figures as JSON here.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  config = workdir_lib.read_config(FLAGS.workdir)
  sources.resolve_sources(config)
  step, params = workdir_lib.restore_params(config, FLAGS.workdir, FLAGS.step)
  tokenizer = tokenizer_lib.Tokenizer.from_bytes(
      workdir_lib.tokenizer_path(FLAGS.workdir).read_bytes())
  result = dict(workdir=str(FLAGS.workdir), step=int(step),
                tasks=reliance(config, params, tokenizer, FLAGS.rows, FLAGS.batch_size))
  print(json.dumps(result, indent=1))
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  define_flags()
  sys.exit(app.run(main))
