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
otherwise (TIFF, BMP, ...); every stored image has been fully decoded once (`load_image`). An
image name read from an input file must name a file inside the folder it is looked up in, after
resolving `..` and symlinks (`image_path`; else Skip('image_outside_images_dir')): an instruction
file cannot pull /etc/passwd or another user's image into a dataset. An image of more than
`max_image_pixels` pixels (default image_ops.MAX_IMAGE_PIXELS, the default of
config.data.max_image_pixels) is skipped as image_too_large, refused from its header before it is
decoded. Skipped, not downscaled: a record's boxes, and any annotation or answer written in pixels,
are in pixels of the stored image, and a silent resize would make them wrong unless every converter
rescaled every one of them; a counted skip names the image, and the user can downscale on purpose.

A conversion replaces a split of an existing dataset only once the new split is complete
(`Output`): shards are written into a staging folder inside out_dir and swapped in by `finish`,
so a crash or an exception mid-way leaves the old dataset exactly as it was.

Evaluation extras (RSVQA question types, all reference captions) go to `Record.meta`.
"""
import collections
import dataclasses
import io
import logging
import os
import pathlib
import shutil
from typing import Dict, Union

from PIL import Image

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


def image_path(root, name: str, field: str = 'image') -> pathlib.Path:
  """root/name, resolved (`..` and symlinks), when it lies inside root, resolved too; raises
  Skip('image_outside_images_dir') when it does not (a relative path climbing out, an absolute
  path, a symlink pointing out) and Skip('missing_image') for a name no file can have."""
  root = pathlib.Path(root)
  try:
    base = root.resolve()
    path = (root / name).resolve()
  except (OSError, ValueError) as e:  # e.g. an embedded NUL byte, a symlink loop
    raise Skip('missing_image', field, f'{name!r} is not a usable path ({e})') from None
  if not path.is_relative_to(base):
    raise Skip('image_outside_images_dir', field, f'{name!r} resolves to {path}, outside {base}')
  return path


def load_image(path: Union[str, pathlib.Path], field: str = 'image',
               max_pixels: int = image_ops.MAX_IMAGE_PIXELS) -> EncodedImage:
  """`encode_image` of a file; Skip('missing_image') when it is not there."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise Skip('missing_image', field, f'no file {path}')
  return encode_image(path.read_bytes(), field, max_pixels)


def split_shards(out_dir, split: str):
  """The shard files of `split` in out_dir, by their names (`<split>-NNNNN.tfrecord`)."""
  return sorted(pathlib.Path(out_dir).glob(f'{split}-[0-9][0-9][0-9][0-9][0-9].tfrecord'))


class Output:
  """The shards a conversion writes, per split, staged inside out_dir until `finish` swaps them in.

  Why: converting into an existing dataset used to delete the old split before writing the new
  one, so a crash (or a bad input half-way) left neither. Here each split's shards go to
  out_dir/.staging-<pid>/ under their final names; `commit` (called by `finish` once everything
  is written) moves the old shards of those splits aside, the new ones in, writes
  dataset_info.json and only then deletes the old ones, so the old shards of a split are removed
  only when its new ones are complete, and stale ones (a rerun writing fewer shards) never stay.
  Splits this conversion writes nothing to are left alone. Use it as a context manager: an
  exception before the commit removes the staging folder and leaves out_dir as it was. A process
  killed outright leaves a hidden .staging-<pid> folder, which no reader looks at; killed during
  the swap itself (renames only), the old shards it had moved are in .replaced-<pid>, not lost.
  """

  def __init__(self, out_dir, records_per_shard: int = 1000):
    self.out_dir = pathlib.Path(out_dir)
    self.out_dir.mkdir(parents=True, exist_ok=True)
    self.records_per_shard = records_per_shard
    self.staging = self.out_dir / f'.staging-{os.getpid()}'
    self.writers: Dict[str, records.ShardWriter] = {}
    self._closed = None

  def __enter__(self) -> 'Output':
    return self

  def __exit__(self, *exc) -> None:
    self.discard()

  def writer(self, split: str) -> records.ShardWriter:
    """The split's writer, opened on first use (an opened split is replaced, even if empty)."""
    if split not in self.writers:
      if not self.writers:
        shutil.rmtree(self.staging, ignore_errors=True)  # a dead run's, with this pid
      self.writers[split] = records.ShardWriter(self.staging, split, self.records_per_shard)
    return self.writers[split]

  def write(self, split: str, record: records.Record) -> None:
    self.writer(split).write(record)

  def close(self) -> Dict[str, Dict]:
    """Closes every shard; {split: its dataset_info.json entry}."""
    if self._closed is None:
      self._closed = {s: w.close() for s, w in sorted(self.writers.items())}
    return self._closed

  def commit(self, write_info) -> None:
    """Swaps the staged splits in and calls write_info(); on any error the old shards go back
    (the info file is replaced atomically, last, so it never lists a shard that is not there)."""
    splits = self.close()
    aside = self.out_dir / f'.replaced-{os.getpid()}'
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir()
    moved_aside, moved_in = [], []
    try:
      for split in splits:
        for path in split_shards(self.out_dir, split):
          os.replace(path, aside / path.name)
          moved_aside.append(path.name)
      for entry in splits.values():
        for name in entry['files']:
          os.replace(self.staging / name, self.out_dir / name)
          moved_in.append(name)
      write_info()
    except BaseException:
      for name in moved_in:
        if name not in moved_aside:
          (self.out_dir / name).unlink(missing_ok=True)
      for name in moved_aside:
        os.replace(aside / name, self.out_dir / name)
      raise
    finally:
      shutil.rmtree(aside, ignore_errors=True)
    self.discard()

  def discard(self) -> None:
    """Removes the staging folder (a no-op after a commit)."""
    for w in self.writers.values():
      w.close()
    shutil.rmtree(self.staging, ignore_errors=True)


def check_merge(out_dir, name: str) -> None:
  """Raises unless out_dir is empty of datasets or holds dataset `name` (before any shard is
  written, so a wrong --out never clobbers another dataset's split)."""
  path = pathlib.Path(out_dir) / records.INFO_FILE
  if path.exists():
    old = records.read_info(out_dir)['name']
    if old != name:
      raise ValueError(f'{out_dir} holds dataset {old!r}, not {name!r}; pick another --out')


def finish(output: Output, name: str, licence: str, skips: Skips, merge: bool = False,
           **extra) -> Dict:
  """Swaps the output's splits into its folder, writes dataset_info.json, returns the summary.

  merge=True keeps the other splits of an existing dataset of the same name in out_dir (the
  instruction converter writes one split per call); a different name there is an error.
  """
  out_dir = output.out_dir
  splits = output.close()
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
  output.commit(lambda: records.write_info(
      out_dir, name=name, licence=licence, splits=all_splits,
      skipped=dict(sorted(totals.items())), skipped_per_split=per_split, **extra))
  return dict(written=sum(s['records'] for s in splits.values()),
              skipped=dict(sorted(skips.counts.items())),
              splits={s: e['records'] for s, e in splits.items()},
              out=str(out_dir), name=name, **extra)
