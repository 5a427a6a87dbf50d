"""What grounding Acc@0.5 a reader of the model's patch grid could reach: is the floor the task's?

  python benchmarks/grounding_ceiling.py --workdir=DIR [--step=N] [--out=FILE.json]

A run's grounding questions (DIR/eval/<step>/answers.jsonl) are scored by the grounding
evaluator with answers made from their reference boxes as a model that reads the image at its
patch grid could give them (the grid: the model's patch in scene pixels, data image_size /
vision image_size x patch_size):
  patch edges              every coordinate rounded to the nearest patch boundary
  centre patch, true size  the box moved so its centre is that of the patch holding it
  true centre, median size the box's own centre, the median width and height of all references
next to the best constant box (evaluators.constant_baseline) and the run's own answers. High
scores for the first three say the resolution leaves room: a low Acc@0.5 is the model's.

`reading` says how much of the answers' place comes from the picture: the Pearson correlation
of the answers' box centres and sizes with the references' (x and y apart: a model may read one
axis and not the other), the median centre error and the distinct boxes.
"""
import json
import statistics
import sys

import numpy as np

from absl import app, flags

from skymoe_jax import workdir as workdir_lib
from skymoe_jax.data import boxes
from skymoe_jax.evaluation import evaluators, runner

FLAGS = flags.FLAGS


def grounding_samples(path):
  """The grounding rows of an answers.jsonl as evaluator samples (the run's own answers)."""
  samples = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if row['task'] == 'grounding':
        samples.append({'question_id': row['question_id'], 'prediction': row['answer'],
                        'references': row['references'], 'width': row['width'],
                        'height': row['height'], 'dialect': runner.DIALECT})
  if not samples:
    raise ValueError(f'{path}: no grounding answers')
  return samples


def _reference_box(sample):
  return boxes.parse(sample['dialect'], sample['references'][0], sample['width'],
                     sample['height'])[0]


def patch_edges(box, grid, sizes):
  del sizes
  return boxes.Box(*(round(v / grid) * grid for v in (box.x1, box.y1, box.x2, box.y2)))


def centre_patch_true_size(box, grid, sizes):
  del sizes
  cx = (int((box.x1 + box.x2) / 2 // grid) + 0.5) * grid
  cy = (int((box.y1 + box.y2) / 2 // grid) + 0.5) * grid
  w, h = box.x2 - box.x1, box.y2 - box.y1
  return boxes.Box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


def true_centre_median_size(box, grid, sizes):
  del grid
  w, h = sizes
  cx, cy = (box.x1 + box.x2) / 2, (box.y1 + box.y2) / 2
  return boxes.Box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2)


READERS = {'patch edges': patch_edges, 'centre patch, true size': centre_patch_true_size,
           'true centre, median size': true_centre_median_size}


def ceiling(samples, grid):
  """{reader: Acc@0.5} for READERS, the constant box and the run's answers."""
  evaluator = evaluators.get_evaluator('grounding')
  refs = [_reference_box(s) for s in samples]
  sizes = (statistics.median(b.x2 - b.x1 for b in refs),
           statistics.median(b.y2 - b.y1 for b in refs))
  headline = evaluator.headline
  result = {}
  for name, reader in READERS.items():
    answers = [dict(s, prediction=boxes.format(s['dialect'], reader(b, grid, sizes), s['width'],
                                               s['height'])) for s, b in zip(samples, refs)]
    result[name] = evaluator.score(answers)[headline]
  result['best constant box'] = evaluators.constant_baseline('grounding', samples, evaluator)
  result['the run'] = evaluator.score(samples)[headline]
  return result


def _corr(a, b):
  """Pearson's r, or None where either side is constant (a stock box says nothing)."""
  if np.std(a) == 0 or np.std(b) == 0:
    return None
  return float(np.corrcoef(a, b)[0, 1])


def reading(samples):
  """How the run's parsed answers follow the reference boxes (first box of each; unparsable
  answers are counted, not scored)."""
  pairs, unparsed = [], 0
  for s in samples:
    try:
      predicted = boxes.parse(s['dialect'], s['prediction'], s['width'], s['height'])[0]
    except boxes.BoxParseError:
      unparsed += 1
      continue
    pairs.append([(b.x1, b.y1, b.x2, b.y2) for b in (predicted, _reference_box(s))])
  out = {'answers': len(pairs), 'unparsed': unparsed}
  if not pairs:
    return out
  predicted, reference = np.moveaxis(np.array(pairs, float), 1, 0)   # each [n, 4]
  def centre(b):
    return (b[:, :2] + b[:, 2:]) / 2
  def size(b):
    return b[:, 2:] - b[:, :2]
  for name, of in (('centre', centre), ('size', size)):
    p, r = of(predicted), of(reference)
    out[f'{name} corr'] = {a: _corr(p[:, i], r[:, i]) for i, a in enumerate('xy')}
  error = np.abs(centre(predicted) - centre(reference)).max(axis=1)   # the worse axis
  out['median centre error (pixels)'] = float(np.median(error))
  out['distinct boxes'] = len({tuple(b) for b in predicted.tolist()})
  return out


def define_flags():
  """The command's flags (defined only when run as a script: tests import several tools)."""
  flags.DEFINE_string('workdir', None, 'A workdir with an evaluation.', required=True)
  flags.DEFINE_integer('step', None, 'Evaluation step; default the latest.')
  flags.DEFINE_string('out', '', 'Also write the figures as JSON here.')


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}')
  config = workdir_lib.read_config(FLAGS.workdir)
  step = FLAGS.step if FLAGS.step is not None else workdir_lib.latest_eval_step(FLAGS.workdir)
  if step is None:
    raise ValueError(f'{FLAGS.workdir}: no finished evaluation under eval/')
  v = config.model.vision
  grid = config.data.synthetic.image_size / v.image_size * v.patch_size
  samples = grounding_samples(workdir_lib.eval_dir(FLAGS.workdir, step) / 'answers.jsonl')
  result = {'workdir': str(FLAGS.workdir), 'step': step, 'questions': len(samples),
            'grid_pixels': grid, 'acc@0.5': ceiling(samples, grid),
            'reading': reading(samples)}
  print(json.dumps(result, indent=1))
  if FLAGS.out:
    with open(FLAGS.out, 'w') as f:
      json.dump(result, f, indent=1)


if __name__ == '__main__':
  define_flags()
  sys.exit(app.run(main))
