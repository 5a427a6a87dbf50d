"""benchmarks/grounding_ceiling.py: the readers' boxes and scores, computed by hand."""
import json

import pytest

from benchmarks import grounding_ceiling
from skymoe_jax.data import boxes


def _approx(box):
  return pytest.approx((box.x1, box.y1, box.x2, box.y2))


def test_readers_move_a_box_as_documented():
  box = boxes.Box(10, 20, 41, 30)   # centre (25.5, 25), 31 x 10
  # 10 / 16 = 0.63 -> 1, 20 / 16 = 1.25 -> 1, 41 / 16 = 2.56 -> 3, 30 / 16 = 1.88 -> 2 patches.
  assert _approx(grounding_ceiling.patch_edges(box, 16, None)) == (16, 16, 48, 32)
  # The centre lies in the patch [16, 32) x [16, 32), whose centre is (24, 24).
  assert _approx(grounding_ceiling.centre_patch_true_size(box, 16, None)) == (8.5, 19, 39.5, 29)
  assert _approx(grounding_ceiling.true_centre_median_size(box, 16, (20, 20))) == (
      15.5, 15, 35.5, 35)


def test_ceiling_scores_the_readers_and_the_run(tmp_path):
  # Two questions on a 100-pixel image (geochat values are percent): box A is patch-aligned at
  # 10 pixels, box B's edges lie 4 pixels off the grid in every direction.
  rows = [{'question_id': 'a', 'task': 'grounding', 'answer': '{<10><10><30><30>}',
           'references': ['{<10><10><30><30>}'], 'width': 100, 'height': 100},
          {'question_id': 'b', 'task': 'grounding', 'answer': 'no box',
           'references': ['{<54><54><66><66>}'], 'width': 100, 'height': 100},
          {'question_id': 'c', 'task': 'counting', 'answer': '2', 'references': ['2'],
           'width': 100, 'height': 100}]
  path = tmp_path / 'answers.jsonl'
  path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
  samples = grounding_ceiling.grounding_samples(path)
  assert [s['question_id'] for s in samples] == ['a', 'b']
  result = grounding_ceiling.ceiling(samples, grid=10)
  # Patch edges: A exact; B becomes (50, 50, 70, 70), IoU 144 / 400 = 0.36 < 0.5.
  assert result['patch edges'] == 0.5
  # The run: A right, B unparsable.
  assert result['the run'] == 0.5
  # Centre patch: the centres (20, 20) and (60, 60) lie on patch corners and move to (25, 25)
  # and (65, 65): IoU 225 / 575 = 0.39 and 49 / 239 = 0.21, both misses.
  assert result['centre patch, true size'] == 0.0
  # Median size (20 + 12) / 2 = 16 at the true centres: IoU 256 / 400 and 144 / 256, both >= 0.5.
  assert result['true centre, median size'] == 1.0
  # One box for both: A's box scores A alone (IoU with B is 0), B's box B alone.
  assert result['best constant box'] == 0.5


def test_no_grounding_answers_is_an_error_naming_the_file(tmp_path):
  path = tmp_path / 'answers.jsonl'
  path.write_text(json.dumps({'task': 'counting', 'answer': '1', 'references': ['1']}) + '\n')
  with pytest.raises(ValueError, match='answers.jsonl: no grounding answers'):
    grounding_ceiling.grounding_samples(path)


def test_latest_eval_step_skips_unfinished_evaluations(tmp_path):
  from skymoe_jax import workdir as workdir_lib
  assert workdir_lib.latest_eval_step(tmp_path) is None
  for step, finished in ((100, True), (250, True), (300, False)):
    folder = tmp_path / 'eval' / str(step)
    folder.mkdir(parents=True)
    if finished:
      (folder / 'metrics.json').write_text('{}')
  assert workdir_lib.latest_eval_step(tmp_path) == 250


def test_reading_correlates_answer_boxes_with_references():
  # 100-pixel images: three answers moved 5 pixels right of their references (centres and sizes
  # follow exactly, r = 1) and one unparsable; then three copies of one stock box (r undefined).
  refs = ['{<10><10><20><30>}', '{<40><50><60><60>}', '{<70><20><90><50>}']
  moved = ['{<15><10><25><30>}', '{<45><50><65><60>}', '{<75><20><95><50>}']
  base = {'width': 100, 'height': 100, 'dialect': 'geochat'}
  samples = [dict(base, prediction=p, references=[r]) for p, r in zip(moved, refs)]
  samples.append(dict(base, prediction='somewhere', references=[refs[0]]))
  r = grounding_ceiling.reading(samples)
  assert (r['answers'], r['unparsed'], r['distinct boxes']) == (3, 1, 3)
  assert r['centre corr'] == pytest.approx({'x': 1.0, 'y': 1.0})
  assert r['size corr'] == pytest.approx({'x': 1.0, 'y': 1.0})
  assert r['median centre error (pixels)'] == pytest.approx(5.0)
  stock = grounding_ceiling.reading([dict(base, prediction=moved[0], references=[q])
                                     for q in refs])
  assert stock['centre corr'] == {'x': None, 'y': None} and stock['distinct boxes'] == 1
