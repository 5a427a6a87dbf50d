"""The evaluator registry: one Evaluator per task of tasks.TASKS, and the per-granularity report.

An evaluator scores a list of samples, one per question, each a dict:

  question_id     str or int; copied into the per-sample results (defaults to the list index)
  prediction      str: the model's generated answer
  references      list: the accepted answers, any one of which counts. Text for every task; for
                  grounding each item is one alternative: answer text in the sample's dialect
                  (may hold several boxes), or pixel boxes ([x1, y1, x2, y2], a list of them,
                  a [N, 4] array, boxes.Box)
  granularity     'global' | 'local' | 'mixed' (tasks.GRANULARITIES); default: the task's own
                  (tasks.TASK_GRANULARITY)
  question_type   VQA only: the bucket of per-type accuracy ('presence', 'comparison',
                  'rural_urban', any other name gets its own bucket); default 'untyped'
  width, height   grounding: the original image size in pixels
  dialect         grounding: the box dialect of the prediction (boxes.DIALECTS)
  pad_to_square   grounding: the model saw the image padded to a square (default False)
  reference_boxes grounding, optional: [N, 4] pixel boxes (e.g. Record.boxes) that together are
                  the one reference; used instead of `references` when given
  reference_dialect, reference_pad_to_square
                  grounding, optional: how to read reference texts; default the prediction's

`Evaluator.score(samples)` returns the task's metrics (see metrics.py) plus 'n' and 'per_sample',
a list in sample order of {'question_id', 'correct', ...}. Reference data that cannot be read
(an unparsable reference box or count, no references) raises ValueError naming the question:
only predictions may fail softly.

`granularity_report` runs every task's evaluator on all its samples and on each granularity's
share, into one JSON-serialisable dict (MGRS-Bench style). Corpus metrics (BLEU, CIDEr) of a
share are computed on that share alone, as a separate benchmark would be.
"""
from typing import Dict, List, Mapping, Optional, Sequence

from skymoe_jax import registry
from skymoe_jax.data import tasks
from skymoe_jax.evaluation import metrics


class Evaluator:
  """Scores a task's samples; subclasses fill `_score(samples) -> (metrics, per_sample)`."""
  task = ''
  headline = ''  # the metric a one-line summary of this task reports

  def score(self, samples: Sequence[Mapping]) -> Dict:
    samples = list(samples)
    result, rows = self._score(samples)
    rows = [{'question_id': s.get('question_id', i), **row}
            for i, (s, row) in enumerate(zip(samples, rows))]
    return {'n': len(samples), **result, 'per_sample': rows}

  def _score(self, samples: List[Mapping]):
    raise NotImplementedError

  def __repr__(self):
    return f'{type(self).__name__}(task={self.task!r})'


def _references(sample: Mapping, index: int) -> list:
  refs = sample.get('references')
  if isinstance(refs, str):
    refs = [refs]
  if not refs:
    raise ValueError(f'sample {sample.get("question_id", index)!r} has no references')
  return list(refs)


class SceneClassificationEvaluator(Evaluator):
  task = 'scene_classification'
  headline = 'accuracy'

  def _score(self, samples):
    correct = [metrics.scene_match(s['prediction'], _references(s, i))
               for i, s in enumerate(samples)]
    return {'accuracy': metrics.mean(correct)}, [{'correct': c} for c in correct]


class VQAEvaluator(Evaluator):
  task = 'vqa'
  headline = 'accuracy'

  def _score(self, samples):
    correct = [metrics.vqa_match(s['prediction'], _references(s, i))
               for i, s in enumerate(samples)]
    types = [s.get('question_type') or 'untyped' for s in samples]
    return (metrics.accuracy_by_type(correct, types),
            [{'correct': c, 'question_type': t} for c, t in zip(correct, types)])


class GroundingEvaluator(Evaluator):
  """Acc@T for each threshold (hit: IoU >= T; 'correct' uses the first), mean IoU, parse
  failures; see metrics.grounding_iou for how several boxes are scored."""
  task = 'grounding'
  headline = 'acc@0.5'

  def __init__(self, thresholds: Sequence[float] = (0.5, 0.25)):
    self.thresholds = tuple(thresholds)

  def _score(self, samples):
    ious, parsed = [], []
    for i, s in enumerate(samples):
      qid = s.get('question_id', i)
      try:
        width, height, dialect = s['width'], s['height'], s['dialect']
      except KeyError as e:
        raise ValueError(f'grounding sample {qid!r} lacks field {e}') from None
      pad = bool(s.get('pad_to_square', False))
      try:
        if s.get('reference_boxes') is not None:
          refs = [metrics.reference_boxes(s['reference_boxes'], dialect, width, height)]
        else:
          refs = [metrics.reference_boxes(
              r, s.get('reference_dialect', dialect), width, height,
              bool(s.get('reference_pad_to_square', pad))) for r in _references(s, i)]
      except ValueError as e:  # BoxParseError is a ValueError
        raise ValueError(f'grounding sample {qid!r}: unreadable reference: {e}') from None
      value, ok = metrics.grounding_iou(s['prediction'], refs, dialect, width, height, pad)
      ious.append(value)
      parsed.append(ok)
    per_sample = [{'correct': v >= self.thresholds[0], 'iou': v, 'parsed': p}
                  for v, p in zip(ious, parsed)]
    return metrics.grounding_summary(ious, parsed, self.thresholds), per_sample


class CaptioningEvaluator(Evaluator):
  """meteor: 'auto' | 'java' | 'exact' (metrics.py); per sample BLEU-4, METEOR, ROUGE-L, CIDEr."""
  task = 'captioning'
  headline = 'cider'

  def __init__(self, meteor: str = 'auto'):
    metrics.resolve_meteor(meteor)  # fail at construction on a bad choice
    self.meteor = meteor

  def _score(self, samples):
    refs = [_references(s, i) for i, s in enumerate(samples)]
    result = metrics.caption_scores([s['prediction'] for s in samples], refs, self.meteor)
    each = result.pop('per_caption')
    per_sample = [{k: each[k][i] for k in each} for i in range(len(samples))]
    return result, per_sample


class CountingEvaluator(Evaluator):
  """The reference count is the first reference's (metrics.parse_count)."""
  task = 'counting'
  headline = 'accuracy'

  def _score(self, samples):
    predicted, reference = [], []
    for i, s in enumerate(samples):
      ref = metrics.parse_count(_references(s, i)[0])
      if ref is None:
        raise ValueError(f'counting sample {s.get("question_id", i)!r}: no count in reference '
                         f'{_references(s, i)[0]!r}')
      reference.append(ref)
      predicted.append(metrics.parse_count(s['prediction']))
    per_sample = [{'correct': p == r, 'predicted_count': p, 'reference_count': r}
                  for p, r in zip(predicted, reference)]
    return metrics.counting_summary(predicted, reference), per_sample


EVALUATOR_CLASSES = {c.task: c for c in (
    SceneClassificationEvaluator, VQAEvaluator, GroundingEvaluator, CaptioningEvaluator,
    CountingEvaluator)}
assert set(EVALUATOR_CLASSES) == set(tasks.TASKS), 'the registry must cover tasks.TASKS'

# The registry with default options.
EVALUATORS: Dict[str, Evaluator] = {name: cls() for name, cls in EVALUATOR_CLASSES.items()}


def get_evaluator(task: str, **options) -> Evaluator:
  """The registered evaluator of `task`; options build a new one (e.g. meteor='exact')."""
  cls = registry.lookup(EVALUATOR_CLASSES, task, 'task', 'task')
  return cls(**options) if options else EVALUATORS[task]


def _granularity(sample: Mapping, task: str, index: int) -> str:
  g = sample.get('granularity') or tasks.TASK_GRANULARITY[task]
  if g not in tasks.GRANULARITIES:
    raise ValueError(f'{task} sample {sample.get("question_id", index)!r}: granularity {g!r} '
                     f'not in {tasks.GRANULARITIES}')
  return g


def granularity_report(samples_by_task: Mapping[str, Sequence[Mapping]],
                       evaluators: Optional[Mapping[str, Evaluator]] = None,
                       per_sample: bool = False) -> Dict:
  """{task: {'overall': metrics, 'by_granularity': {granularity: metrics}}} for each task given,
  granularities in tasks.GRANULARITIES order and only those present. `evaluators` overrides the
  registry per task; per-sample rows are kept (in 'overall' only) when `per_sample`."""
  report = {}
  for task, samples in samples_by_task.items():
    evaluator = (evaluators or {}).get(task) or get_evaluator(task)
    samples = list(samples)
    groups: Dict[str, list] = {}
    for i, s in enumerate(samples):
      groups.setdefault(_granularity(s, task, i), []).append(s)
    overall = evaluator.score(samples)
    if not per_sample:
      overall.pop('per_sample')
    by_granularity = {}
    for g in tasks.GRANULARITIES:
      if g in groups:
        share = evaluator.score(groups[g])
        share.pop('per_sample')
        by_granularity[g] = share
    report[task] = {'overall': overall, 'by_granularity': by_granularity}
  return report


# Tasks where one answer given to every question is a meaningful chance level; for grounding
# it is one box, the same place in every image, for captioning one caption (CIDEr-D rewards the
# n-grams it shares with the references: the most common caption is far from 0).
BASELINE_TASKS = ('scene_classification', 'vqa', 'counting', 'grounding', 'captioning')
BASELINE_CANDIDATES = 20   # the most frequent reference answers tried as the constant one
BOX_CANDIDATES = 200       # grounding: reference boxes tried, spread evenly over the samples


def _one_box_dialect(samples: Sequence[Mapping]) -> bool:
  """True when every grounding sample's prediction and text reference share one box dialect,
  so that a reference box, written as it is, is a valid answer to every question."""
  kinds = {(s.get('dialect'), s.get('reference_dialect', s.get('dialect')),
            s.get('reference_boxes') is None) for s in samples}
  return len(kinds) == 1 and all(d == r and text for d, r, text in kinds)


def constant_baseline(task: str, samples: Sequence[Mapping],
                      evaluator: Optional[Evaluator] = None) -> Optional[float]:
  """The best headline score that one fixed answer, given to every question, reaches: each of
  the BASELINE_CANDIDATES most frequent first references (grounding: BOX_CANDIDATES first
  references spread evenly over the samples, boxes being nearly all distinct) tried as the
  prediction and scored by the task's own evaluator (so its normalisation and matching apply).
  None when there are no samples or the task has no meaningful constant answer
  (BASELINE_TASKS)."""
  if task not in BASELINE_TASKS or not samples:
    return None
  if evaluator is None:
    # CIDEr-D, the captioning headline, does not depend on the METEOR implementation: the
    # in-process one spares a Java start per candidate.
    evaluator = get_evaluator(task, **({'meteor': 'exact'} if task == 'captioning' else {}))
  if task == 'grounding' and not _one_box_dialect(samples):
    return None
  counts: Dict[str, int] = {}
  for i, s in enumerate(samples):
    first = _references(s, i)[0]
    if isinstance(first, str):
      counts[first] = counts.get(first, 0) + 1
  if task == 'grounding':
    firsts = list(counts)   # first-seen order
    step = max(1, len(firsts) // BOX_CANDIDATES)
    candidates = firsts[::step][:BOX_CANDIDATES]
  else:
    candidates = sorted(counts, key=lambda a: (-counts[a], a))[:BASELINE_CANDIDATES]
  scores = [evaluator.score([dict(s, prediction=c) for s in samples])[evaluator.headline]
            for c in candidates]
  return max(scores) if scores else None

