"""Converters from external formats into the project's sharded records, and what they share.

  instruct.py    LLaVA/GeoChat instruction JSON / jsonl
  benchmarks.py  UC Merced, NWPU-RESISC45, RSVQA-LR, DIOR-RSVG, UCM-Captions (manual_dir layouts)
  neon.py        the NEON tree tiles shipped in the deepforest wheel (counting, grounding)

Every converter follows the same contract. A bad input record never stops a conversion and is
never silently lost: the per-record code raises `Skip(reason, field)`, the loop catches it, counts
the reason and logs one warning naming the file, the record and the field (`Skips`). The summary a
converter returns (and its CLI prints as the last stdout line) is
`{"written": N, "skipped": {reason: count}, "splits": {split: records}, ...}`; the same counts go
into dataset_info.json (`skipped`, and `skipped_per_split`).

Images are stored as their original bytes when they are PNG or JPEG and re-encoded to PNG
otherwise (TIFF, BMP, ...); every stored image has been fully decoded once (`load_image`).

Evaluation extras (RSVQA question types, all reference captions) go to `Record.meta`.
"""
import collections
import dataclasses
import io
import logging
import pathlib
from typing import Dict, Mapping, Union

from PIL import Image

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


@dataclasses.dataclass(frozen=True)
class EncodedImage:
  data: bytes      # PNG or JPEG
  width: int
  height: int
  format: str      # format of `data`: PNG or JPEG


def encode_image(data: bytes, field: str = 'image') -> EncodedImage:
  """The bytes of an image as stored: PNG/JPEG unchanged, other formats re-encoded to PNG.

  Raises Skip('undecodable_image') when PIL cannot fully decode it (truncated or corrupt data
  fails in `load`, which decodes every pixel; `verify` alone misses truncated JPEGs).
  """
  try:
    with Image.open(io.BytesIO(data)) as im:
      im.load()
      fmt, size = im.format, im.size
      if fmt in KEPT_FORMATS:
        return EncodedImage(data, size[0], size[1], fmt)
      return encode_array(im, field)
  except Skip:
    raise
  except Exception as e:  # PIL raises OSError, ValueError, SyntaxError, DecompressionBombError...
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


def load_image(path: Union[str, pathlib.Path], field: str = 'image') -> EncodedImage:
  """`encode_image` of a file; Skip('missing_image') when it is not there."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise Skip('missing_image', field, f'no file {path}')
  return encode_image(path.read_bytes(), field)


def clear_split(out_dir, split: str) -> None:
  """Removes an earlier conversion's shards of `split`: a rerun that writes fewer shards must not
  leave stale ones behind."""
  for path in pathlib.Path(out_dir).glob(f'{split}-[0-9][0-9][0-9][0-9][0-9].tfrecord'):
    path.unlink()


def check_merge(out_dir, name: str) -> None:
  """Raises unless out_dir is empty of datasets or holds dataset `name` (before any shard is
  written, so a wrong --out never clobbers another dataset's split)."""
  path = pathlib.Path(out_dir) / records.INFO_FILE
  if path.exists():
    old = records.read_info(out_dir)['name']
    if old != name:
      raise ValueError(f'{out_dir} holds dataset {old!r}, not {name!r}; pick another --out')


def finish(out_dir, name: str, licence: str, splits: Mapping[str, Dict], skips: Skips,
           merge: bool = False, **extra) -> Dict:
  """Writes dataset_info.json and returns the summary.

  merge=True keeps the other splits of an existing dataset of the same name in out_dir (the
  instruction converter writes one split per call); a different name there is an error.
  """
  out_dir = pathlib.Path(out_dir)
  all_splits = dict(splits)
  per_split = {s: dict(c) for s, c in skips.per_split.items() if c}
  if merge and (out_dir / records.INFO_FILE).exists():
    check_merge(out_dir, name)
    old = records.read_info(out_dir)
    for split, entry in old['splits'].items():
      if split not in splits:
        all_splits[split] = entry
        if split in old.get('skipped_per_split', {}):
          per_split[split] = old['skipped_per_split'][split]
  totals = collections.Counter()
  for counts in per_split.values():
    totals.update(counts)
  records.write_info(out_dir, name=name, licence=licence, splits=all_splits,
                     skipped=dict(sorted(totals.items())), skipped_per_split=per_split, **extra)
  return dict(written=sum(s['records'] for s in splits.values()),
              skipped=dict(sorted(skips.counts.items())),
              splits={s: e['records'] for s, e in splits.items()},
              out=str(out_dir), name=name, **extra)
