"""The metrics of the five tasks and the evaluator registry against hand-worked values."""
import json
import math
import shutil

import numpy as np
import pytest

from skymoe_jax.data import tasks
from skymoe_jax.data.boxes import Box
from skymoe_jax.evaluation import evaluators as ev
from skymoe_jax.evaluation import metrics


def _sample(qid, prediction, references, **extra):
  return {'question_id': qid, 'prediction': prediction, 'references': references, **extra}


# ---------------------------------------------------------------------------- scene classification

def test_normalize_text():
  assert metrics.normalize_text('  Baseball_Diamond. ') == 'baseball diamond'
  assert metrics.normalize_text('Dense \t Residential..') == 'dense residential'
  assert metrics.normalize_text('. forest .') == 'forest'
  assert metrics.normalize_text('U.S. airport') == 'u.s. airport'  # inner periods stay


def test_scene_classification_accuracy():
  samples = [
      _sample('a', 'Baseball_Diamond.', ['baseball diamond']),    # right after normalising
      _sample('b', '  dense  residential', ['Dense_Residential']),  # right
      _sample('c', 'forest', ['river']),                            # wrong
      _sample('d', 'a river', ['river']),                           # wrong: exact match only
  ]
  out = ev.get_evaluator('scene_classification').score(samples)
  assert out['n'] == 4 and out['accuracy'] == pytest.approx(2 / 4)
  assert [r['correct'] for r in out['per_sample']] == [True, True, False, False]
  assert [r['question_id'] for r in out['per_sample']] == ['a', 'b', 'c', 'd']


# ---------------------------------------------------------------------------- VQA

def test_yes_no_normalisation():
  assert metrics.normalize_yes_no('Yes, there is a road.') == 'yes'
  assert metrics.normalize_yes_no('No.') == 'no'
  assert metrics.normalize_yes_no('Nope') == 'nope'
  assert metrics.normalize_yes_no('Rural.') == 'rural'


def test_vqa_accuracy_per_type_and_mean():
  samples = [
      _sample(1, 'Yes.', ['yes'], question_type='presence'),              # right
      _sample(2, 'no, there is none', ['yes'], question_type='presence'),  # wrong
      _sample(3, 'No', ['no'], question_type='comparison'),               # right
      _sample(4, 'Urban', ['urban'], question_type='rural_urban'),        # right
      _sample(5, 'rural', ['urban'], question_type='rural_urban'),        # wrong
      _sample(6, 'rural', ['urban'], question_type='rural_urban'),        # wrong
      _sample(7, '3', ['3'], question_type='count'),                      # right, own bucket
      _sample(8, 'green', ['red']),                                       # wrong, 'untyped'
  ]
  out = ev.get_evaluator('vqa').score(samples)
  # presence 1/2, comparison 1/1, rural_urban 1/3, count 1/1, untyped 0/1.
  per = out['per_type']
  assert list(per) == ['presence', 'comparison', 'rural_urban', 'count', 'untyped']
  assert per['presence'] == {'n': 2, 'accuracy': 0.5}
  assert per['rural_urban']['accuracy'] == pytest.approx(1 / 3)
  assert per['untyped'] == {'n': 1, 'accuracy': 0.0}
  # Mean of the type accuracies: (0.5 + 1 + 1/3 + 1 + 0) / 5 = 2.8333 / 5 = 0.56667.
  assert out['mean_type_accuracy'] == pytest.approx((0.5 + 1 + 1 / 3 + 1 + 0) / 5)
  assert out['accuracy'] == pytest.approx(4 / 8)
  assert out['per_sample'][6] == {'question_id': 7, 'correct': True, 'question_type': 'count'}


# ---------------------------------------------------------------------------- grounding

# The same pixel box written in every dialect. 200x100 image: geochat x/200*100, y/100*100;
# vhm *1000; lhrs /size. 999x999 (deepseek, /999) and 1024x1024 (paligemma, /1024, y first) images
# make the values the pixels themselves.
DIALECT_CASES = [
    ('geochat', '{<10><20><50><60>}', 200, 100, (20, 20, 100, 60)),
    ('geochat', 'It is {<10><20><50><60>|<30>}.', 200, 100, (20, 20, 100, 60)),
    ('vhm', '[100, 200, 500, 600]', 200, 100, (20, 20, 100, 60)),
    ('lhrs', 'at [0.10, 0.20, 0.50, 0.60]', 200, 100, (20, 20, 100, 60)),
    ('deepseek_vl2', '<|det|>[[111, 222, 333, 444]]<|/det|>', 999, 999, (111, 222, 333, 444)),
    ('paligemma', '<loc0222><loc0111><loc0444><loc0333>', 1024, 1024, (111, 222, 333, 444)),
]


@pytest.mark.parametrize('dialect,text,width,height,pixels', DIALECT_CASES)
def test_grounding_every_dialect(dialect, text, width, height, pixels):
  common = dict(width=width, height=height, dialect=dialect)
  samples = [
      # Reference as pixels, as text in the dialect, and as a [1, 4] array (reference_boxes).
      _sample('px', text, [list(pixels)], **common),
      _sample('txt', text, [text], **common),
      _sample('arr', text, ['ignored'], reference_boxes=np.array([pixels], np.float32), **common),
      # A box of another dialect does not parse: a miss and a parse failure.
      _sample('other', '(1, 2, 3, 4)', [list(pixels)], **common),
  ]
  out = ev.get_evaluator('grounding').score(samples)
  assert [r['iou'] for r in out['per_sample']] == pytest.approx([1, 1, 1, 0])
  assert [r['parsed'] for r in out['per_sample']] == [True, True, True, False]
  assert out['acc@0.5'] == out['acc@0.25'] == pytest.approx(3 / 4)
  assert out['parse_failures'] == 1 and out['parse_failure_rate'] == pytest.approx(1 / 4)


def test_grounding_metrics_hand_worked():
  # Reference (20, 20, 100, 60) on a 200x100 image: area 80*40 = 3200.
  common = dict(width=200, height=100, dialect='geochat')
  ref = [[20, 20, 100, 60]]
  samples = [
      _sample(0, '{<10><20><50><60>}', ref, **common),  # the box itself: IoU 1
      # (60, 20, 140, 60): overlap 40*40 = 1600, union 3200 + 3200 - 1600 = 4800 -> IoU 1/3:
      # a hit at 0.25, a miss at 0.5.
      _sample(1, '{<30><20><70><60>}', ref, **common),
      _sample(2, '{<50><20><10><60>}', ref, **common),  # malformed (x2 < x1): parse failure
      _sample(3, 'I cannot find it.', ref, **common),   # no box: parse failure
      _sample(4, '{<0><0><5><5>}', ref, **common),      # (0, 0, 10, 5): no overlap, IoU 0
  ]
  out = ev.get_evaluator('grounding').score(samples)
  assert [r['iou'] for r in out['per_sample']] == pytest.approx([1, 1 / 3, 0, 0, 0])
  assert [r['correct'] for r in out['per_sample']] == [True, False, False, False, False]
  assert out['acc@0.5'] == pytest.approx(1 / 5)
  assert out['acc@0.25'] == pytest.approx(2 / 5)
  assert out['miou'] == pytest.approx((1 + 1 / 3) / 5)
  assert out['parse_failures'] == 2 and out['parse_failure_rate'] == pytest.approx(2 / 5)
  # Other thresholds name their own keys.
  out = ev.get_evaluator('grounding', thresholds=(0.3,)).score(samples)
  assert out['acc@0.3'] == pytest.approx(2 / 5) and 'acc@0.5' not in out


def test_grounding_pad_to_square():
  # 200x100 image padded to 200x200 (50 px above and below): {<10><30><50><60>} is
  # x = 0.1*200 = 20 .. 0.5*200 = 100, y = 0.3*200 - 50 = 10 .. 0.6*200 - 50 = 70.
  common = dict(width=200, height=100, dialect='geochat')
  text = '{<10><30><50><60>}'
  padded = ev.get_evaluator('grounding').score([
      _sample(0, text, [[20, 10, 100, 70]], pad_to_square=True, **common),
      # A reference text is read with the same flag: the same text matches itself.
      _sample(1, text, [text], pad_to_square=True, **common),
  ])
  assert [r['iou'] for r in padded['per_sample']] == pytest.approx([1, 1])
  # Read without padding the box is y 30..60: overlap 80*30 = 2400 over union 80*60 = 4800.
  plain = ev.get_evaluator('grounding').score(
      [_sample(0, text, [[20, 10, 100, 70]], **common)])
  assert plain['per_sample'][0]['iou'] == pytest.approx(0.5)
  # A reference written without padding for a model that saw a padded image.
  mixed = ev.get_evaluator('grounding').score([_sample(
      0, text, ['{<10><10><50><70>}'], pad_to_square=True, reference_pad_to_square=False,
      **common)])
  assert mixed['per_sample'][0]['iou'] == pytest.approx(1)


def test_grounding_several_boxes_and_alternatives():
  a, b = Box(0, 0, 10, 10), Box(20, 20, 30, 30)
  assert metrics.matched_iou([a, b], [b, a]) == pytest.approx(1)    # order does not matter
  assert metrics.matched_iou([a], [a, b]) == pytest.approx(1 / 2)   # a missing box: (1 + 0) / 2
  assert metrics.matched_iou([a, b, Box(50, 50, 60, 60)], [a, b]) == pytest.approx(2 / 3)
  assert metrics.matched_iou([], [a]) == 0.0
  common = dict(width=100, height=100, dialect='vhm')
  samples = [
      # Two boxes in one reference text; the prediction has both, in the other order.
      _sample(0, '[200, 200, 300, 300], [0, 0, 100, 100]',
              ['[0, 0, 100, 100], [200, 200, 300, 300]'], **common),
      # Two alternatives: the best one counts.
      _sample(1, '[200, 200, 300, 300]', [[0, 0, 10, 10], [20, 20, 30, 30]], **common),
  ]
  out = ev.get_evaluator('grounding').score(samples)
  assert [r['iou'] for r in out['per_sample']] == pytest.approx([1, 1])


def test_grounding_bad_reference_raises():
  with pytest.raises(ValueError, match="sample 'q7'"):
    ev.get_evaluator('grounding').score([_sample(
        'q7', '{<0><0><5><5>}', ['no box here'], width=10, height=10, dialect='geochat')])
  with pytest.raises(ValueError, match='lacks field'):
    ev.get_evaluator('grounding').score([_sample('q8', '{<0><0><5><5>}', [[0, 0, 1, 1]])])


# ---------------------------------------------------------------------------- captioning

def test_tokenize():
  assert metrics.tokenize("A plane's parked, near the run-way (2.5 km).") == (
      "a plane 's parked near the run-way 2.5 km")
  assert metrics.tokenize("Don't  stop!") == "do n't stop"


def _captions(**kw):
  return metrics.caption_scores(meteor='exact', **kw)


def test_bleu_two_sentences():
  # S1 'the cat sat on the mat' (6 words) vs 'the cat is on the mat' (6) and
  #    'there is a cat on the mat' (7):
  #    unigrams: the x2 (ref max 2), cat, on, mat match, sat does not -> 5/6
  #    bigrams: the cat, on the, the mat -> 3/5; trigrams: on the mat -> 1/4; 4-grams: 0/3.
  #    Closest reference length: 6.
  # S2 'a plane is parked' (4) vs 'a plane is parked on the apron' (7): 4/4, 3/3, 2/2, 1/1.
  # Corpus: p1 = 9/10, p2 = 6/8, p3 = 3/6, p4 = 1/4; length 10 against 6 + 7 = 13, so the
  # brevity penalty is exp(1 - 13/10) = exp(-0.3).
  out = _captions(predictions=['the cat sat on the mat', 'A plane is parked.'],
                  references=[['the cat is on the mat', 'there is a cat on the mat'],
                              ['a plane is parked on the apron']])
  bp = math.exp(-0.3)
  p = [9 / 10, 6 / 8, 3 / 6, 1 / 4]
  assert out['bleu_1'] == pytest.approx(p[0] * bp)                                  # 0.66674
  assert out['bleu_2'] == pytest.approx((p[0] * p[1]) ** (1 / 2) * bp)              # 0.60864
  assert out['bleu_3'] == pytest.approx((p[0] * p[1] * p[2]) ** (1 / 3) * bp)       # 0.51579
  assert out['bleu_4'] == pytest.approx((p[0] * p[1] * p[2] * p[3]) ** (1 / 4) * bp)  # 0.39927


def test_rouge_l():
  # 'the cat sat on the mat' (6) vs 'the cat is on the mat today' (7): LCS 'the cat on the mat'
  # = 5, P = 5/6, R = 5/7; vs 'a cat on a mat' (5): LCS 'cat on mat' = 3, P = 3/6, R = 3/5.
  # Best P = 5/6, best R = 5/7; F = (1 + 1.2^2) P R / (R + 1.2^2 P)
  #   = 2.44 * 0.59524 / (0.71429 + 1.2) = 0.75871.
  out = _captions(predictions=['the cat sat on the mat'],
                  references=[['the cat is on the mat today', 'a cat on a mat']])
  p, r = 5 / 6, 5 / 7
  assert out['rouge_l'] == pytest.approx(2.44 * p * r / (r + 1.44 * p))
  # pycocoevalcap takes the best P and the best R separately, possibly from different
  # references: 'cat on mat' (3) has R = 3/3 = 1, so F uses P = 5/6 and R = 1:
  # 2.44 * 5/6 / (1 + 1.44 * 5/6) = 2.0333 / 2.2 = 0.92424.
  out = _captions(predictions=['the cat sat on the mat'],
                  references=[['the cat is on the mat today', 'cat on mat']])
  assert out['rouge_l'] == pytest.approx(2.44 * p / (1 + 1.44 * p))


def test_cider_d_tiny_corpus():
  # Two images with one reference each, 'a b' and 'c d'. Every n-gram of the references is in
  # one of the 2 documents: weight L = tf * (log 2 - log 1) = log 2 (an n-gram in no reference:
  # log 2 - log max(1, 0) = log 2 too); L cancels in every cosine. n = 1..4,
  # score = 10 * mean_n(cos_n) / #refs, times exp(-delta^2 / 72) for a length difference delta.
  #   'a b' vs 'a b': unigram and bigram cosines 1, no 3- or 4-grams: 10 * (1 + 1 + 0 + 0) / 4 = 5.
  #   'a x' vs 'a b': unigrams {a, x} . {a, b} = L^2 over (sqrt2 L)^2 -> 1/2; bigram 'a x' -> 0:
  #   10 * 0.5 / 4 = 1.25.
  out = _captions(predictions=['a b', 'c d'], references=[['a b'], ['c d']])
  assert out['per_caption']['cider'] == pytest.approx([5, 5])
  assert out['cider'] == pytest.approx(5)
  out = _captions(predictions=['a x', 'c d'], references=[['a b'], ['c d']])
  assert out['per_caption']['cider'] == pytest.approx([1.25, 5])
  assert out['cider'] == pytest.approx(3.125)
  # 'a b c' vs 'a b': unigrams 2 L^2 / (sqrt3 L sqrt2 L) = 2/sqrt6; bigrams {ab, bc} . {ab} =
  # L^2 / (sqrt2 L * L) = 1/sqrt2; one word longer: exp(-1/72).
  out = _captions(predictions=['a b c', 'c d'], references=[['a b'], ['c d']])
  want = 10 * (2 / math.sqrt(6) + 1 / math.sqrt(2)) / 4 * math.exp(-1 / 72)  # 3.7553
  assert out['per_caption']['cider'][0] == pytest.approx(want)
  # Clipping (the D of CIDEr-D): 'a a' vs 'a b': min(2L, L) * L / (2L * sqrt2 L) = 1/(2 sqrt2).
  out = _captions(predictions=['a a', 'c d'], references=[['a b'], ['c d']])
  assert out['per_caption']['cider'][0] == pytest.approx(10 * (1 / (2 * math.sqrt(2))) / 4)


def test_meteor_exact_hand_worked():
  # 'the cat sat on the mat' vs 'on the mat sat the cat': 6 matches, P = R = 1, Fmean = 1;
  # chunks [the cat] [sat] [on the mat] = 3, penalty 0.5 * (3/6)^3 = 0.0625 -> 0.9375.
  assert metrics.meteor_exact_sentence('the cat sat on the mat', ['on the mat sat the cat']) == (
      pytest.approx(0.9375))
  # 'a plane on the runway' (5) vs 'a white plane is parked on the runway' (8): 5 matches,
  # P = 1, R = 5/8; Fmean = P R / (0.9 P + 0.1 R) = 0.625 / 0.9625 = 0.64935; chunks [a] [plane]
  # [on the runway] = 3, penalty 0.5 * (3/5)^3 = 0.108 -> 0.64935 * 0.892 = 0.57922.
  # The best over the references: an unrelated one scores 0.
  want = (0.625 / 0.9625) * (1 - 0.5 * 0.6 ** 3)
  got = metrics.meteor_exact_sentence('a plane on the runway',
                                      ['many cars', 'a white plane is parked on the runway'])
  assert got == pytest.approx(want)
  assert metrics.meteor_exact_sentence('x y', ['a b']) == 0.0
  # One chunk of 4: penalty 0.5 * (1/4)^3 = 0.0078125.
  assert metrics.meteor_exact_sentence('a b c d', ['a b c d']) == pytest.approx(1 - 0.0078125)
  # The corpus score is the mean over captions; the result names the implementation.
  out = _captions(predictions=['the cat sat on the mat', 'x y'],
                  references=[['on the mat sat the cat'], ['a b']])
  assert out['meteor'] == pytest.approx(0.9375 / 2)
  assert out['meteor_impl'] == 'meteor-exact-match'
  assert out['per_caption']['meteor'] == pytest.approx([0.9375, 0])


@pytest.mark.slow  # ~10-30 s: the JVM loads METEOR's paraphrase table
@pytest.mark.skipif(shutil.which('java') is None, reason='METEOR 1.5 needs java')
def test_meteor_java_offline():
  # METEOR 1.5 (jar inside pycocoevalcap, no network): an identical caption scores 1, a caption
  # sharing no word 0, a partial one in between.
  out = metrics.caption_scores(
      ['a plane is parked at the airport', 'green trees', 'many cars in a lot'],
      [['a plane is parked at the airport'], ['a white ship'],
       ['many cars are parked in a parking lot']], meteor='java')
  assert out['meteor_impl'] == 'meteor-1.5-java'
  each = out['per_caption']['meteor']
  assert each[0] == pytest.approx(1.0) and each[1] == pytest.approx(0.0)
  assert 0.2 < each[2] < 1.0
  assert 0 < out['meteor'] < 1
  assert metrics.resolve_meteor('auto') == 'java'


def test_captioning_evaluator():
  samples = [_sample('c1', 'a b', ['a b', 'a b c']), _sample('c2', 'c d', ['c d'])]
  out = ev.get_evaluator('captioning', meteor='exact').score(samples)
  assert out['n'] == 2 and out['bleu_1'] == pytest.approx(1)
  assert set(out['per_sample'][0]) == {'question_id', 'bleu_4', 'meteor', 'rouge_l', 'cider'}
  with pytest.raises(ValueError, match='meteor'):
    ev.get_evaluator('captioning', meteor='wordnet')


# ---------------------------------------------------------------------------- counting

@pytest.mark.parametrize('text,want', [
    ('3', 3), ('There are 12 planes.', 12), ('1,234 cars', 1234), ('2.5', 2),
    ('Three ships.', 3), ('TWENTY', 20), ('seventeen or 18', 17), ('none', 0),
    ('There are no ships in the image.', 0), ('twenty-one', 20),
    ('I cannot tell', None), ('someone often', None), ('', None), (7, 7),
])
def test_parse_count(text, want):
  assert metrics.parse_count(text) == want


@pytest.mark.parametrize('count,bin_', [
    (0, '0'), (1, '(0,2]'), (2, '(0,2]'), (3, '(2,6]'), (6, '(2,6]'), (7, '(6,12]'),
    (12, '(6,12]'), (13, '>12'), (400, '>12'),
])
def test_count_bins(count, bin_):
  assert metrics.count_bin(count) == bin_


def test_counting_evaluator():
  samples = [
      _sample(0, '0', ['0']),                     # right, bin '0'
      _sample(1, 'two', ['2']),                   # right, (0,2]
      _sample(2, 'There are 4 cars.', ['5']),     # wrong by 1, (2,6]
      _sample(3, "I don't know", ['10']),         # unparsable: wrong, out of the MAE, (6,12]
      _sample(4, '15.', ['fifteen']),             # right, >12
  ]
  out = ev.get_evaluator('counting').score(samples)
  assert out['accuracy'] == pytest.approx(3 / 5)
  # MAE over the 4 parsed: (0 + 0 + 1 + 0) / 4 = 0.25.
  assert out['mae'] == pytest.approx(0.25) and out['mae_n'] == 4 and out['unparsable'] == 1
  assert out['bias'] == pytest.approx(-0.25)   # (0 + 0 - 1 + 0) / 4: 4 for 5 undercounts
  assert out['per_bin'] == {'0': {'n': 1, 'accuracy': 1.0}, '(0,2]': {'n': 1, 'accuracy': 1.0},
                            '(2,6]': {'n': 1, 'accuracy': 0.0},
                            '(6,12]': {'n': 1, 'accuracy': 0.0}, '>12': {'n': 1, 'accuracy': 1.0}}
  assert out['per_sample'][3] == {'question_id': 3, 'correct': False, 'predicted_count': None,
                                  'reference_count': 10}
  # An empty bin is reported with accuracy None; a reference without a count is a data error.
  out = ev.get_evaluator('counting').score([_sample(0, '1', ['1'])])
  assert out['per_bin']['>12'] == {'n': 0, 'accuracy': None}
  with pytest.raises(ValueError, match='no count in reference'):
    ev.get_evaluator('counting').score([_sample('z', '1', ['many'])])


# ---------------------------------------------------------------------------- registry, report

def test_registry():
  assert set(ev.EVALUATORS) == set(tasks.TASKS)
  for name, evaluator in ev.EVALUATORS.items():
    assert evaluator.task == name and ev.get_evaluator(name) is evaluator
  with pytest.raises(KeyError, match='known tasks.*captioning.*counting'):
    ev.get_evaluator('segmentation')
  assert ev.get_evaluator('vqa').score([]) == {
      'n': 0, 'accuracy': None, 'mean_type_accuracy': None, 'per_type': {}, 'per_sample': []}


def test_granularity_report():
  geo = dict(width=100, height=100, dialect='vhm')
  samples = {
      'scene_classification': [
          _sample(0, 'forest', ['forest'], granularity='global'),
          _sample(1, 'river', ['lake']),  # no granularity: the task's own, global
      ],
      'vqa': [
          _sample(0, 'red', ['red'], granularity='local', question_type='color'),
          _sample(1, 'blue', ['red'], granularity='local', question_type='color'),
          _sample(2, 'yes', ['yes'], granularity='mixed', question_type='presence'),
          _sample(3, 'no', ['no'], granularity='mixed', question_type='comparison'),
      ],
      'grounding': [
          _sample(0, '[0, 0, 500, 500]', [[0, 0, 50, 50]], granularity='local', **geo),
          _sample(1, 'nowhere', [[0, 0, 50, 50]], granularity='local', **geo),
      ],
      'counting': [_sample(0, '3', ['3'], granularity='local')],
      'captioning': [_sample(0, 'a b', ['a b'], granularity='global'),
                     _sample(1, 'c d', ['c d'], granularity='global')],
  }
  report = ev.granularity_report(
      samples, evaluators={'captioning': ev.get_evaluator('captioning', meteor='exact')})
  json.dumps(report)  # serialisable as it is
  assert list(report) == list(samples)
  sc = report['scene_classification']
  assert sc['overall']['accuracy'] == 0.5 and list(sc['by_granularity']) == ['global']
  assert 'per_sample' not in sc['overall']
  vqa = report['vqa']
  assert list(vqa['by_granularity']) == ['local', 'mixed']
  # Overall 3/4; types color 1/2, presence 1, comparison 1 -> mean (0.5 + 1 + 1) / 3.
  assert vqa['overall']['accuracy'] == 0.75
  assert vqa['overall']['mean_type_accuracy'] == pytest.approx(2.5 / 3)
  assert vqa['by_granularity']['local'] == {
      'n': 2, 'accuracy': 0.5, 'mean_type_accuracy': 0.5,
      'per_type': {'color': {'n': 2, 'accuracy': 0.5}}}
  assert vqa['by_granularity']['mixed']['accuracy'] == 1.0
  g = report['grounding']['by_granularity']['local']
  assert g['acc@0.5'] == 0.5 and g['parse_failure_rate'] == 0.5 and g['miou'] == 0.5
  assert report['counting']['overall']['accuracy'] == 1.0
  cap = report['captioning']['by_granularity']['global']
  assert cap['cider'] == pytest.approx(5) and cap['meteor_impl'] == 'meteor-exact-match'
  # per_sample keeps the rows of the overall scores.
  full = ev.granularity_report({'vqa': samples['vqa']}, per_sample=True)
  assert [r['correct'] for r in full['vqa']['overall']['per_sample']] == [True, False, True, True]
  assert 'per_sample' not in full['vqa']['by_granularity']['local']
  with pytest.raises(ValueError, match="granularity 'regional'"):
    ev.granularity_report({'vqa': [_sample(0, 'a', ['a'], granularity='regional')]})
  with pytest.raises(KeyError, match='unknown task'):
    ev.granularity_report({'detection': []})


def test_constant_baseline_is_the_best_single_answer():
  # Hand-computed: '3' is right for 2 of 4 counting questions; 'yes' for 3 of 5 VQA ones
  # (the evaluator's normalisation makes 'Yes' match).
  count = [{'prediction': '', 'references': [r]} for r in ('3', '3', '2', '0')]
  assert ev.constant_baseline('counting', count) == 0.5
  vqa = [{'prediction': '', 'references': [r]} for r in ('yes', 'Yes', 'no', 'red', 'yes')]
  assert ev.constant_baseline('vqa', vqa) == 0.6
  # Grounding: one box for every image. Of these four references (100 x 100 images) the first
  # two overlap with IoU 8100 / 10000 = 0.81 and the last two overlap nothing else: the best
  # constant box hits 2 of 4.
  boxes = ('{<0><0><90><90>}', '{<0><0><100><100>}', '{<50><50><60><60>}', '{<0><80><10><90>}')
  ground = [{'prediction': '', 'references': [b], 'width': 100, 'height': 100,
             'dialect': 'geochat'} for b in boxes]
  assert ev.constant_baseline('grounding', ground) == 0.5
  # Boxes given as numbers, or references in another dialect: no single text answers them all.
  assert ev.constant_baseline('grounding', [dict(ground[0], reference_dialect='vhm')]) is None
  assert ev.constant_baseline('grounding', [dict(ground[0], reference_boxes=[[0, 0, 9, 9]])]
                              ) is None
  assert ev.constant_baseline('counting', []) is None


def test_constant_caption_baseline_is_hand_computed_cider_d():
  # Four captions, one reference each: three 'a big red car', one 'two small green ships'. A
  # hypothesis equal to its 4-word reference has cosine 1 at each n-gram order 1-4 and no length
  # penalty, so CIDEr-D scores it 10; one sharing no n-gram scores 0. The constant 'a big red
  # car' is right for 3 of 4 (mean 7.5), 'two small green ships' for 1 of 4 (2.5).
  refs = ('a big red car', 'a big red car', 'two small green ships', 'a big red car')
  caps = [{'prediction': '', 'references': [r]} for r in refs]
  assert ev.constant_baseline('captioning', caps) == pytest.approx(7.5)
