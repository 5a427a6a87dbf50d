"""Readers of external formats, as the samples the tfds builders (data/builders.py) write.

  instruct.py    LLaVA/GeoChat instruction JSON / jsonl
  benchmarks.py  the classic RS benchmarks, read from their published layouts in manual_dir
  counting.py    counting questions from box annotations (DOTA-v2, HRRSD, RSOD)
  neon.py        the NEON tree tiles shipped in the deepforest wheel (counting, grounding)

Every source is a `SourceSpec`: names, citation, licence, its manual_dir layout, and
`samples(manual_dir, skips, *, seed, licence, max_image_pixels)`, an iterator of `Sample`s
(split, input file, where, make). A bad input record never stops a build and is never silently
lost: make() raises `Skip(reason, field)`, the builder catches it, counts the reason and logs one
warning naming the file, the record and the field (`Skips`); inputs left out before a sample
exists, samples() counts itself. The summary a build returns (and its data_prep/ command prints
as the last stdout line) is `{"written": N, "skipped": {reason: count}, "splits": {split:
records}, "out": version folder, ...}`; the same counts go into the dataset's metadata.json
(`skipped`, and `skipped_per_split`).

Images are stored as their original bytes when they are PNG or JPEG and re-encoded to PNG
otherwise (TIFF, BMP, ...); every stored image has been fully decoded once (`load_image`). An
image name read from an input file must name a file inside the folder it is looked up in, after
resolving `..` and symlinks (`image_path`; else Skip('image_outside_images_dir')): an instruction
file cannot pull /etc/passwd or another user's image into a dataset. An image of more than
`max_image_pixels` pixels (default image_ops.MAX_IMAGE_PIXELS, the default of
config.data.max_image_pixels) is skipped as image_too_large, refused from its header before it is
decoded. Skipped, not downscaled: a record's boxes, and any annotation or answer written in pixels,
are in pixels of the stored image, and a silent resize would make them wrong unless every converter
rescaled every one of them; a counted skip names the image, and the user can downscale on purpose.

A build replaces an existing dataset only once the new one is complete (builders.build_at).

Evaluation extras (RSVQA question types, all reference captions) go to `Record.meta`.
"""
import collections
import dataclasses
import io
import logging
import os
import pathlib
import posixpath
from typing import Callable, Dict, Iterable, Tuple, Union

from etils import epath
from PIL import Image

from skymoe_jax import storage
from skymoe_jax.data import image_ops
from skymoe_jax.data import records

log = logging.getLogger(__name__)

# Formats stored as they are; anything else PIL can decode is re-encoded to PNG.
KEPT_FORMATS = ('PNG', 'JPEG')
NO_SPLIT = '(no split)'   # skipped_per_split key of inputs skipped before a split was known


class Skip(Exception):
  """Raised by per-record conversion code: the record is skipped for `reason` (a short snake_case
  name that becomes a key of the summary's `skipped`), `field` names the offending input field."""

  def __init__(self, reason: str, field: str, detail: str = ''):
    super().__init__(f'{reason}: field {field!r} {detail}'.strip())
    self.reason, self.field, self.detail = reason, field, detail


class Skips:
  """Counts skipped records by reason (overall and per split) and logs each one."""

  def __init__(self):
    self.counts = collections.Counter()
    self.per_split: Dict[str, collections.Counter] = collections.defaultdict(collections.Counter)

  def add(self, skip: Skip, file, record, split: str = NO_SPLIT) -> None:
    self.counts[skip.reason] += 1
    self.per_split[split][skip.reason] += 1
    log.warning('skipped %s record %s: field %r: %s%s', file, record, skip.field, skip.reason,
                f' ({skip.detail})' if skip.detail else '')

  def count(self, reason: str, n: int = 1, split: str = NO_SPLIT) -> None:
    """Counts records left out by design (e.g. RSVQA's inactive questions): no per-record log."""
    if n:
      self.counts[reason] += n
      self.per_split[split][reason] += n


# One sample of a source: (split, input file, record name for the log, make() -> record). The
# builder calls make(); a Skip it raises is counted with skips.add(skip, file, where, split).
Sample = Tuple[str, object, str, Callable[[], records.Record]]


@dataclasses.dataclass(frozen=True)
class SourceSpec:
  """What a tfds builder (data/builders.py) needs to know of one source read from manual_dir.

  `samples(manual_dir, skips, *, seed, licence, max_image_pixels)` yields the source's samples in
  a fixed order (record i of a split is the i-th sample of that split whose make() succeeds);
  inputs it leaves out before a sample exists (an unreadable list line, an inactive question) it
  adds to `skips` itself. `layout` is the published file layout under manual_dir, shown as the
  builder's MANUAL_DOWNLOAD_INSTRUCTIONS; `licence` is the default licence stored in each record.
  """
  name: str                 # e.g. 'ucmerced'; the tfds builder is skymoe_<name>
  version: str              # e.g. '1.0.0'
  description: str
  homepage: str
  citation: str
  licence: str
  layout: str
  splits: Tuple[str, ...]   # the splits it can yield, e.g. ('train', 'val', 'test')
  samples: Callable[..., Iterable[Sample]]


@dataclasses.dataclass(frozen=True)
class EncodedImage:
  data: bytes      # PNG or JPEG
  width: int
  height: int
  format: str      # format of `data`: PNG or JPEG


def encode_image(data: bytes, field: str = 'image',
                 max_pixels: int = image_ops.MAX_IMAGE_PIXELS) -> EncodedImage:
  """The bytes of an image as stored: PNG/JPEG unchanged, other formats re-encoded to PNG.

  Raises Skip('image_too_large') above `max_pixels` (read from the header, nothing decoded), and
  Skip('undecodable_image') when PIL cannot fully decode it (truncated or corrupt data fails in
  `load`, which decodes every pixel; `verify` alone misses truncated JPEGs).
  """
  try:
    im = image_ops.open_image(data, max_pixels)
  except image_ops.ImageTooLargeError as e:
    raise Skip('image_too_large', field, str(e)) from None
  except image_ops.ImageDecodeError as e:
    raise Skip('undecodable_image', field, str(e)) from None
  try:
    with im:
      im.load()
      fmt, size = im.format, im.size
      if fmt in KEPT_FORMATS:
        return EncodedImage(data, size[0], size[1], fmt)
      return encode_array(im, field)
  except Skip:
    raise
  except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, ...
    raise Skip('undecodable_image', field, f'{type(e).__name__}: {e}') from None


def encode_array(im: Image.Image, field: str = 'image') -> EncodedImage:
  """A decoded PIL image (e.g. a crop) as PNG bytes; modes PNG cannot hold become RGB."""
  if im.mode not in ('RGB', 'RGBA', 'L', 'LA', 'P', '1', 'I;16'):
    try:
      im = im.convert('RGB')
    except Exception as e:  # e.g. float or multi-band images with no RGB meaning
      raise Skip('undecodable_image', field, f'mode {im.mode} -> RGB: {e}') from None
  out = io.BytesIO()
  im.save(out, format='PNG')
  return EncodedImage(out.getvalue(), im.size[0], im.size[1], 'PNG')


def image_path(root, name: str, field: str = 'image') -> epath.Path:
  """root/name, resolved (`..` and symlinks), when it lies inside root, resolved too; raises
  Skip('image_outside_images_dir') when it does not (a relative path climbing out, an absolute
  path, a symlink pointing out) and Skip('missing_image') for a name no file can have.

  root may be a local path or a bucket URL (storage.path); a bucket has no symlinks, so there the
  name is normalised (`..` removed) and must stay below root."""
  root = storage.path(root)
  try:
    if storage.is_remote(root):
      base = root
      if '\0' in name or name.startswith('/'):
        raise ValueError('absolute path or NUL byte')
      rel = posixpath.normpath(name)
      inside = rel != '.' and not rel.startswith('../') and rel != '..'
      path = root / rel
    else:
      base = epath.Path(os.path.realpath(os.fspath(root)))
      path = epath.Path(os.path.realpath(os.path.join(os.fspath(root), name)))
      inside = pathlib.Path(path).is_relative_to(pathlib.Path(base))
  except (OSError, ValueError) as e:  # e.g. an embedded NUL byte, a symlink loop
    raise Skip('missing_image', field, f'{name!r} is not a usable path ({e})') from None
  if not inside:
    raise Skip('image_outside_images_dir', field, f'{name!r} resolves to {path}, outside {base}')
  return path


def load_image(path: Union[str, os.PathLike], field: str = 'image',
               max_pixels: int = image_ops.MAX_IMAGE_PIXELS) -> EncodedImage:
  """`encode_image` of a file (local or in a bucket); Skip('missing_image') when it is not there."""
  path = storage.path(path)
  if not path.is_file():
    raise Skip('missing_image', field, f'no file {path}')
  return encode_image(path.read_bytes(), field, max_pixels)
