"""The box dialect registry: parse and write bounding boxes in each model family's text format.

Every dialect writes a box as normalised coordinates quantised to a fixed range:

  name          example                                     range      divisor  order
  geochat       {<10><20><50><60>|<45>}                      0-100 int  100      x1 y1 x2 y2 [|theta]
  vhm           [100, 200, 500, 600]                         0-1000 int 1000     x1 y1 x2 y2
  lhrs          [0.12, 0.30, 0.55, 0.80]                     0-1 float  1        x1 y1 x2 y2
  deepseek_vl2  <|det|>[[120, 300, 550, 800]]<|/det|>        0-999 int  999      x1 y1 x2 y2
  paligemma     <loc0123><loc0456><loc0789><loc1000>         0-1023 int 1024     y1 x1 y2 x2

A normalised coordinate is `value / divisor` of the image width (x) or height (y). PaliGemma's
1024 bins follow its documentation: pixel = value / 1024 * size (so bin 1023 is the last bin).

Pad-to-square: a model that saw the image padded to a square (LLaVA style: the short side padded
equally on both sides up to S = max(width, height)) gives coordinates relative to that square.
`parse(..., pad_to_square=True)` maps them back to pixels of the original image
(pixel = n * S - offset, offset = (S - size) / 2) and clips to the image; `format` does the inverse.

Boxes are always returned in pixels of the original image (`Box`), which is where IoU is computed.
"""
import dataclasses
import re
from typing import Callable, List, Optional, Sequence, Tuple, Union

from skymoe_jax import registry


class BoxParseError(ValueError):
  """A text holds no parsable box of a dialect, or a box with bad values; names both."""


@dataclasses.dataclass(frozen=True)
class Box:
  """An axis-aligned box in pixels of the original image; `angle` (GeoChat's theta) is kept but
  plays no part in `iou`."""
  x1: float
  y1: float
  x2: float
  y2: float
  angle: Optional[float] = None

  @property
  def area(self) -> float:
    return max(0.0, self.x2 - self.x1) * max(0.0, self.y2 - self.y1)


_NUM = r'-?\d+(?:\.\d+)?'
# One raw box found in a text: the four numbers as written (dialect order) and an optional angle.
_Raw = Tuple[Tuple[str, str, str, str], Optional[str]]


def _find_geochat(text: str) -> List[_Raw]:
  pattern = (r'\{\s*<(N)>\s*<(N)>\s*<(N)>\s*<(N)>\s*(?:\|\s*<(N)>\s*)?\}').replace('N', _NUM)
  return [(m.group(1, 2, 3, 4), m.group(5)) for m in re.finditer(pattern, text)]


_LIST4 = r'\[\s*(N)\s*,\s*(N)\s*,\s*(N)\s*,\s*(N)\s*\]'.replace('N', _NUM)


def _find_list(text: str) -> List[_Raw]:
  return [(m.group(1, 2, 3, 4), None) for m in re.finditer(_LIST4, text)]


def _find_deepseek(text: str) -> List[_Raw]:
  found = []
  for block in re.finditer(r'<\|det\|>(.*?)<\|/det\|>', text, flags=re.S):
    found.extend(_find_list(block.group(1)))
  return found


def _find_paligemma(text: str) -> List[_Raw]:
  pattern = r'<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>\s*<loc(\d{4})>'
  return [(m.group(1, 2, 3, 4), None) for m in re.finditer(pattern, text)]


def _num(value: float, integer: bool, decimals: int, width: int = 0) -> str:
  if integer:
    return f'{int(value):0{width}d}'
  return f'{value:.{decimals}f}'


def _angle_text(angle: float) -> str:
  return f'{angle:g}'


def _write_geochat(values: Sequence[Sequence[str]], angles: Sequence[Optional[float]]) -> str:
  parts = []
  for v, angle in zip(values, angles):
    theta = '' if angle is None else f'|<{_angle_text(angle)}>'
    parts.append('{' + ''.join(f'<{x}>' for x in v) + theta + '}')
  return ''.join(parts)


def _write_list(values, angles) -> str:
  del angles
  return ', '.join('[' + ', '.join(v) + ']' for v in values)


def _write_deepseek(values, angles) -> str:
  del angles
  return '<|det|>[' + ', '.join('[' + ', '.join(v) + ']' for v in values) + ']<|/det|>'


def _write_paligemma(values, angles) -> str:
  del angles
  return ' ; '.join(''.join(f'<loc{x}>' for x in v) for v in values)


@dataclasses.dataclass(frozen=True)
class Dialect:
  """One box text format: value range, divisor, coordinate order and its reader/writer."""
  name: str
  divisor: float            # normalised coordinate = value / divisor
  max_value: float          # values must lie in [0, max_value]
  integer: bool             # values are written as integers
  y_first: bool             # values are y1 x1 y2 x2
  find: Callable[[str], List[_Raw]]
  write: Callable[[Sequence[Sequence[str]], Sequence[Optional[float]]], str]
  decimals: int = 0         # digits written after the point (float dialects)
  digits: int = 0           # zero-padded width of written integers (0 = none)
  # How one value is written on its own ('<{}>': GeoChat's <37>), for dialects whose values are
  # delimited pieces of text; '' when values sit inside a list with other numbers.
  value_piece: str = ''

  @property
  def step(self) -> float:
    """One quantisation step as a fraction of the (padded) image side."""
    return (1.0 if self.integer else 10.0 ** -self.decimals) / self.divisor


DIALECTS = {d.name: d for d in (
    Dialect('geochat', 100, 100, True, False, _find_geochat, _write_geochat, value_piece='<{}>'),
    Dialect('vhm', 1000, 1000, True, False, _find_list, _write_list),
    Dialect('lhrs', 1.0, 1.0, False, False, _find_list, _write_list, decimals=2),
    Dialect('deepseek_vl2', 999, 999, True, False, _find_deepseek, _write_deepseek),
    Dialect('paligemma', 1024, 1023, True, True, _find_paligemma, _write_paligemma, digits=4,
            value_piece='<loc{:04d}>'),
)}


def get_dialect(dialect: Union[str, Dialect]) -> Dialect:
  if isinstance(dialect, Dialect):
    return dialect
  return registry.lookup(DIALECTS, dialect, 'dialect', 'box dialect')


def coordinate_pieces(dialect: Union[str, Dialect]) -> List[str]:
  """Every value of the dialect as the text piece it is written as ('<0>' ... '<100>' for
  geochat): a tokenizer that keeps each one whole reads a coordinate as one token. Raises
  ValueError for a dialect whose values are not delimited pieces (numbers in a list)."""
  d = get_dialect(dialect)
  if not d.value_piece:
    raise ValueError(f'box dialect {d.name!r} writes its values inside a list, not as pieces of '
                     'their own; coordinate tokens need one of '
                     f'{sorted(n for n, x in DIALECTS.items() if x.value_piece)}')
  return [d.value_piece.format(v) for v in range(int(d.max_value) + 1)]


def _frame(width: float, height: float, pad_to_square: bool):
  """(side_x, side_y, offset_x, offset_y): the frame normalised coordinates refer to."""
  if width <= 0 or height <= 0:
    raise ValueError(f'image size must be positive, got {width}x{height}')
  if not pad_to_square:
    return float(width), float(height), 0.0, 0.0
  side = float(max(width, height))
  return side, side, (side - width) / 2.0, (side - height) / 2.0


def parse(dialect: Union[str, Dialect], text: str, width: float, height: float,
          pad_to_square: bool = False) -> List[Box]:
  """All boxes of `dialect` in `text`, in pixels of the original width x height image.

  Raises BoxParseError (naming the dialect, quoting the text) when no box is found, a value lies
  outside the dialect's range, or a box has x2 < x1 or y2 < y1. Boxes reaching into the padding
  (pad_to_square) are clipped to the image.
  """
  d = get_dialect(dialect)
  raw = d.find(text)
  if not raw:
    raise BoxParseError(f'no {d.name} box found in {text!r}')
  sx, sy, ox, oy = _frame(width, height, pad_to_square)
  boxes = []
  for values, angle in raw:
    v = [float(x) for x in values]
    if any(not 0 <= x <= d.max_value for x in v):
      raise BoxParseError(
          f'{d.name} box values {list(values)} outside [0, {d.max_value:g}] in {text!r}')
    a, b, c, e = (x / d.divisor for x in v)
    x1, y1, x2, y2 = (b, a, e, c) if d.y_first else (a, b, c, e)
    if x2 < x1 or y2 < y1:
      raise BoxParseError(f'{d.name} box {list(values)} has x2 < x1 or y2 < y1 in {text!r}')
    px = [min(max(x * sx - ox, 0.0), float(width)) for x in (x1, x2)]
    py = [min(max(y * sy - oy, 0.0), float(height)) for y in (y1, y2)]
    boxes.append(Box(px[0], py[0], px[1], py[1], None if angle is None else float(angle)))
  return boxes


def try_parse(dialect: Union[str, Dialect], text: str, width: float, height: float,
              pad_to_square: bool = False) -> Optional[List[Box]]:
  """`parse`, or None when it fails (evaluation counts that as a miss and a parse failure)."""
  try:
    return parse(dialect, text, width, height, pad_to_square)
  except BoxParseError:
    return None


def format(dialect: Union[str, Dialect], box: Union[Box, Sequence[Box]], width: float,  # pylint: disable=redefined-builtin
           height: float, pad_to_square: bool = False) -> str:
  """The text of one box (or several, in order) in `dialect`; values are rounded and clamped to
  the dialect's range. Angles are written only by dialects that have them (geochat)."""
  d = get_dialect(dialect)
  boxes = [box] if isinstance(box, Box) else list(box)
  if not boxes:
    raise ValueError('format needs at least one box')
  sx, sy, ox, oy = _frame(width, height, pad_to_square)
  values = []
  for b in boxes:
    xs = [(x + ox) / sx for x in (b.x1, b.x2)]
    ys = [(y + oy) / sy for y in (b.y1, b.y2)]
    order = (ys[0], xs[0], ys[1], xs[1]) if d.y_first else (xs[0], ys[0], xs[1], ys[1])
    quantised = []
    for n in order:
      q = n * d.divisor
      q = round(q) if d.integer else round(q, d.decimals)
      quantised.append(_num(min(max(q, 0), d.max_value), d.integer, d.decimals, d.digits))
    values.append(quantised)
  return d.write(values, [b.angle for b in boxes])


def iou(a: Box, b: Box) -> float:
  """Intersection over union of two boxes in pixels, axis-aligned: angles are ignored."""
  iw = min(a.x2, b.x2) - max(a.x1, b.x1)
  ih = min(a.y2, b.y2) - max(a.y1, b.y1)
  inter = max(0.0, iw) * max(0.0, ih)
  union = a.area + b.area - inter
  return inter / union if union > 0 else 0.0
