"""Procedurally rendered aerial scenes with exact annotations and instruction samples for all tasks.

A licence-free dataset that needs no download: the tiny/demo configs train on it, and its exact
boxes, labels and colours let the CDA edits (cutout, recolouring) be checked pixel by pixel.

Rendering (pure numpy, one `np.random.default_rng([seed, split_id, index])` per image, so any
image can be re-rendered alone and the same seed gives the same records, byte for byte):
  * a scene background (SCENES) with its own layout and a smooth noise texture, and a region
    map (water, road, paved, lot, ground) that says where each object class may stand;
  * 0..MAX_OBJECTS objects of the scene's typical classes, non-overlapping (at least GAP pixels
    apart), each entirely inside the image, in a flat palette colour (COLORS) with a darker
    one-pixel shadow (SHADES) along its bottom and right edges.
Boxes are pixel edges, (x1, y1, x2, y2) with x2/y2 exclusive: the tight box of the drawn pixels.
Every background pixel has an odd red value and every object pixel an even one, so an object's
exact pixel mask is `object_mask(image, box)` (the even-red pixels of its box), for CDA and tests.

Each image yields one single-turn record per sample kind below; all share the image bytes and
carry every object of the image in boxes/labels/colors. Ids are `syn-<split>-<index:06d>-<kind>`.

  kind      task                  granularity  example prompt -> answer
  scene     scene_classification  global       Classify the scene of this image. -> harbour
  caption   captioning            global       Describe the image briefly.
                                                -> A harbour scene with three ships and one car.
  count     counting              local        How many ships are there in the image? -> 3
                                                (a fifth of them ask for an absent typical class: 0)
  refer     grounding             local        [refer] Where is the red ship? -> {<10><20><25><31>}
                                                (only objects unique in (colour, class))
  colour    vqa                   local        What colour is the ship at the top left? -> red
                                                (only objects unique in (class, position))
  presence  vqa                   mixed        Is there an airplane in the image? -> yes / no

The granularities are those `tasks.classify` gives each prompt (docs/design.md section 4: presence is
"other VQA", so mixed), so training and inference condition the router alike. Texts use a small
vocabulary (a demo model with a 1024-piece tokenizer learns it).

Stored as the tfds dataset skymoe_synthetic (data/builders.py; the generator params are its
builder config, e.g. skymoe_synthetic/n2000-s0-i128-v0.1), records in the order above. `generate`
builds it beside out_dir and swaps it into place (out_dir is the version folder a source's
data_dir names), so an interrupted run never leaves half a dataset; `ensure` regenerates only
when the generator params or FORMAT_VERSION recorded in its metadata differ.
"""
import dataclasses
import io
import json
import logging
import os
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from skymoe_jax import storage
from skymoe_jax.data import boxes as boxes_lib
from skymoe_jax.data import cda
from skymoe_jax.data import convert
from skymoe_jax.data import records
from skymoe_jax.data import tasks

NAME = 'synthetic_scenes'   # the records' source
BUILDER = 'skymoe_synthetic'  # the tfds builder (data/builders.py)
LICENCE = 'CC0-1.0 (rendered by SkyMoE-JAX)'
FORMAT_VERSION = 2          # bump whenever rendering or texts change: ensure() then regenerates
SPLITS = ('train', 'validation')
MAX_OBJECTS = 8
GAP = 2                     # free pixels between object boxes, so masks never touch

SCENES = ('farmland', 'harbour', 'airport', 'residential', 'forest', 'industrial')
OBJECT_CLASSES = ('ship', 'airplane', 'car', 'storage tank', 'building', 'tree')


plural = cda.plural  # one pluraliser for the samples and the CDA questions


def _even_red(rgb):
  return (rgb[0] & ~1, rgb[1], rgb[2])


# Object colours: red is even (see module docstring), and every fill and shade is distinct, so a
# recolouring can map pixels by value.
COLORS: Dict[str, Tuple[int, int, int]] = {
    'red': (214, 40, 40),
    'blue': (40, 90, 220),
    'white': (244, 244, 244),
    'yellow': (240, 210, 40),
    'green': (40, 176, 60),
    'orange': (246, 140, 30),
    'black': (24, 24, 24),
    'purple': (150, 60, 190),
}
SHADES: Dict[str, Tuple[int, int, int]] = {
    name: _even_red(tuple(int(round(v * 0.6)) for v in rgb)) for name, rgb in COLORS.items()}
assert all(rgb[0] % 2 == 0 for rgb in list(COLORS.values()) + list(SHADES.values()))
assert len(set(COLORS.values()) | set(SHADES.values())) == 2 * len(COLORS)

# Trees keep natural (or autumn) colours; everything else may be any palette colour.
CLASS_COLORS = {c: tuple(COLORS) for c in OBJECT_CLASSES}
CLASS_COLORS['tree'] = ('green', 'yellow', 'orange', 'red')

POSITIONS = ('top left', 'top', 'top right', 'left', 'centre', 'right',
             'bottom left', 'bottom', 'bottom right')
_POSITION_PHRASES = {'left': 'on the left', 'right': 'on the right', 'centre': 'in the centre'}


def position_name(box: Sequence[float], width: float, height: float) -> str:
  """The 3x3 grid cell (POSITIONS) holding the centre of box (x1, y1, x2, y2)."""
  cx, cy = (box[0] + box[2]) / 2.0, (box[1] + box[3]) / 2.0
  col = min(max(int(cx * 3 // width), 0), 2)
  row = min(max(int(cy * 3 // height), 0), 2)
  return POSITIONS[3 * row + col]


def position_phrase(position: str) -> str:
  """'top left' -> 'at the top left', 'centre' -> 'in the centre', 'left' -> 'on the left'."""
  return _POSITION_PHRASES.get(position, 'at the ' + position)


def object_mask(image: np.ndarray, box: Sequence[float]) -> np.ndarray:
  """Boolean HxW mask of the object pixels inside box (the even-red pixels, see docstring)."""
  x1, y1, x2, y2 = (int(round(v)) for v in box[:4])
  mask = np.zeros(image.shape[:2], bool)
  mask[y1:y2, x1:x2] = image[y1:y2, x1:x2, 0] % 2 == 0
  return mask


class SceneObject(NamedTuple):
  label: str                          # a name in OBJECT_CLASSES
  color: str                          # a name in COLORS
  box: Tuple[int, int, int, int]      # x1, y1, x2, y2 pixel edges, x2/y2 exclusive


# ---------------------------------------------------------------------------- backgrounds

# Region codes of the map each background returns with its pixels.
GROUND, WATER, ROAD, PAVED, LOT = range(5)

# Scene -> {class: (weight, regions it may stand on)}; the keys are the scene's typical classes.
SCENE_OBJECTS = {
    'farmland': {'building': (0.35, (GROUND,)), 'tree': (0.4, (GROUND,)),
                 'car': (0.25, (ROAD,))},
    'harbour': {'ship': (0.6, (WATER,)), 'storage tank': (0.25, (PAVED,)),
                'car': (0.15, (PAVED,))},
    'airport': {'airplane': (0.6, (ROAD, PAVED)), 'car': (0.15, (PAVED,)),
                'building': (0.15, (GROUND,)), 'storage tank': (0.1, (GROUND,))},
    'residential': {'building': (0.45, (LOT,)), 'car': (0.3, (ROAD,)), 'tree': (0.25, (LOT,))},
    'forest': {'tree': (0.7, (GROUND, LOT)), 'building': (0.15, (LOT,)), 'car': (0.15, (ROAD,))},
    'industrial': {'storage tank': (0.5, (PAVED,)), 'building': (0.3, (PAVED,)),
                   'car': (0.2, (ROAD,))},
}
assert set(SCENE_OBJECTS) == set(SCENES)


def _px(value: float, scale: float) -> int:
  return max(1, int(round(value * scale)))


def _value_noise(rng, size: int, cell: float) -> np.ndarray:
  """Smooth unit-variance-ish noise: a random grid every `cell` pixels, smoothstep-interpolated."""
  n = int(size / cell) + 2
  grid = rng.standard_normal((n, n)).astype(np.float32)
  t = np.arange(size, dtype=np.float32) / cell
  i = t.astype(np.int64)
  f = t - i
  f = f * f * (3 - 2 * f)
  rows = grid[i] * (1 - f)[:, None] + grid[i + 1] * f[:, None]
  return rows[:, i] * (1 - f)[None, :] + rows[:, i + 1] * f[None, :]


def _fill(img, region, sl, rgb, code=None):
  img[sl] = rgb
  if code is not None:
    region[sl] = code


def _farmland(rng, s, img, region):
  palette = np.array([(96, 140, 60), (122, 160, 72), (150, 120, 80), (172, 150, 92),
                      (192, 172, 104), (82, 112, 52)], np.float32)
  yy, xx = np.mgrid[:s, :s]
  cuts_x = np.sort(rng.integers(s // 6, s - s // 6, rng.integers(1, 4)))
  edges_x = np.concatenate([[0], cuts_x, [s]])
  for x0, x1 in zip(edges_x[:-1], edges_x[1:]):
    cuts_y = np.sort(rng.integers(s // 6, s - s // 6, rng.integers(1, 4)))
    edges_y = np.concatenate([[0], cuts_y, [s]])
    for y0, y1 in zip(edges_y[:-1], edges_y[1:]):
      colour = palette[rng.integers(len(palette))]
      period = int(rng.integers(2, 5))
      along = yy if rng.random() < 0.5 else xx    # crop rows, horizontal or vertical
      stripes = ((along[y0:y1, x0:x1] // period) % 2)[..., None] * 10.0 - 5.0
      img[y0:y1, x0:x1] = colour + stripes
      img[y0:y0 + 1, x0:x1] = (184, 164, 124)    # field boundaries
      img[y0:y1, x0:x0 + 1] = (184, 164, 124)
  # One dirt road across the fields, where cars drive.
  w = _px(8, s / 128)
  at = int(rng.integers(s // 5, s - s // 5 - w))
  sl = (slice(None), slice(at, at + w)) if rng.random() < 0.5 else (slice(at, at + w), slice(None))
  _fill(img, region, sl, (164, 140, 100), ROAD)


def _harbour(rng, s, img, region):
  # Built with the land on the left; the caller's random rotation puts it on any side.
  img[:] = (28, 74, 112)
  region[:] = WATER
  d = int(s * rng.uniform(0.25, 0.4))
  _fill(img, region, (slice(None), slice(0, d)), (150, 148, 140), PAVED)
  e = _px(2, s / 128)
  _fill(img, region, (slice(None), slice(d - e, d)), (92, 92, 92), GROUND)   # quay wall
  for _ in range(rng.integers(0, 3)):    # piers
    w = _px(rng.integers(5, 9), s / 128)
    y = int(rng.integers(0, s - w))
    length = int(s * rng.uniform(0.15, 0.35))
    _fill(img, region, (slice(y, y + w), slice(d - e, d + length)), (136, 134, 128), GROUND)


def _airport(rng, s, img, region):
  # Built with a horizontal runway; the caller's random rotation may turn it.
  img[:] = (186, 170, 120)
  region[:] = GROUND
  rw = int(s * rng.uniform(0.16, 0.22))
  ry = int(rng.integers(s // 8, s - s // 8 - rw))
  _fill(img, region, (slice(ry, ry + rw), slice(None)), (72, 72, 76), ROAD)
  dash, t = _px(6, s / 128), _px(1, s / 128)
  mid = ry + rw // 2
  for x in range(0, s, 2 * dash):
    img[mid:mid + t, x:x + dash] = (224, 224, 224)
  # An apron on the larger side of the runway, joined by a taxiway.
  ah, aw = int(s * rng.uniform(0.28, 0.4)), int(s * rng.uniform(0.45, 0.75))
  ax = int(rng.integers(0, s - aw + 1))
  above = ry > s - ry - rw
  gap = _px(6, s / 128)
  ah = max(1, min(ah, max(ry, s - ry - rw) - gap))    # never over the runway
  ay = ry - gap - ah if above else ry + rw + gap
  _fill(img, region, (slice(ay, ay + ah), slice(ax, ax + aw)), (158, 156, 150), PAVED)
  tx = ax + aw // 2
  ty0, ty1 = (ay + ah, ry) if above else (ry + rw, ay)
  img[ty0:ty1, tx:tx + _px(5, s / 128)] = (96, 96, 100)


def _residential(rng, s, img, region):
  img[:] = (120, 150, 90)
  region[:] = LOT
  w = _px(8, s / 128)
  spacing = int(s * rng.uniform(0.3, 0.45))
  for axis in (0, 1):
    start = int(rng.integers(0, spacing))
    for p in range(start, s - w // 2, spacing):
      sl = (slice(p, p + w), slice(None)) if axis == 0 else (slice(None), slice(p, p + w))
      _fill(img, region, sl, (112, 112, 112), ROAD)
  # Kerbs: a pixel of pavement on each road side that nothing stands on.
  road = region == ROAD
  kerb = np.zeros_like(road)
  kerb[1:] |= road[1:] & ~road[:-1]
  kerb[:-1] |= road[:-1] & ~road[1:]
  kerb[:, 1:] |= road[:, 1:] & ~road[:, :-1]
  kerb[:, :-1] |= road[:, :-1] & ~road[:, 1:]
  img[kerb] = (176, 176, 170)
  region[kerb] = GROUND


def _forest(rng, s, img, region):
  img[:] = (34, 72, 38)
  region[:] = GROUND
  canopy = 14 * _value_noise(rng, s, max(2.0, s / 24)) + 6 * _value_noise(rng, s, max(1.5, s / 48))
  img += canopy[..., None] * np.array([0.6, 1.0, 0.5], np.float32)
  yy, xx = np.mgrid[:s, :s]
  if rng.random() < 0.7:    # a clearing
    r = s * rng.uniform(0.14, 0.24)
    cy, cx = rng.uniform(r, s - r, 2)
    clearing = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    img[clearing] = (124, 136, 80)
    region[clearing] = LOT
  if rng.random() < 0.5:    # a forest track
    w = _px(8, s / 128)
    at = int(rng.integers(0, s - w))
    across = rng.random() < 0.5
    sl = (slice(None), slice(at, at + w)) if across else (slice(at, at + w), slice(None))
    _fill(img, region, sl, (122, 98, 66), ROAD)


def _industrial(rng, s, img, region):
  img[:] = (172, 168, 158)
  region[:] = PAVED
  for _ in range(rng.integers(1, 4)):    # darker concrete pads
    h, w = (int(s * v) for v in rng.uniform(0.2, 0.45, 2))
    y, x = int(rng.integers(0, s - h)), int(rng.integers(0, s - w))
    img[y:y + h, x:x + w] = (146, 144, 138)
  w = _px(9, s / 128)
  for axis in (0, 1):
    p = int(rng.integers(s // 6, s - s // 6 - w))
    sl = (slice(p, p + w), slice(None)) if axis == 0 else (slice(None), slice(p, p + w))
    _fill(img, region, sl, (96, 96, 98), ROAD)


_BACKGROUNDS = {'farmland': _farmland, 'harbour': _harbour, 'airport': _airport,
                'residential': _residential, 'forest': _forest, 'industrial': _industrial}
assert set(_BACKGROUNDS) == set(SCENES)


def _background(rng, scene: str, s: int) -> Tuple[np.ndarray, np.ndarray]:
  """(uint8 HxWx3 with odd red values, region map) of a scene."""
  img = np.zeros((s, s, 3), np.float32)
  region = np.zeros((s, s), np.uint8)
  _BACKGROUNDS[scene](rng, s, img, region)
  k = int(rng.integers(4))    # any orientation: a harbour's land may lie on any side
  img, region = np.rot90(img, k), np.rot90(region, k)
  # Smooth texture only: per-pixel grain would double the PNG size for no visible gain.
  img = img + 7 * _value_noise(rng, s, max(2.0, s / 10))[..., None]
  img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
  img[..., 0] |= 1
  return img, np.ascontiguousarray(region)


# ---------------------------------------------------------------------------- objects

def _disc(d: int) -> np.ndarray:
  c = (d - 1) / 2.0
  yy, xx = np.mgrid[:d, :d]
  return (yy - c) ** 2 + (xx - c) ** 2 <= (d / 2.0) ** 2 - 0.25 * d


def _ship(rng, k):
  length, width = max(8, int(rng.integers(14, 25) * k)), max(3, int(rng.integers(5, 9) * k))
  x = np.arange(length, dtype=np.float32)
  bow = 0.65 * length    # the hull narrows from here to a point
  half = np.where(x < bow, width / 2.0, width / 2.0 * (1 - (x - bow) / (length - bow + 1)))
  yy = np.arange(width, dtype=np.float32)[:, None] - (width - 1) / 2.0
  return np.abs(yy) <= np.maximum(half, 0.5)[None, :]


def _airplane(rng, k):
  span = max(9, int(rng.integers(14, 23) * k))
  length = max(9, int(span * rng.uniform(0.9, 1.1)))
  fw = max(3, int(round(span / 6)))
  cx = (span - 1) / 2.0
  yy, xx = np.mgrid[:length, :span].astype(np.float32)
  dx = np.abs(xx - cx)
  body = (dx <= fw / 2.0) & (yy >= (dx > fw / 4.0))    # a rounder nose
  r0, chord = 0.3 * length, max(3.0, span / 5.0)
  wing_start = r0 + 0.35 * dx
  wing = (yy >= wing_start) & (yy < wing_start + chord * (1 - 0.5 * dx / (span / 2.0)))
  tail_half, tail_chord = span * 0.22, max(2.0, span / 8.0)
  tail = (dx <= tail_half) & (yy >= length - tail_chord - 0.3 * dx) & (yy < length - 0.3 * dx)
  return body | wing | tail


def _car(rng, k):
  h, w = max(3, int(rng.integers(4, 6) * k)), max(5, int(rng.integers(7, 10) * k))
  m = np.ones((h, w), bool)
  if h >= 4:    # rounded corners
    m[[0, 0, -1, -1], [0, -1, 0, -1]] = False
  return m


def _storage_tank(rng, k):
  return _disc(max(5, int(rng.integers(8, 15) * k)))


def _building(rng, k):
  h, w = (max(4, int(v * k)) for v in rng.integers(8, 17, 2))
  m = np.ones((h, w), bool)
  if rng.random() < 0.4 and min(h, w) >= 8:    # an L-shaped block: the extents stay the same
    ch, cw = int(h * rng.uniform(0.35, 0.6)), int(w * rng.uniform(0.35, 0.6))
    m[:ch, :cw] = False
  return m


def _tree(rng, k):
  d = max(4, int(rng.integers(5, 10) * k))
  size = d + d // 2
  m = np.zeros((size, size), bool)
  for _ in range(3):    # a crown of overlapping discs
    e = max(3, d - int(rng.integers(0, 3)))
    y, x = rng.integers(0, size - e + 1, 2)
    m[y:y + e, x:x + e] |= _disc(e)
  return m


_SHAPES = {'ship': _ship, 'airplane': _airplane, 'car': _car, 'storage tank': _storage_tank,
           'building': _building, 'tree': _tree}
assert set(_SHAPES) == set(OBJECT_CLASSES)


def _shape(rng, label: str, k: float) -> np.ndarray:
  """A tight boolean mask of one object, in a random one of four orientations."""
  m = _SHAPES[label](rng, k)
  m = np.rot90(m, int(rng.integers(4)))
  if rng.random() < 0.5:
    m = m[:, ::-1]
  rows, cols = np.flatnonzero(m.any(1)), np.flatnonzero(m.any(0))
  return m[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def _paint(img, mask, y, x, color: str):
  h, w = mask.shape
  # Shadow (sun at the top left): mask pixels whose lower or right neighbour is outside.
  below = np.zeros_like(mask)
  below[:-1] = mask[1:]
  right = np.zeros_like(mask)
  right[:, :-1] = mask[:, 1:]
  shadow = mask & ~(below & right)
  patch = img[y:y + h, x:x + w]
  patch[mask] = COLORS[color]
  patch[shadow] = SHADES[color]


class Difficulty(NamedTuple):
  """The generator's knobs beyond size and seed (the defaults: the original scenes)."""
  object_scale: float = 1.0     # object sizes x this (sizes are given for 128-pixel scenes)
  max_objects: int = MAX_OBJECTS
  # The background is blended with another scene's, that one weighing w ~ U(0, scene_mix):
  # past w = 0.5 the other scene's look dominates and the label rests on the objects and layout.
  scene_mix: float = 0.0
  # Questions per image of the object-level kinds (refer, colour), each on another object:
  # more grounding and colour supervision per rendered scene.
  local_questions: int = 1

  def check(self):
    if not self.object_scale > 0:
      raise ValueError(f'object_scale must be > 0, got {self.object_scale}')
    if not 0 <= self.max_objects <= 32:
      raise ValueError(f'max_objects must be in [0, 32], got {self.max_objects}')
    if not 0.0 <= self.scene_mix < 1.0:
      raise ValueError(f'scene_mix must be in [0, 1), got {self.scene_mix}')
    if not 1 <= self.local_questions <= 8:
      raise ValueError(f'local_questions must be in [1, 8], got {self.local_questions}')
    return self


class Placed(NamedTuple):
  """An object as laid out: what it is, and its tight mask painted at (box[0], box[1])."""
  object: SceneObject
  mask: np.ndarray


class Layout(NamedTuple):
  """A scene before its objects are painted: everything a counterfactual re-render needs."""
  scene: str
  background: np.ndarray    # uint8 HxWx3, odd red values
  region: np.ndarray        # HxW region codes
  placed: List[Placed]


def _blend(rng, scene: str, img: np.ndarray, s: int, scene_mix: float) -> np.ndarray:
  others = [c for c in SCENES if c != scene]
  other, _ = _background(rng, others[int(rng.integers(len(others)))], s)
  w = rng.uniform(0.0, scene_mix)
  out = np.rint((1 - w) * img.astype(np.float32) + w * other.astype(np.float32))
  out = np.clip(out, 0, 255).astype(np.uint8)
  out[..., 0] |= 1
  return out


def layout_scene(rng: np.random.Generator, scene: str, image_size: int = 128,
                 difficulty: Difficulty = Difficulty()) -> Layout:
  """The background, region map and non-overlapping objects of a scene, unpainted."""
  if scene not in SCENES:
    raise ValueError(f'unknown scene {scene!r}; known: {SCENES}')
  s = int(image_size)
  img, region = _background(rng, scene, s)
  if difficulty.scene_mix > 0:
    img = _blend(rng, scene, img, s, difficulty.scene_mix)
  k = s / 128.0 * difficulty.object_scale
  table = SCENE_OBJECTS[scene]
  labels = list(table)
  weights = np.array([table[c][0] for c in labels])
  weights /= weights.sum()
  occupied = np.zeros((s, s), bool)
  placed: List[Placed] = []
  for _ in range(int(rng.integers(0, difficulty.max_objects + 1))):
    for attempt in range(30):    # rejection sampling of a free, allowed spot
      if attempt % 10 == 0:      # a new object now and then, in case this one fits nowhere
        label = labels[int(rng.choice(len(labels), p=weights))]
        mask = _shape(rng, label, k)
        h, w = mask.shape
        allowed = np.zeros(8, bool)
        allowed[list(table[label][1])] = True
      if h > s - 2 or w > s - 2:
        continue
      y, x = int(rng.integers(1, s - h)), int(rng.integers(1, s - w))
      if not allowed[region[y:y + h, x:x + w]].all():
        continue
      if occupied[max(0, y - GAP):y + h + GAP, max(0, x - GAP):x + w + GAP].any():
        continue
      colours = CLASS_COLORS[label]
      color = colours[int(rng.integers(len(colours)))]
      occupied[y:y + h, x:x + w] = True
      placed.append(Placed(SceneObject(label, color, (x, y, x + w, y + h)), mask))
      break
  return Layout(scene, img, region, placed)


def paint(layout: Layout, objects: Sequence[Optional[SceneObject]]) -> np.ndarray:
  """The layout's background with objects[i] painted in place of layout.placed[i] (its own
  class, mask and shadow, at objects[i]'s colour and box corner); None leaves one out."""
  img = layout.background.copy()
  for p, o in zip(layout.placed, objects):
    if o is not None:
      _paint(img, p.mask, o.box[1], o.box[0], o.color)
  return img


def render_scene(rng: np.random.Generator, scene: str, image_size: int = 128,
                 difficulty: Difficulty = Difficulty()
                 ) -> Tuple[np.ndarray, List[SceneObject]]:
  """A uint8 image_size x image_size x 3 scene and its objects (class, colour, exact box)."""
  layout = layout_scene(rng, scene, image_size, difficulty)
  objects = [p.object for p in layout.placed]
  return paint(layout, objects), objects


def allowed_at(layout: Layout, label: str, box: Sequence[int]) -> bool:
  """Whether an object of class label may stand at box in this scene (inside the image, on its
  class's regions), as the generator places them."""
  x1, y1, x2, y2 = (int(v) for v in box)
  s = layout.region.shape[0]
  if x1 < 1 or y1 < 1 or x2 > s - 1 or y2 > s - 1:
    return False
  regions = SCENE_OBJECTS[layout.scene].get(label, (0, ()))[1]
  return bool(np.isin(layout.region[y1:y2, x1:x2], regions).all())


def encode_png(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  # No timestamps are written, so equal pixels give equal bytes; level 3 is ~2.5x faster than
  # the default 6 for a few percent more bytes.
  Image.fromarray(image).save(buf, format='PNG', compress_level=3)
  return buf.getvalue()


# ---------------------------------------------------------------------------- instruction texts

_NUMBER_WORDS = ('zero', 'one', 'two', 'three', 'four', 'five', 'six', 'seven', 'eight', 'nine',
                 'ten', 'eleven', 'twelve')

# kind -> (task, granularity); the order is the order of an image's records.
KINDS = {
    'scene': ('scene_classification', 'global'),
    'caption': ('captioning', 'global'),
    'count': ('counting', 'local'),
    'refer': ('grounding', 'local'),
    'colour': ('vqa', 'local'),
    'presence': ('vqa', 'mixed'),
}
LOCAL_KINDS = ('refer', 'colour')   # Difficulty.local_questions asks these again

_PROMPTS = {
    'scene': ('Classify the scene of this image.',
              'What type of scene is shown in this image?',
              'Which scene category does this image belong to?'),
    'caption': ('Describe the image briefly.',
                'Write a short caption for this image.',
                'Give a brief description of this image.'),
    'count': ('How many {plural} are there in the image?',
              'Count the {plural} in this image.',
              'What is the number of {plural} in the image?'),
    'refer': ('[refer] Where is the {thing}?',
              '[refer] Give the location of the {thing}.',
              '[refer] Output the box of the {thing}.'),
    'colour': ('What colour is the {label} {where}?',
               'What colour does the {label} {where} have?'),
    'presence': ('Is there {a} {label} in the image?',
                 'Are there any {plural} in this image?'),
}


def _a(word: str) -> str:
  return 'an' if word[0] in 'aeiou' else 'a'


def _number(n: int) -> str:
  return _NUMBER_WORDS[n] if n < len(_NUMBER_WORDS) else str(n)


def _counts(objects: Sequence[SceneObject]) -> Dict[str, int]:
  counts = {c: 0 for c in OBJECT_CLASSES}
  for o in objects:
    counts[o.label] += 1
  return counts


def caption(scene: str, objects: Sequence[SceneObject]) -> str:
  """'A harbour scene with three ships and one car.' (classes in OBJECT_CLASSES order)."""
  parts = [f'{_number(n)} {c if n == 1 else plural(c)}'
           for c, n in _counts(objects).items() if n]
  head = f'{_a(scene).capitalize()} {scene} scene with '
  if not parts:
    return head + 'no objects.'
  listed = parts[0] if len(parts) == 1 else ', '.join(parts[:-1]) + ' and ' + parts[-1]
  return head + listed + '.'


def _pick(rng, items):
  return items[int(rng.integers(len(items)))]


def _sample(rng, kind: str, scene: str, objects: Sequence[SceneObject], size: int,
            asked: Sequence = ()) -> Optional[Tuple[str, str, object]]:
  """(prompt without the image line, answer, subject) of one kind, or None when the image has
  none; `asked`: the subjects (a class, an object) of this kind's earlier questions, not asked
  again."""
  template = _pick(rng, _PROMPTS[kind])
  counts = _counts(objects)
  present = [c for c in OBJECT_CLASSES if counts[c] and c not in asked]
  if kind == 'scene':
    return template, scene, None
  if kind == 'caption':
    return template, caption(scene, objects), None
  if kind == 'count':
    absent = [c for c in SCENE_OBJECTS[scene] if not counts[c] and c not in asked]
    # A fifth ask for a typical class that is absent, so zero is a learnt answer too.
    label = _pick(rng, absent) if absent and (not present or rng.random() < 0.2) else None
    if label is None:
      if not present:
        return None
      label = _pick(rng, present)
    return template.format(plural=plural(label)), str(counts[label]), label
  if kind == 'refer':
    keys = [(o.color, o.label) for o in objects]
    unique = [o for o in objects if keys.count((o.color, o.label)) == 1 and o not in asked]
    if not unique:
      return None
    o = _pick(rng, unique)
    answer = boxes_lib.format('geochat', boxes_lib.Box(*map(float, o.box)), size, size)
    return template.format(thing=f'{o.color} {o.label}'), answer, o
  if kind == 'colour':
    keys = [(o.label, position_name(o.box, size, size)) for o in objects]
    unique = [(o, pos) for o, (_, pos) in zip(objects, keys)
              if keys.count((o.label, pos)) == 1 and o not in asked]
    if not unique:
      return None
    o, pos = _pick(rng, unique)
    return template.format(label=o.label, where=position_phrase(pos)), o.color, o
  if kind == 'presence':
    absent = [c for c in OBJECT_CLASSES if not counts[c]]
    yes = bool(present) and (not absent or rng.random() < 0.5)
    label = _pick(rng, present if yes else absent)
    return (template.format(a=_a(label), label=label, plural=plural(label)),
            'yes' if yes else 'no', label)
  raise ValueError(f'unknown sample kind {kind!r}; known: {tuple(KINDS)}')


def _image_rng(seed: int, split: str, index: int) -> np.random.Generator:
  return np.random.default_rng([seed, SPLITS.index(split), index])


def image_layout(seed: int, split: str, index: int, image_size: int = 128,
                 difficulty: Difficulty = Difficulty()) -> Layout:
  """The unpainted layout of one image, exactly as image_records draws it."""
  rng = _image_rng(seed, split, index)
  scene = SCENES[int(rng.integers(len(SCENES)))]
  return layout_scene(rng, scene, image_size, difficulty)


def image_records(seed: int, split: str, index: int, image_size: int = 128,
                  difficulty: Difficulty = Difficulty()) -> List[records.Record]:
  """The records of one image: a pure function of (seed, split, index, image_size, difficulty)."""
  rng = _image_rng(seed, split, index)
  scene = SCENES[int(rng.integers(len(SCENES)))]
  image, objects = render_scene(rng, scene, image_size, difficulty)
  png = encode_png(image)
  out = []
  for kind, (task, granularity) in KINDS.items():
    asked = []
    for q in range(difficulty.local_questions if kind in LOCAL_KINDS else 1):
      sample = _sample(rng, kind, scene, objects, image_size, asked)
      if sample is None:
        break
      prompt, answer, subject = sample
      asked.append(subject)
      out.append(_record(f'syn-{split}-{index:06d}-{kind}' + (f'.{q + 1}' if q else ''),
                         png, prompt, answer, task, granularity, objects))
  return out


def _record(record_id, png, prompt, answer, task, granularity, objects) -> records.Record:
  return records.Record(
        id=record_id, image=png,
        conversations=[{'from': 'human', 'value': '<image>\n' + prompt},
                       {'from': 'gpt', 'value': answer}],
        task=task, granularity=granularity,
        boxes=np.array([o.box for o in objects], np.float32).reshape(-1, 4),
        labels=[o.label for o in objects], colors=[o.color for o in objects],
        source=NAME, licence=LICENCE)


def record_position(record_id: str) -> Tuple[str, int]:
  """'syn-train-000123-count' -> ('train', 123); ValueError for an id not of this module."""
  parts = record_id.split('-')
  if len(parts) != 4 or parts[0] != 'syn' or parts[1] not in SPLITS or not parts[2].isdigit():
    raise ValueError(f'record id {record_id!r} is not a synthetic scene id '
                     "('syn-<split>-<index>-<kind>')")
  return parts[1], int(parts[2])


def counterfactual(sample: cda.Sample, kind: str, rng: np.random.Generator, palette,
                   params: Dict) -> Optional[cda.Sample]:
  """The CDA edit `kind` (cda.EDITS) of a synthetic scene, its picture rendered again from the
  scene's description with the edit made: the removed objects never drawn (the true background
  shows), a new colour painted with its own shade, a moved object drawn where its class may
  stand. The edit's choices, question and answer are those of the pixel edit; only the picture
  differs. params: generator_params of the sample's dataset. None when the edit does not apply."""
  split, index = record_position(sample.id)
  layout = image_layout(params['seed'], split, index, params['image_size'], params['difficulty'])
  objects = [p.object for p in layout.placed]
  if ([o.label for o in objects] != list(sample.labels) or not np.array_equal(
      np.asarray([o.box for o in objects], np.float32).reshape(-1, 4), sample.boxes)):
    raise ValueError(f'record {sample.id}: fields boxes/labels differ from the scene its '
                     f'dataset\'s generator params {params} render; not a re-renderable record')
  fits = lambda label, box: allowed_at(layout, label, box)
  edited = cda.EDITS[kind](sample, rng, palette, fits=fits, paint=False)  # drawn below instead
  if edited is None:
    return None
  drawn: List[Optional[SceneObject]] = list(objects)
  for i in edited.changes.get('removed', ()):
    drawn[i] = None
  if 'recoloured' in edited.changes:
    i, colour = edited.changes['recoloured']
    drawn[i] = drawn[i]._replace(color=colour)
  if 'moved' in edited.changes:
    i, box = edited.changes['moved']
    drawn[i] = drawn[i]._replace(box=tuple(int(round(v)) for v in box))
  return dataclasses.replace(edited, image=paint(layout, drawn))


# ---------------------------------------------------------------------------- dataset files

def recorded_params(num_images, seed, image_size, val_fraction,
                    difficulty: Difficulty = Difficulty()) -> Dict:
  """The generator params as recorded in the dataset's metadata (the difficulty only when it is
  not the default, so datasets of the original scenes keep their metadata)."""
  params = dict(num_images=int(num_images), seed=int(seed), image_size=int(image_size),
                val_fraction=float(val_fraction))
  if difficulty != Difficulty():
    params.update(object_scale=float(difficulty.object_scale),
                  max_objects=int(difficulty.max_objects), scene_mix=float(difficulty.scene_mix),
                  local_questions=int(difficulty.local_questions))
  return params


def dataset_name(num_images, seed, image_size, val_fraction,
                 difficulty: Difficulty = Difficulty()) -> str:
  """'n2000-s0-i128-v0.1', with '-o2.0-m5-x0.6-q3' (object scale, max objects, scene mix, local
  questions) when the difficulty is not the default: the tfds builder config's name and the
  cache folder's."""
  name = f'n{int(num_images)}-s{int(seed)}-i{int(image_size)}-v{float(val_fraction)}'
  if difficulty != Difficulty():
    name += (f'-o{float(difficulty.object_scale)}-m{int(difficulty.max_objects)}'
             f'-x{float(difficulty.scene_mix)}-q{int(difficulty.local_questions)}')
  return name


def split_sizes(num_images: int, val_fraction: float) -> Dict[str, int]:
  """Images per split; validation gets round(num_images * val_fraction), train at least one."""
  n_val = min(int(round(num_images * val_fraction)), num_images - 1)
  return {'train': num_images - n_val, 'validation': n_val}


def split_samples(split: str, num_images: int, seed: int, image_size: int = 128,
                  val_fraction: float = 0.2, difficulty: Difficulty = Difficulty()
                  ) -> Iterator[convert.Sample]:
  """The samples of one split, image by image (each rendered when the builder reaches it)."""
  for index in range(split_sizes(num_images, val_fraction)[split]):
    for record in image_records(seed, split, index, image_size, difficulty):
      yield split, NAME, record.id, (lambda r=record: r)


def _samples(manual_dir, skips, *, seed: int, licence: str, max_image_pixels: int,
             num_images: int = 2000, image_size: int = 128, val_fraction: float = 0.1,
             difficulty: Difficulty = Difficulty()):
  del manual_dir, skips, licence, max_image_pixels  # nothing is read, nothing can be skipped
  for split in SPLITS:
    yield from split_samples(split, num_images, seed, image_size, val_fraction, difficulty)


SPEC = convert.SourceSpec(
    name='synthetic', version='1.0.0',
    description='Procedurally rendered aerial scenes with exact boxes, labels and colours and '
                'one instruction sample per task kind (skymoe_jax/data/synthetic.py).',
    homepage='', citation='', licence=LICENCE, layout='(none: rendered, nothing is read)',
    splits=SPLITS, samples=_samples)


def empty_counts() -> Dict[str, Dict[str, int]]:
  return {'tasks': {t: 0 for t in tasks.TASKS},
          'granularities': {g: 0 for g in tasks.GRANULARITIES},
          'kinds': {k: 0 for k in KINDS}}


def count(counts: Dict, record: records.Record) -> None:
  """Adds a record to the summary's samples per task, granularity and kind."""
  counts['tasks'][record.task] += 1
  counts['granularities'][record.granularity] += 1
  counts['kinds'][record.id.rsplit('-', 1)[1].split('.')[0]] += 1


def _is_ours(path) -> bool:
  """True when path is missing, empty, or a dataset this module wrote (safe to replace)."""
  if not path.exists():
    return True
  if path.is_dir() and not any(path.iterdir()):
    return True
  try:
    info = json.loads((path / records.INFO_FILE).read_text())
  except (OSError, ValueError):
    return False
  return info.get('name') in (NAME, BUILDER)   # the old shard format or the tfds one


def generate(out_dir, num_images: int, seed: int, image_size: int = 128,
             val_fraction: float = 0.2, difficulty: Difficulty = Difficulty()) -> Dict:
  """Renders the dataset (the tfds builder skymoe_synthetic) into out_dir, its version folder,
  replacing an older synthetic dataset there only once the new one is complete; returns the
  summary: images and records per split, samples per task and per granularity."""
  if num_images < 1:
    raise ValueError(f'num_images must be at least 1, got {num_images}')
  if not 0.0 <= val_fraction < 1.0:
    raise ValueError(f'val_fraction must be in [0, 1), got {val_fraction}')
  if image_size < 32:
    raise ValueError(f'image_size must be at least 32 pixels, got {image_size}')
  difficulty = Difficulty(*difficulty).check()
  out = storage.path(out_dir)
  if not _is_ours(out):
    raise FileExistsError(f'{out} exists and is not a {NAME} dataset; not replacing it')
  from skymoe_jax.data import builders  # pylint: disable=g-import-not-at-top (imports tfds)
  built = builders.build_at(out, BUILDER, None, builders.synthetic_config(
      num_images, seed, image_size, val_fraction, difficulty), replaces=(NAME,))
  summary = {'images': split_sizes(num_images, val_fraction), 'records': built['splits'],
             **built['counts'], 'out': os.fspath(out)}
  logging.info('synthetic scenes written to %s: %s', out, json.dumps(summary))
  return summary


def ensure(out_dir, num_images: int, seed: int, image_size: int = 128,
           val_fraction: float = 0.2, difficulty: Difficulty = Difficulty()):
  """out_dir, generated first unless it already holds this exact dataset (same generator params
  and format version, in the tfds format, every data file present)."""
  out = storage.path(out_dir)
  difficulty = Difficulty(*difficulty)
  want = recorded_params(num_images, seed, image_size, val_fraction, difficulty)
  try:
    info = records.read_info(out)
  except (FileNotFoundError, ValueError, NotADirectoryError):
    info = None
  if (info and info['name'] == BUILDER and info['metadata'].get('generator') == want
      and info['metadata'].get('format_version') == FORMAT_VERSION
      and not records.missing_files(out)):
    return out
  logging.info('generating synthetic scenes in %s (%s)', out, want)
  generate(out, num_images, seed, image_size, val_fraction, difficulty)
  return out


def generator_params(info: Dict) -> Optional[Dict]:
  """The generator params of a dataset's records.read_info, or None when it is not ours."""
  if info.get('name') != BUILDER:
    return None
  g = dict(info.get('metadata', {}).get('generator') or {})
  if not g:
    return None
  d = Difficulty(**{k: g.pop(k) for k in Difficulty._fields if k in g})
  return dict(g, difficulty=d)
