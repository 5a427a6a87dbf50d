"""NEON aerial RGB tiles with tree boxes (the deepforest 2.1.0 wheel's data/, MIT) -> counting and
grounding records (the tfds builder skymoe_neon, data/builders.py; manual_dir: a folder of that
layout, default the installed wheel's data/).

The wheel is installed with `pip install --no-deps deepforest==2.1.0` and never imported (its
dependency pins conflict with ours, so `import deepforest` fails): `find_data_dir` locates the
package's data/ folder with importlib.util.find_spec.

Annotations come as CSV files (image_path,xmin,ymin,xmax,ymax,label) and Pascal VOC XML, and the
wheel has overlaps: OSBS_029 is annotated three times (two CSVs, one XML; its image as .tif and as
a pixel-identical .png), and example.csv holds 79 boxes of a tile whose XML has 279. A tile is an
image stem; of its annotation files the one with the most boxes is used (ties: the one whose image
is PNG/JPEG, then the file name). Images without annotations (SOAP_031, the drone photo) are not
used. The wheel gives 4 tiles with 951 boxes: 574 + 279 + 61 + 37.

Tiles are cut into CROP_SIZE (400 px) crops so that counts stay moderate: along each side
ceil(side / 400) crops, evenly spaced from edge to edge (so neighbours overlap a little and no
sliver is left over); a side shorter than 400 px is one crop of that side. A box is clipped to the
crop and kept when at least MIN_VISIBLE (half) of its area lies inside; the others are dropped and
counted (`boxes_dropped_at_crop_edge`). A tile of one crop keeps its original PNG/JPEG bytes;
other crops are PNG.

Per crop: a counting record ("How many trees are there in the image?" -> the number of kept boxes)
and, when it has 1..MAX_GROUNDING_BOXES trees, a grounding record ("[refer] give me the location of
all trees" -> the GeoChat boxes in reading order). Both carry the kept boxes in crop pixels with the
annotation's label (Tree, or Alive/Dead for SOAP_061). Split by tile, so overlapping crops never
straddle splits: TEST_TILES -> test, the rest -> train.

A tile image named by an annotation must lie inside data_dir (image_outside_images_dir) and have at
most max_image_pixels pixels (image_too_large); either is a counted skip of the whole tile.
"""
import csv
import dataclasses
import functools
import importlib.util
import io
import logging
import math
import pathlib
import xml.etree.ElementTree as ET
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from skymoe_jax import storage
from skymoe_jax.data import boxes as boxes_lib
from skymoe_jax.data import image_ops
from skymoe_jax.data import records
from skymoe_jax.data import template
from skymoe_jax.data.convert import (KEPT_FORMATS, Sample, Skip, Skips, SourceSpec, encode_array,
                                     encode_image, image_path, load_image)

log = logging.getLogger(__name__)

NAME = 'neon_trees'
LICENCE = 'MIT (deepforest 2.1.0 package data)'
CROP_SIZE = 400
MIN_VISIBLE = 0.5
MAX_GROUNDING_BOXES = 30   # ~20 tokens per GeoChat box: longer answers would crowd the context
TEST_TILES = ('2019_YELL_2_541000_4977000_image_crop',)
CSV_COLUMNS = ('image_path', 'xmin', 'ymin', 'xmax', 'ymax', 'label')
IMAGE = template.LLAVA_V1.image_placeholder
COUNT_PROMPT = 'How many trees are there in the image?'
REFER_PROMPT = '[refer] give me the location of all trees'


def find_data_dir() -> Optional[pathlib.Path]:
  """The installed deepforest package's data/ folder, or None (the package is not imported)."""
  try:
    spec = importlib.util.find_spec('deepforest')
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for location in spec.submodule_search_locations:
    data = pathlib.Path(location) / 'data'
    if data.is_dir():
      return data
  return None


@dataclasses.dataclass
class Annotation:
  file: pathlib.Path               # the CSV / XML it came from
  image: pathlib.Path
  boxes: List[Tuple[float, float, float, float]]
  labels: List[str]

  @property
  def tile(self) -> str:
    return self.image.stem


def _box(values, where: str) -> Tuple[float, float, float, float]:
  try:
    x1, y1, x2, y2 = (float(v) for v in values)
  except (TypeError, ValueError):
    raise Skip('bad_box', 'xmin..ymax', f'{values} at {where} are not numbers') from None
  if not (x2 > x1 and y2 > y1 and min(x1, y1) >= 0):
    raise Skip('bad_box', 'xmin..ymax', f'{[x1, y1, x2, y2]} at {where}')
  return x1, y1, x2, y2


def read_annotations(data_dir, skips: Skips) -> List[Annotation]:
  """Every (annotation file, image) pair of data_dir; bad boxes are skipped and counted."""
  data_dir = pathlib.Path(data_dir)
  found: Dict[Tuple[pathlib.Path, str], Annotation] = {}

  def add(file, image_name, box_values, label, where):
    key = (file, image_name)
    if key not in found:
      found[key] = Annotation(file, data_dir / image_name, [], [])
    try:
      found[key].boxes.append(_box(box_values, where))
      found[key].labels.append(label or 'Tree')
    except Skip as skip:
      skips.add(skip, file, where)

  for path in sorted(data_dir.glob('*.csv')):
    with open(path, newline='', encoding='utf-8') as f:
      reader = csv.DictReader(f)
      if not set(CSV_COLUMNS) <= set(reader.fieldnames or ()):
        continue  # e.g. classes.csv: not a box file
      for n, row in enumerate(reader, 2):
        add(path, row['image_path'], [row[k] for k in CSV_COLUMNS[1:5]], row['label'],
            f'line {n}')
  for path in sorted(data_dir.glob('*.xml')):
    try:
      root = ET.parse(path).getroot()
    except ET.ParseError as e:
      skips.add(Skip('unreadable_annotation', '<file>', str(e)), path, 'whole file')
      continue
    image_name = (root.findtext('filename') or '').strip()
    for n, obj in enumerate(root.findall('object')):
      values = [obj.findtext(f'bndbox/{k}') for k in ('xmin', 'ymin', 'xmax', 'ymax')]
      add(path, image_name, values, (obj.findtext('name') or '').strip(), f'object {n}')
  return list(found.values())


def choose_tiles(annotations: Sequence[Annotation]) -> Dict[str, Annotation]:
  """{tile: the annotation with the most boxes}; see the module docstring for ties."""
  best: Dict[str, Annotation] = {}

  def rank(a: Annotation):
    kept = a.image.suffix.lower() in ('.png', '.jpg', '.jpeg')
    return (-len(a.boxes), not kept, a.file.name)
  for a in annotations:
    if a.tile not in best or rank(a) < rank(best[a.tile]):
      best[a.tile] = a
  return dict(sorted(best.items()))


def crop_starts(size: int, crop: int) -> List[int]:
  """Starts of ceil(size / crop) crops evenly spaced over [0, size] (one crop if size <= crop)."""
  if size <= crop:
    return [0]
  n = math.ceil(size / crop)
  return [int(round(i * (size - crop) / (n - 1))) for i in range(n)]


def crop_boxes(boxes: np.ndarray, x0: int, y0: int, w: int, h: int,
               min_visible: float = MIN_VISIBLE) -> Tuple[np.ndarray, np.ndarray]:
  """(boxes clipped to the crop in crop pixels, keep mask over the input boxes)."""
  boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
  local = boxes - np.array([x0, y0, x0, y0], np.float64)
  clipped = np.stack([np.clip(local[:, 0], 0, w), np.clip(local[:, 1], 0, h),
                      np.clip(local[:, 2], 0, w), np.clip(local[:, 3], 0, h)], axis=1)
  area = (local[:, 2] - local[:, 0]) * (local[:, 3] - local[:, 1])
  visible = (clipped[:, 2] - clipped[:, 0]) * (clipped[:, 3] - clipped[:, 1])
  keep = visible >= min_visible * area
  return clipped[keep].astype(np.float32), keep


def _reading_order(boxes: np.ndarray) -> np.ndarray:
  return np.lexsort((boxes[:, 0], boxes[:, 1])) if len(boxes) else np.zeros(0, np.int64)


def samples(manual_dir, skips: Skips, *, seed: int = 0, licence: str = LICENCE,
            max_image_pixels: int = image_ops.MAX_IMAGE_PIXELS, crop_size: int = CROP_SIZE,
            min_visible: float = MIN_VISIBLE, max_grounding_boxes: int = MAX_GROUNDING_BOXES,
            test_tiles: Sequence[str] = TEST_TILES, stats: Optional[Dict] = None
            ) -> Iterator[Sample]:
  """The samples of the tiles in manual_dir (the deepforest data/ folder layout), tile by tile,
  crop by crop: count, then refer. Whole-tile skips (the image) and boxes outside their image go
  to `skips` here; `stats` (when given) gets tiles, crops, boxes, boxes_kept, ... and
  annotation_files."""
  del seed  # the crops are fixed
  data_dir = storage.path(manual_dir)
  stats = {} if stats is None else stats
  stats.update(tiles=0, crops=0, boxes=0, boxes_kept=0, boxes_dropped_at_crop_edge=0,
               grounding_not_made_no_trees=0, grounding_not_made_too_many_trees=0,
               annotation_files={})
  tiles = choose_tiles(read_annotations(data_dir, skips))
  for tile, ann in tiles.items():
    split = 'test' if tile in test_tiles else 'train'
    try:
      encoded = load_image(image_path(data_dir, ann.image), max_pixels=max_image_pixels)
    except Skip as skip:
      skips.add(skip, ann.file, f'tile {tile}', split)
      continue
    with Image.open(io.BytesIO(encoded.data)) as im:
      im = im.convert('RGB') if im.mode != 'RGB' else im.copy()
    width, height = im.size
    tile_boxes = np.asarray(ann.boxes, np.float64).reshape(-1, 4)
    # Boxes reaching past the image edge are clipped to it; boxes wholly outside are bad.
    inside = (tile_boxes[:, 0] < width) & (tile_boxes[:, 1] < height)
    for i in np.flatnonzero(~inside):
      skips.add(Skip('bad_box', 'xmin..ymax', f'{tile_boxes[i].tolist()} outside {width}x{height}'),
                ann.file, f'box {i}', split)
    labels = [l for l, ok in zip(ann.labels, inside) if ok]
    tile_boxes = tile_boxes[inside]
    tile_boxes[:, 2] = np.minimum(tile_boxes[:, 2], width)
    tile_boxes[:, 3] = np.minimum(tile_boxes[:, 3], height)
    stats['tiles'] += 1
    stats['boxes'] += len(tile_boxes)
    stats['annotation_files'][tile] = ann.file.name
    whole = len(crop_starts(width, crop_size)) == 1 and len(crop_starts(height, crop_size)) == 1
    for y0 in crop_starts(height, crop_size):
      for x0 in crop_starts(width, crop_size):
        w, h = min(crop_size, width), min(crop_size, height)
        kept, keep = crop_boxes(tile_boxes, x0, y0, w, h, min_visible)
        order = _reading_order(kept)
        kept = kept[order]
        kept_labels = [labels[i] for i in np.flatnonzero(keep)[order]]
        stats['crops'] += 1
        stats['boxes_kept'] += len(kept)
        # Dropped: boxes touching the crop but mostly outside it.
        local = tile_boxes - np.array([x0, y0, x0, y0])
        touching = (local[:, 2] > 0) & (local[:, 3] > 0) & (local[:, 0] < w) & (local[:, 1] < h)
        stats['boxes_dropped_at_crop_edge'] += int(np.sum(touching & ~keep))
        crop = _crop_image(im, encoded, whole, x0, y0, w, h)
        crop_id = f'{NAME}/{tile}/{x0}_{y0}'
        yield split, ann.image, f'crop {x0},{y0}', functools.partial(
            _record, crop, f'{crop_id}/count', 'counting',
            COUNT_PROMPT, str(len(kept)), kept, kept_labels, licence)
        if not len(kept):
          stats['grounding_not_made_no_trees'] += 1
        elif len(kept) > max_grounding_boxes:
          stats['grounding_not_made_too_many_trees'] += 1
        else:
          answer = boxes_lib.format('geochat', [boxes_lib.Box(*b) for b in kept.tolist()], w, h)
          yield split, ann.image, f'crop {x0},{y0}', functools.partial(
              _record, crop, f'{crop_id}/refer', 'grounding', REFER_PROMPT, answer, kept,
              kept_labels, licence)
  log.info('%s: %s', NAME, stats)


def _crop_image(im, encoded, whole: bool, x0: int, y0: int, w: int, h: int):
  """make() of the crop's image bytes, once for its two records (a Skip is raised by each)."""
  @functools.lru_cache(maxsize=1)
  def make():
    if whole and encoded.format in KEPT_FORMATS:
      return encoded
    # A fresh PNG, decoded once more so that every stored image is known to decode.
    return encode_image(encode_array(im.crop((x0, y0, x0 + w, y0 + h))).data)
  return make


def _record(crop, record_id, task, prompt, answer, kept, kept_labels, licence) -> records.Record:
  return records.Record(
      id=record_id, task=task, granularity='local', image=crop().data, boxes=kept,
      labels=kept_labels, source=NAME, licence=licence,
      conversations=[{'from': 'human', 'value': f'{IMAGE}\n{prompt}'},
                     {'from': 'gpt', 'value': answer}])


SPEC = SourceSpec(
    name='neon', version='1.0.0',
    description=__doc__, homepage='https://github.com/weecology/DeepForest',
    citation='Weinstein, B. G. et al. (2020). DeepForest: A Python package for RGB deep '
             'learning tree crown delineation. Methods in Ecology and Evolution 11(12).',
    licence=LICENCE,
    layout='the deepforest data/ folder: <tile>.png|.tif|.jpg with <name>.csv (image_path,'
           'xmin,ymin,xmax,ymax,label) or <name>.xml (Pascal VOC) annotations; default: the '
           'installed wheel (pip install --no-deps deepforest==2.1.0)',
    splits=('train', 'test'), samples=samples)
