"""Counting questions from the box annotations of detection datasets (DOTA-v2, HRRSD, RSOD).

The paper reports counting on these detection sets; they ship boxes, not questions. Each image
becomes one question per class:

  "<image>\\nHow many {class plural} are in this image? Answer with a number." -> "{count}"

task counting, granularity local; the record keeps the boxes of that class (axis-aligned, pixels
of the stored image; DOTA's quadrilaterals become their bounding rectangles), each labelled with
the class, so a local view can be cropped around them. Which classes are asked:
  - every class with at least one object in the image (all instances count, DOTA's `difficult`
    ones too: difficult to detect is still there);
  - plus, where the dataset annotates every class on every image (DOTA, HRRSD: `ask_absent`),
    one class absent from the image with answer 0, drawn from the vocabulary by a generator
    seeded with (seed, crc32 of the record key), so it depends on nothing but the image and the
    seed. RSOD annotates only its folder's class in each image, so an absent class there may be
    present unlabelled: no 0-questions.

An image is one input: its annotation either yields all its questions or the image is skipped
once, with the first problem found (an unknown category or a malformed line would make some count
wrong). Reasons: malformed_annotation (XML that does not parse, a <bndbox> without four numbers),
malformed_line (a DOTA line that is not 8 numbers, a category and an optional difficult flag),
unknown_category, bad_box (x2 <= x1 or y2 <= y1), box_outside_image (a box with no overlap with
the image; a box that only reaches past the border, as DOTA's cut-off objects do, is clipped),
and load_image's missing_image / undecodable_image / image_too_large. The layouts of the three
datasets are read in benchmarks.py.
"""
import dataclasses
import xml.etree.ElementTree as ET
import zlib
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from skymoe_jax.data import records
from skymoe_jax.data import template
from skymoe_jax.data.convert import Sample, Skip, Skips, load_image

IMAGE = template.LLAVA_V1.image_placeholder
PROMPT = 'How many {plural} are in this image? Answer with a number.'

# {class as written in the annotations: its plural in the question}, in the datasets' own order.
DOTA_V2_CLASSES = {
    'plane': 'planes', 'ship': 'ships', 'storage-tank': 'storage tanks',
    'baseball-diamond': 'baseball diamonds', 'tennis-court': 'tennis courts',
    'basketball-court': 'basketball courts', 'ground-track-field': 'ground track fields',
    'harbor': 'harbors', 'bridge': 'bridges', 'large-vehicle': 'large vehicles',
    'small-vehicle': 'small vehicles', 'helicopter': 'helicopters', 'roundabout': 'roundabouts',
    'soccer-ball-field': 'soccer ball fields', 'swimming-pool': 'swimming pools',
    'container-crane': 'container cranes', 'airport': 'airports', 'helipad': 'helipads'}
HRRSD_CLASSES = {
    'ship': 'ships', 'bridge': 'bridges', 'ground track field': 'ground track fields',
    'storage tank': 'storage tanks', 'basketball court': 'basketball courts',
    'tennis court': 'tennis courts', 'airplane': 'airplanes',
    'baseball diamond': 'baseball diamonds', 'harbor': 'harbors', 'vehicle': 'vehicles',
    'crossroad': 'crossroads', 'T junction': 'T junctions', 'parking lot': 'parking lots'}
RSOD_CLASSES = {
    'aircraft': 'aircraft', 'oiltank': 'oil tanks', 'overpass': 'overpasses',
    'playground': 'playgrounds'}
assert len(DOTA_V2_CLASSES) == 18 and len(HRRSD_CLASSES) == 13 and len(RSOD_CLASSES) == 4

Box = Tuple[float, float, float, float]   # x1 y1 x2 y2, pixels


@dataclasses.dataclass(frozen=True)
class Objects:
  """One image's annotated objects: a class name (as in the vocabulary) and a box each."""
  labels: Tuple[str, ...]
  boxes: Tuple[Box, ...]


def _key(name: str) -> str:
  # HRRSD and RSOD files are not consistent in '_', '-', ' ' or case ('T_junction', 'T junction').
  return ' '.join(name.replace('_', ' ').replace('-', ' ').lower().split())


def lookup(vocabulary: Dict[str, str]) -> Callable[[str], str]:
  """A function: a class name as written in an annotation -> its vocabulary spelling, or
  Skip('unknown_category')."""
  keys = {_key(c): c for c in vocabulary}

  def find(name: str) -> str:
    found = keys.get(_key(name))
    if found is None:
      raise Skip('unknown_category', 'category', f'{name!r} not in {sorted(vocabulary)}')
    return found
  return find


def _box(values: Sequence[float], field: str) -> Box:
  x1, y1, x2, y2 = values
  if not (x2 > x1 and y2 > y1):
    raise Skip('bad_box', field, f'{list(values)}: needs x2 > x1 and y2 > y1')
  return x1, y1, x2, y2


def parse_dota(text: str, vocabulary: Dict[str, str]) -> Objects:
  """The objects of a DOTA labelTxt file: `x1 y1 x2 y2 x3 y3 x4 y4 category [difficult]` per line,
  after optional `imagesource:...` / `gsd:...` header lines; a quadrilateral becomes its bounding
  rectangle."""
  find = lookup(vocabulary)
  labels, boxes = [], []
  for n, line in enumerate(text.splitlines(), 1):
    parts = line.split()
    if not parts or (':' in line and line.split(':')[0].strip().lower() in ('imagesource', 'gsd')):
      continue
    field = f'line {n}'
    if len(parts) not in (9, 10):
      raise Skip('malformed_line', field, f'{line.strip()!r}: expected 8 coordinates, a category '
                 'and a difficult flag')
    try:
      xy = np.asarray([float(v) for v in parts[:8]]).reshape(4, 2)
      if len(parts) == 10:
        int(parts[9])
    except ValueError:
      raise Skip('malformed_line', field, f'{line.strip()!r}: not numbers') from None
    if not np.isfinite(xy).all():
      raise Skip('malformed_line', field, f'{line.strip()!r}: not finite')
    labels.append(find(parts[8]))
    boxes.append(_box((*xy.min(0), *xy.max(0)), field))
  return Objects(tuple(labels), tuple(boxes))


def parse_dota_file(path, vocabulary: Dict[str, str]) -> Objects:
  """parse_dota of a labelTxt file; Skip('malformed_annotation') when it is not UTF-8 text."""
  try:
    text = path.read_bytes().decode('utf-8')
  except UnicodeDecodeError as e:
    raise Skip('malformed_annotation', 'file', f'not UTF-8 text ({e})') from None
  return parse_dota(text, vocabulary)


def parse_voc(data: bytes, vocabulary: Dict[str, str]) -> Objects:
  """The objects of a Pascal VOC annotation (<object> with <name> and <bndbox>)."""
  try:
    root = ET.fromstring(data)
  except ET.ParseError as e:
    raise Skip('malformed_annotation', 'xml', str(e)) from None
  find = lookup(vocabulary)
  labels, boxes = [], []
  for n, obj in enumerate(root.iter('object')):
    field = f'object {n}'
    name = obj.findtext('name')
    if not name or not name.strip():
      raise Skip('malformed_annotation', f'{field} name', 'absent')
    label = find(name.strip())
    try:
      values = [float(obj.findtext(f'bndbox/{k}')) for k in ('xmin', 'ymin', 'xmax', 'ymax')]
    except (TypeError, ValueError):
      raise Skip('malformed_annotation', f'{field} bndbox', 'absent or not numbers') from None
    if not np.isfinite(values).all():
      raise Skip('malformed_annotation', f'{field} bndbox', f'{values}: not finite')
    labels.append(label)
    boxes.append(_box(values, f'{field} bndbox'))
  return Objects(tuple(labels), tuple(boxes))


def fit_to_image(objects: Objects, width: int, height: int) -> Objects:
  """The boxes clipped to the image; Skip('box_outside_image') for a box with no overlap."""
  boxes = []
  for n, (x1, y1, x2, y2) in enumerate(objects.boxes):
    if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
      raise Skip('box_outside_image', f'object {n}',
                 f'{[x1, y1, x2, y2]} in a {width}x{height} image')
    boxes.append((max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))))
  return Objects(objects.labels, tuple(boxes))


def questions(objects: Objects, vocabulary: Dict[str, str], rng: Optional[np.random.Generator]
              ) -> List[Tuple[str, List[Box]]]:
  """(class, its boxes) to ask about, in vocabulary order: every present class, then one absent
  class drawn with rng (none when rng is None or every class is present)."""
  present = [c for c in vocabulary if c in objects.labels]
  asked = [(c, [b for l, b in zip(objects.labels, objects.boxes) if l == c]) for c in present]
  absent = [c for c in vocabulary if c not in present]
  if rng is not None and absent:
    asked.append((absent[int(rng.integers(len(absent)))], []))
  return asked


def absent_rng(seed: int, key: str) -> np.random.Generator:
  """The generator of one image's absent class: a function of (seed, key) only."""
  return np.random.default_rng([seed, zlib.crc32(key.encode('utf-8'))])


def image_samples(name: str, split: str, key: str, annotation_file, parse: Callable[[], Objects],
                  find_image: Callable[[], object], vocabulary: Dict[str, str], skips: Skips, *, seed: int,
                  licence: str, max_image_pixels: int, ask_absent: bool) -> Iterable[Sample]:
  """The counting samples of one image, `key` naming it in record ids (`<name>/<split>/<key>/
  <class>`). parse() reads the annotation, find_image() names the image file; each may raise
  Skip, and an image whose annotation or file is broken is added to skips once, here."""
  try:
    objects = parse()
    image = load_image(find_image(), max_pixels=max_image_pixels)
    objects = fit_to_image(objects, image.width, image.height)
  except Skip as skip:
    skips.add(skip, annotation_file, key, split)
    return
  rng = absent_rng(seed, f'{name}/{split}/{key}') if ask_absent else None
  for cls, boxes in questions(objects, vocabulary, rng):
    def make(cls=cls, boxes=boxes):
      prompt = PROMPT.format(plural=vocabulary[cls])
      return records.Record(
          id=f'{name}/{split}/{key}/{cls.replace(" ", "_")}', image=image.data,
          conversations=[{'from': 'human', 'value': f'{IMAGE}\n{prompt}'},
                         {'from': 'gpt', 'value': str(len(boxes))}],
          task='counting', granularity='local', boxes=np.asarray(boxes, np.float32),
          labels=[cls] * len(boxes), source=name, licence=licence,
          meta=dict(category=cls, count=len(boxes), image_id=key))
    yield split, annotation_file, f'{key} {cls}', make
