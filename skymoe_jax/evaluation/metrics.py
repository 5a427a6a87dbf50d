"""The metrics of the five RS tasks as plain functions on strings, numbers and boxes (no JAX).

Every score is a Python float (JSON-ready). Accuracies, BLEU, METEOR and ROUGE-L are fractions in
[0, 1] (published tables print them x100); CIDEr keeps its usual 0-10 scale.

Scene classification and VQA compare normalised text exactly: lower-case, '_' read as a space,
inner whitespace collapsed, surrounding spaces and periods stripped. VQA also reads an answer
whose first word is 'yes' or 'no' ('Yes, there is a road.') as just that word.

Grounding: `grounding_iou` parses the predicted box(es) with the sample's dialect (boxes.try_parse,
pixels of the original image, pad-to-square undone) and scores them against each reference
alternative; a prediction that does not parse scores IoU 0 and counts as a parse failure. With
several boxes on either side the boxes are paired one-to-one, greedily by descending IoU, and the
score is the sum of the paired IoUs over max(#predicted, #reference): one box against one box is
plain IoU, and extra or missing boxes cost their share (a guessed second box halves the score).

Captioning: BLEU-1..4 (corpus level, closest reference length), ROUGE-L (beta 1.2) and CIDEr-D
(sigma 6, clipped, IDF from the references of the scored set) are pycocoevalcap 1.2's scorers,
the code behind the published COCO-style numbers. Text goes through `tokenize`, a pure-Python
stand-in for the COCO PTB tokenizer (lower-case, punctuation dropped, "'s"/"n't" split off) so no
Java runs for it. METEOR has two implementations, and every result names the one used:
  'java'  pycocoevalcap's METEOR 1.5 jar (exact + stem + synonym + paraphrase matches, tuned
          weights): what papers report. Needs `java`; runs offline, one JVM kept per process
          (~10 s to start: it loads the paraphrase table).
  'exact' METEOR as first published (Banerjee & Lavie 2005) with exact unigram matches only:
          Fmean = P*R / (alpha*P + (1-alpha)*R) with alpha 0.9, penalty 0.5*(chunks/matches)^3,
          score Fmean*(1-penalty), the best over the references, averaged over captions. Lower
          than 'java' (no stems/synonyms), so never compare numbers across the two.
  'auto'  'java' where `java` is on PATH, else 'exact'.

Counting reads the first integer ('12', '1,234'; '2.5' reads as 2) or number word ('zero' ..
'twenty', and 'none'/'no' as 0: 'There are no ships.') in the text, whole words only;
'twenty-one' reads as 20. Counts are binned by the reference count: '0', '(0,2]', '(2,6]',
'(6,12]', '>12'.
"""
import re
import shutil
import threading
from typing import Dict, List, Optional, Sequence, Tuple, Union

from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.rouge.rouge import Rouge

from skymoe_jax.data import boxes as boxes_lib
from skymoe_jax.data.boxes import Box


def mean(values: Sequence[float]) -> Optional[float]:
  """The mean as a float, None for no values (a JSON null in reports)."""
  return float(sum(values)) / len(values) if values else None


# ---------------------------------------------------------------------------- classification, VQA

def normalize_text(text: str) -> str:
  """Lower-case, '_' -> ' ', collapse whitespace, strip surrounding spaces and periods."""
  text = ' '.join(str(text).lower().replace('_', ' ').split())
  return ' '.join(text.strip(' .').split())


def normalize_yes_no(text: str) -> str:
  """`normalize_text`, then an answer whose first word is yes/no becomes just that word."""
  text = normalize_text(text)
  first = text.split(' ', 1)[0].rstrip(',;:!')
  return first if first in ('yes', 'no') else text


def scene_match(prediction: str, references: Sequence[str]) -> bool:
  """Scene classification: the normalised prediction equals a normalised reference."""
  return normalize_text(prediction) in {normalize_text(r) for r in references}


def vqa_match(prediction: str, references: Sequence[str]) -> bool:
  """VQA: as `scene_match`, with yes/no answers reduced to the word."""
  return normalize_yes_no(prediction) in {normalize_yes_no(r) for r in references}


# RSVQA-LR's types, listed first in reports; any other type gets its own bucket after them.
RSVQA_LR_TYPES = ('presence', 'comparison', 'rural_urban')


def accuracy_by_type(correct: Sequence[bool], question_types: Sequence[str]) -> Dict:
  """{'accuracy' (all questions), 'mean_type_accuracy' (mean of the per-type accuracies),
  'per_type': {type: {'n', 'accuracy'}}}; known RSVQA-LR types first, others sorted."""
  buckets: Dict[str, List[bool]] = {}
  for ok, qtype in zip(correct, question_types):
    buckets.setdefault(qtype, []).append(bool(ok))
  order = [t for t in RSVQA_LR_TYPES if t in buckets]
  order += sorted(t for t in buckets if t not in RSVQA_LR_TYPES)
  per_type = {t: {'n': len(buckets[t]), 'accuracy': mean(buckets[t])} for t in order}
  return {'accuracy': mean([bool(c) for c in correct]),
          'mean_type_accuracy': mean([v['accuracy'] for v in per_type.values()]),
          'per_type': per_type}


# ---------------------------------------------------------------------------- grounding

def matched_iou(predicted: Sequence[Box], reference: Sequence[Box]) -> float:
  """Sum of one-to-one (greedy, by descending IoU) paired IoUs over max(#predicted, #reference)."""
  if not predicted or not reference:
    return 0.0
  pairs = sorted(((boxes_lib.iou(p, r), i, j) for i, p in enumerate(predicted)
                  for j, r in enumerate(reference)), key=lambda t: (-t[0], t[1], t[2]))
  used_p, used_r, total = set(), set(), 0.0
  for value, i, j in pairs:
    if i not in used_p and j not in used_r:
      used_p.add(i)
      used_r.add(j)
      total += value
  return total / max(len(predicted), len(reference))


def _as_boxes(value) -> List[Box]:
  """A Box, [x1, y1, x2, y2] in pixels, or a sequence / [N, 4] array of those -> [Box]."""
  if hasattr(value, 'tolist'):  # numpy arrays, without importing numpy here
    value = value.tolist()
  if isinstance(value, Box):
    return [value]
  value = list(value)
  if len(value) == 4 and all(isinstance(v, (int, float)) for v in value):
    return [Box(*(float(v) for v in value))]
  out = []
  for item in value:
    out.extend(_as_boxes(item))
  return out


def reference_boxes(reference: Union[str, Box, Sequence], dialect: str, width: float,
                    height: float, pad_to_square: bool = False) -> List[Box]:
  """One reference alternative as pixel boxes: answer text in `dialect` (may hold several
  boxes), a Box, [x1, y1, x2, y2] pixels, or a list / [N, 4] array of boxes. A reference text
  that does not parse is a data error and raises BoxParseError."""
  if isinstance(reference, str):
    return boxes_lib.parse(dialect, reference, width, height, pad_to_square)
  found = _as_boxes(reference)
  if not found:
    raise ValueError(f'reference {reference!r} holds no box')
  return found


def grounding_iou(prediction: str, references: Sequence[Sequence[Box]], dialect: str,
                  width: float, height: float, pad_to_square: bool = False
                  ) -> Tuple[float, bool]:
  """(score, parsed): the best `matched_iou` of the predicted boxes over the reference
  alternatives (each a list of pixel boxes); (0.0, False) when the prediction does not parse."""
  predicted = boxes_lib.try_parse(dialect, prediction, width, height, pad_to_square)
  if predicted is None:
    return 0.0, False
  return max(matched_iou(predicted, ref) for ref in references), True


def grounding_summary(ious: Sequence[float], parsed: Sequence[bool],
                      thresholds: Sequence[float] = (0.5, 0.25)) -> Dict:
  """{'acc@T' per threshold (IoU >= T), 'miou', 'parse_failures', 'parse_failure_rate'}; an
  unparsed prediction has IoU 0, so it is a miss at every threshold."""
  out = {f'acc@{t:g}': mean([v >= t for v in ious]) for t in thresholds}
  failures = sum(1 for p in parsed if not p)
  out.update(miou=mean(list(ious)), parse_failures=failures,
             parse_failure_rate=mean([not p for p in parsed]))
  return out


# ---------------------------------------------------------------------------- captioning

_CLITIC = re.compile(r"(n't|'s|'re|'ve|'ll|'d|'m)\b")
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|\d+(?:[.,]\d+)*|[^\W_]+(?:-[^\W_]+)*")


def tokenize(text: str) -> str:
  """Lower-cased tokens joined by single spaces, punctuation dropped, clitics split off
  ("it's" -> "it 's", "don't" -> "do n't"), hyphenated words and decimals kept whole."""
  text = _CLITIC.sub(r' \1', str(text).lower())
  return ' '.join(_TOKEN.findall(text))


def _common_run(hyp: Sequence[str], ref: Sequence[str], i: int, j: int, used: set) -> int:
  """How many words hyp[i:] and ref[j:] share in a row, over unused ref words."""
  k = 0
  while (i + k < len(hyp) and j + k < len(ref) and hyp[i + k] == ref[j + k]
         and j + k not in used):
    k += 1
  return k


def _meteor_alignment_chunks(hyp: Sequence[str], ref: Sequence[str]) -> Tuple[int, int]:
  """(matches, chunks) of an exact unigram alignment of hyp to ref.

  Every hyp word with an unused equal ref word is matched, so the match count is the maximum.
  Which occurrence a word takes only changes the chunk count: prefer the one right after the
  previous match (extends the chunk), else the one that starts the longest common run."""
  used, matches, chunks, last = set(), 0, 0, None
  for i, word in enumerate(hyp):
    free = [j for j, r in enumerate(ref) if r == word and j not in used]
    if not free:
      last = None
      continue
    if last is not None and last + 1 in free:
      j = last + 1
    else:
      j = max((_common_run(hyp, ref, i, j, used), -j, j) for j in free)[2]  # ties: leftmost
      chunks += 1
    used.add(j)
    matches += 1
    last = j
  return matches, chunks


def meteor_exact_sentence(hypothesis: str, references: Sequence[str], alpha: float = 0.9,
                          gamma: float = 0.5, beta: float = 3.0) -> float:
  """Exact-match METEOR of one tokenised caption: the best over its tokenised references."""
  hyp = hypothesis.split()
  best = 0.0
  for reference in references:
    ref = reference.split()
    m, chunks = _meteor_alignment_chunks(hyp, ref)
    if m == 0:
      continue
    p, r = m / len(hyp), m / len(ref)
    fmean = p * r / (alpha * p + (1 - alpha) * r)
    best = max(best, fmean * (1 - gamma * (chunks / m) ** beta))
  return best


_JAVA_METEOR = None
_JAVA_METEOR_LOCK = threading.Lock()


def _java_meteor():
  """The process's one METEOR 1.5 JVM, started on first use."""
  global _JAVA_METEOR
  with _JAVA_METEOR_LOCK:
    if _JAVA_METEOR is None:
      from pycocoevalcap.meteor.meteor import Meteor  # pylint: disable=import-outside-toplevel
      _JAVA_METEOR = Meteor()
    return _JAVA_METEOR


METEOR_IMPLS = {'java': 'meteor-1.5-java', 'exact': 'meteor-exact-match'}


def resolve_meteor(meteor: str) -> str:
  """'java' | 'exact' for a requested 'java' | 'exact' | 'auto'."""
  if meteor == 'auto':
    return 'java' if shutil.which('java') else 'exact'
  if meteor not in METEOR_IMPLS:
    raise ValueError(f"meteor must be 'auto', 'java' or 'exact', got {meteor!r}")
  if meteor == 'java' and not shutil.which('java'):
    raise RuntimeError("meteor='java' needs `java` on PATH; use meteor='exact' (not comparable)")
  return meteor


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]],
                   meteor: str = 'auto') -> Dict:
  """Corpus BLEU-1..4, METEOR, ROUGE-L and CIDEr-D of captions against their references.

  Returns {'bleu_1'..'bleu_4', 'meteor', 'rouge_l', 'cider', 'meteor_impl', 'per_caption':
  {'bleu_4', 'meteor', 'rouge_l', 'cider': a list in caption order}}. CIDEr's IDF comes from the
  references of these captions, so it needs a corpus: one caption alone always scores 0.
  """
  if len(predictions) != len(references):
    raise ValueError(f'{len(predictions)} predictions for {len(references)} reference lists')
  if not predictions:
    return {'bleu_1': None, 'bleu_2': None, 'bleu_3': None, 'bleu_4': None, 'meteor': None,
            'rouge_l': None, 'cider': None, 'meteor_impl': None, 'per_caption': {}}
  impl = resolve_meteor(meteor)
  # pycocoevalcap's input: {id: [tokenised hypothesis]}, {id: [tokenised references]}.
  res, gts = {}, {}
  for i, (pred, refs) in enumerate(zip(predictions, references)):
    if not refs:
      raise ValueError(f'caption {i} has no references')
    res[i] = [tokenize(pred)]
    gts[i] = [tokenize(r) for r in refs]
  bleu, bleu_each = Bleu(4).compute_score(gts, res, verbose=0)
  rouge, rouge_each = Rouge().compute_score(gts, res)
  cider, cider_each = Cider().compute_score(gts, res)
  if impl == 'java':
    # The jar reads one line per caption: keys as strings, no '|||' separators inside.
    meteor_score, meteor_each = _java_meteor().compute_score(
        {str(k): v for k, v in gts.items()}, {str(k): v for k, v in res.items()})
  else:
    meteor_each = [meteor_exact_sentence(res[k][0], gts[k]) for k in res]
    meteor_score = mean(meteor_each)
  out = {f'bleu_{n + 1}': float(bleu[n]) for n in range(4)}
  out.update(meteor=float(meteor_score), rouge_l=float(rouge), cider=float(cider),
             meteor_impl=METEOR_IMPLS[impl])
  out['per_caption'] = {
      'bleu_4': [float(v) for v in bleu_each[3]],
      'meteor': [float(v) for v in meteor_each],
      'rouge_l': [float(v) for v in rouge_each],
      'cider': [float(v) for v in cider_each],
  }
  return out


# ---------------------------------------------------------------------------- counting

NUMBER_WORDS = {w: i for i, w in enumerate(
    'zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen '
    'fifteen sixteen seventeen eighteen nineteen twenty'.split())}
NUMBER_WORDS.update(none=0, no=0)

_COUNT = re.compile(r'\b(\d{1,3}(?:,\d{3})+|\d+|' + '|'.join(NUMBER_WORDS) + r')\b',
                    re.IGNORECASE)


def parse_count(text: Union[str, int]) -> Optional[int]:
  """The first integer or number word in `text` (see the module docstring), or None."""
  if isinstance(text, int) and not isinstance(text, bool):
    return text
  m = _COUNT.search(str(text))
  if m is None:
    return None
  word = m.group(1).lower()
  return NUMBER_WORDS[word] if word in NUMBER_WORDS else int(word.replace(',', ''))


COUNT_BINS = ('0', '(0,2]', '(2,6]', '(6,12]', '>12')


def count_bin(count: int) -> str:
  """The bin of a reference count: '0', '(0,2]', '(2,6]', '(6,12]' or '>12'."""
  if count < 0:
    raise ValueError(f'a count cannot be negative, got {count}')
  if count == 0:
    return '0'
  return '(0,2]' if count <= 2 else '(2,6]' if count <= 6 else '(6,12]' if count <= 12 else '>12'


def counting_summary(predicted: Sequence[Optional[int]], reference: Sequence[int]) -> Dict:
  """{'accuracy' (unparsed = wrong), 'mae' (parsed only), 'bias' (mean predicted - reference,
  parsed only: below 0 the model undercounts), 'mae_n', 'unparsable' (left out of the MAE and
  the bias), 'per_bin': {bin: {'n', 'accuracy'}} for every bin, accuracy None where n is 0}."""
  correct = [p is not None and p == r for p, r in zip(predicted, reference)]
  signed = [p - r for p, r in zip(predicted, reference) if p is not None]
  errors = [abs(e) for e in signed]
  per_bin = {b: [] for b in COUNT_BINS}
  for ok, r in zip(correct, reference):
    per_bin[count_bin(r)].append(ok)
  return {'accuracy': mean(correct), 'mae': mean(errors), 'bias': mean(signed),
          'mae_n': len(errors),
          'unparsable': sum(1 for p in predicted if p is None),
          'per_bin': {b: {'n': len(v), 'accuracy': mean(v)} for b, v in per_bin.items()}}
