"""Context-disentangled augmentation (docs/design.md section 2): edits that change local facts of an image
while its global scene stays, each with a regenerated question and answer.

  cutout    count-varying cutout: m of the n instances of one class are painted over with the
            surrounding background; the new sample asks for the count and answers n - m.
  recolour  one object of a known palette colour is repainted in another; the new sample asks for
            the colour of the object at its box.
  move      one uniquely describable object is cut out and pasted elsewhere; the new sample asks
            where it is and answers its new box.
  copy      (a control, off by default) the original itself, unedited.

Every edit takes the same arguments (sample, rng, palette, fits, paint) and returns the edited
sample with `changes` saying what it did; paint=False makes the same choices, question and answer
but leaves the picture as it was, for a caller that draws the edited scene itself
(synthetic.counterfactual). Only instances whose box touches no other box are edited, so every object that stays is left
fully visible and the rewritten answer is exact. Pixels outside the edited boxes never change.
The background fill interpolates, row by row and column by column, between the pixels just
outside the box (a cheap stand-in for Poisson blending, which we do not implement).
"""
import dataclasses
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np

from skymoe_jax.data import boxes as box_lib

DIALECT = 'geochat'   # the box dialect of the generated questions and answers
COLOR_TOLERANCE = 40  # max per-channel distance of a pixel to an object's palette colour


@dataclasses.dataclass
class Sample:
  """A decoded record: what the edits and the batch builder work on."""
  id: str
  image: np.ndarray                # uint8 [H, W, 3]
  conversations: List[Dict[str, str]]
  task: str
  granularity: str
  boxes: np.ndarray                # [N, 4] pixels
  labels: List[str]
  colors: List[str]
  edit: str = ''                   # '' for an unedited sample, else the edit's name
  # What the edit changed, by index into the original's objects: {'removed': [i, ...]},
  # {'recoloured': (i, colour)} or {'moved': (i, new box)}; a re-render repeats it exactly.
  changes: Dict = dataclasses.field(default_factory=dict)


def plural(label: str) -> str:
  word = label.lower()
  if word.endswith(('s', 'sh', 'ch', 'x')):
    return word + 'es'
  if word.endswith('y') and word[-2:-1] not in 'aeiou':
    return word[:-1] + 'ies'
  return word + 's'


def _pixel_bounds(box, height, width):
  """Integer [y0, y1) x [x0, x1) covering the float box."""
  x1, y1, x2, y2 = box
  return (max(int(np.floor(y1)), 0), min(int(np.ceil(y2)), height),
          max(int(np.floor(x1)), 0), min(int(np.ceil(x2)), width))


def fill_background(image: np.ndarray, box) -> np.ndarray:
  """Paints the box with the mean of a horizontal and a vertical linear interpolation between
  the pixel rows/columns just outside it (edges of the image clamp)."""
  h, w = image.shape[:2]
  y0, y1, x0, x1 = _pixel_bounds(box, h, w)
  if y1 <= y0 or x1 <= x0:
    return image
  img = image.astype(np.float32)
  left, right = img[y0:y1, max(x0 - 1, 0)], img[y0:y1, min(x1, w - 1)]
  top, bottom = img[max(y0 - 1, 0), x0:x1], img[min(y1, h - 1), x0:x1]
  tx = ((np.arange(x1 - x0) + 1) / (x1 - x0 + 1))[None, :, None]
  ty = ((np.arange(y1 - y0) + 1) / (y1 - y0 + 1))[:, None, None]
  horizontal = left[:, None] * (1 - tx) + right[:, None] * tx
  vertical = top[None] * (1 - ty) + bottom[None] * ty
  out = image.copy()
  out[y0:y1, x0:x1] = np.clip(np.round((horizontal + vertical) / 2), 0, 255).astype(np.uint8)
  return out


def isolated(boxes: np.ndarray, margin: float = 1.0) -> np.ndarray:
  """[N] bool: the box, grown by `margin` pixels, overlaps no other box."""
  n = len(boxes)
  grown = boxes + np.asarray([-margin, -margin, margin, margin], np.float32)
  overlap = ((grown[:, None, 0] < boxes[None, :, 2]) & (boxes[None, :, 0] < grown[:, None, 2]) &
             (grown[:, None, 1] < boxes[None, :, 3]) & (boxes[None, :, 1] < grown[:, None, 3]))
  overlap[np.arange(n), np.arange(n)] = False
  return ~overlap.any(axis=1)


def _question(text: str) -> List[Dict[str, str]]:
  return [{'from': 'human', 'value': '<image>\n' + text}]


def _with_answer(question: List[Dict[str, str]], answer: str) -> List[Dict[str, str]]:
  return question + [{'from': 'gpt', 'value': answer}]


def _box_text(box, image) -> str:
  h, w = image.shape[:2]
  return box_lib.format(DIALECT, box_lib.Box(*map(float, box)), w, h)


def cutout(sample: Sample, rng: np.random.Generator, palette=None, fits=None, paint=True
           ) -> Optional[Sample]:
  """Count-varying cutout; None when no class has an isolated instance."""
  del palette, fits
  free = isolated(sample.boxes)
  classes = sorted({l for l, ok in zip(sample.labels, free) if ok})
  if not classes:
    return None
  label = classes[rng.integers(len(classes))]
  of_class = [i for i, l in enumerate(sample.labels) if l == label]
  candidates = [i for i in of_class if free[i]]
  m = int(rng.integers(1, len(candidates) + 1))
  removed = set(rng.choice(candidates, size=m, replace=False).tolist())
  image = sample.image
  for i in sorted(removed) if paint else ():
    image = fill_background(image, sample.boxes[i])
  keep = [i for i in range(len(sample.labels)) if i not in removed]
  answer = str(len(of_class) - m)
  conv = _with_answer(_question(f'How many {plural(label)} are there in the image?'), answer)
  return dataclasses.replace(
      sample, image=image, conversations=conv, task='counting', granularity='local',
      boxes=sample.boxes[keep], labels=[sample.labels[i] for i in keep],
      colors=[sample.colors[i] for i in keep], edit='cutout', changes={'removed': sorted(removed)})


def recolour(sample: Sample, rng: np.random.Generator, palette: Mapping[str, Sequence[int]],
             fits=None, paint=True) -> Optional[Sample]:
  """Attribute edit of colour; None when no isolated object has a palette colour."""
  del fits
  if not palette or len(palette) < 2:
    return None
  free = isolated(sample.boxes)
  candidates = [i for i, c in enumerate(sample.colors) if c in palette and free[i]]
  if not candidates:
    return None
  i = candidates[rng.integers(len(candidates))]
  old = sample.colors[i]
  names = sorted(c for c in palette if c != old)
  new = names[rng.integers(len(names))]
  h, w = sample.image.shape[:2]
  y0, y1, x0, x1 = _pixel_bounds(sample.boxes[i], h, w)
  region = sample.image[y0:y1, x0:x1].astype(np.int32)
  match = np.all(np.abs(region - np.asarray(palette[old], np.int32)) <= COLOR_TOLERANCE, axis=-1)
  if not match.any():   # the object's pixels are not of its colour: nothing to repaint
    return None
  image = sample.image
  if paint:
    image = image.copy()
    region[match] = np.asarray(palette[new], np.int32)
    image[y0:y1, x0:x1] = region.astype(np.uint8)
  colors = list(sample.colors)
  colors[i] = new
  question = f'[identify] What colour is the {sample.labels[i]} {_box_text(sample.boxes[i], image)}?'
  return dataclasses.replace(sample, image=image, conversations=_with_answer(
      _question(question), new), task='vqa', granularity='local', colors=colors, edit='recolour',
      changes={'recoloured': (i, new)})


def _description(sample: Sample, i: int) -> Optional[str]:
  """'the ship' or 'the red ship' when that names object i alone, else None."""
  label, colour = sample.labels[i], sample.colors[i]
  if sample.labels.count(label) == 1:
    return f'the {label}'
  same = [j for j in range(len(sample.labels))
          if sample.labels[j] == label and sample.colors[j] == colour]
  return f'the {colour} {label}' if colour and len(same) == 1 else None


def move(sample: Sample, rng: np.random.Generator, palette=None, fits=None, paint=True,
         tries: int = 20) -> Optional[Sample]:
  """Attribute edit of position; None when no isolated, uniquely described object fits
  anywhere else without touching another box (and where fits(label, box), if given, allows)."""
  del palette
  free = isolated(sample.boxes)
  candidates = [i for i in range(len(sample.labels)) if free[i] and _description(sample, i)]
  if not candidates:
    return None
  i = candidates[rng.integers(len(candidates))]
  h, w = sample.image.shape[:2]
  y0, y1, x0, x1 = _pixel_bounds(sample.boxes[i], h, w)
  bh, bw = y1 - y0, x1 - x0
  others = np.delete(sample.boxes, i, axis=0)
  for _ in range(tries):
    ny, nx = int(rng.integers(0, h - bh + 1)), int(rng.integers(0, w - bw + 1))
    new_box = np.asarray([nx + (sample.boxes[i][0] - x0), ny + (sample.boxes[i][1] - y0),
                          nx + (sample.boxes[i][2] - x0), ny + (sample.boxes[i][3] - y0)],
                         np.float32)
    if (isolated(np.concatenate([new_box[None], others]))[0]
        and (fits is None or fits(sample.labels[i], new_box))):
      image = sample.image
      if paint:
        patch = image[y0:y1, x0:x1].copy()
        image = fill_background(image, sample.boxes[i])
        image[ny:ny + bh, nx:nx + bw] = patch
      boxes = sample.boxes.copy()
      boxes[i] = new_box
      desc = _description(sample, i)
      conv = _with_answer(_question(f'[refer] Where is {desc}?'), _box_text(new_box, image))
      return dataclasses.replace(sample, image=image, conversations=conv, task='grounding',
                                 granularity='local', boxes=boxes, edit='move',
                                 changes={'moved': (i, tuple(float(v) for v in new_box))})
  return None


def copy(sample: Sample, rng: np.random.Generator = None, palette=None, fits=None, paint=True
         ) -> Sample:
  """No edit at all: the original again, question and answer included. The control that tells
  an edit's content from what any edited row costs (an original row of the batch less)."""
  del rng, palette, fits, paint
  return dataclasses.replace(sample, edit='copy', changes={})


EDITS: Dict[str, Callable[..., Optional[Sample]]] = {
    'cutout': cutout, 'recolour': recolour, 'move': move, 'copy': copy}
