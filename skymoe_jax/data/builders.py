"""tensorflow-datasets builders for every source the project reads, written as ArrayRecord.

One builder per source, named skymoe_<source> (the class SkymoeUcmerced is `skymoe_ucmerced`):

  benchmarks (convert/benchmarks.SOURCES, read from manual_dir in their published layouts)
    skymoe_ucmerced skymoe_nwpu_resisc45 skymoe_rsvqa_lr skymoe_dior_rsvg skymoe_ucm_captions
    skymoe_aid skymoe_whu_rs19 skymoe_rsvqa_hr skymoe_rsicd skymoe_nwpu_captions
    skymoe_sydney_captions skymoe_dota_v2_counting skymoe_hrrsd_counting skymoe_rsod_counting
  skymoe_instruct   LLaVA/GeoChat instruction files (convert/instruct.py): manual_dir holds
                    <split>.json or <split>.jsonl and images/; one config per box dialect
                    (skymoe_instruct/geochat, ...; pad_to_square, source as builder kwargs)
  skymoe_neon       the NEON tree tiles of the deepforest wheel (convert/neon.py); manual_dir
                    optional (default: the installed wheel's data/ folder)
  skymoe_synthetic  the procedural scenes (synthetic.py); the generator params are the config,
                    e.g. skymoe_synthetic/n2000-s0-i128-v0.1

From the command line (nothing is ever downloaded; manual_dir holds the files):

  python data_prep/tfds_build.py build skymoe_ucmerced --manual_dir=DIR --data_dir=OUT
  tfds build skymoe_ucmerced --imports=skymoe_jax.data.builders --manual_dir=DIR --data_dir=OUT

(both are tfds' own build command; the `tfds` script of tensorflow-datasets 4.9.10 also imports
apache_beam and mlcroissant when it starts: the `data` extra, in a venv of its own). From
Python and data_prep/: `build(name, manual_dir, data_dir, **options)` writes the dataset at its
tfds path data_dir/name/[config/]version, `build_at(out, name, manual_dir, ...)` at version
folder `out`; both return the summary the data_prep commands print (`written`, `skipped` by
reason, `splits`, `out` = the version folder that config.data.sources.*.data_dir names).
`write_records(out, {split: [records]})` writes chosen records (tests); skymoe_migrated reads a
folder of the old shard format (data_prep/migrate_shards.py).

Why tfds: versioned datasets with a DatasetInfo (features, split sizes, citation, licence),
read by position through `tfds.data_source` (records.py), so the input pipeline stays a pure
function of (seed, step, host) and its resume exact. Shuffling is disabled: record i of a split
is the i-th record generated for it, so a dataset's order is its source's fixed order.

Each record stores the fields of records.Record; the image is the source's encoded bytes as they
are (no re-encoding: a reader gets the same bytes back). A sample whose make() raises Skip is
counted by reason, overall and per split, with one warning naming the file, the record and the
field; the counts go into the DatasetInfo metadata (metadata.json: `skipped`,
`skipped_per_split`), beside the licence and the source's own extras.
"""
import collections
import dataclasses
import functools
import json
import logging
import os
import tempfile
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.core import writer as writer_lib

from skymoe_jax import storage
from skymoe_jax.data import image_ops
from skymoe_jax.data import records
from skymoe_jax.data.convert import NO_SPLIT, Skip, SourceSpec, Skips

log = logging.getLogger(__name__)

PREFIX = 'skymoe_'


def features() -> tfds.features.FeaturesDict:
  text = tfds.features.Text
  return tfds.features.FeaturesDict({
      'id': text(),
      'image': tfds.features.Tensor(shape=(), dtype=np.object_,   # encoded PNG/JPEG, unchanged
                                    doc='the encoded image bytes, as the source ships them'),
      'conversations': text(doc='JSON [{"from": "human"|"gpt", "value": ...}, ...]'),
      'task': text(), 'granularity': text(),
      'boxes': tfds.features.Tensor(shape=(None, 4), dtype=np.float32,
                                    doc='x1 y1 x2 y2 in pixels of the image'),
      'labels': tfds.features.Sequence(text()),
      'colors': tfds.features.Sequence(text()),
      'source': text(), 'licence': text(),
      'meta': text(doc='JSON of evaluation extras (question_type, references, ...)'),
  })


def example(record: records.Record) -> Dict:
  """The features of one record; the stored tf.train.Example is what records.decode reads."""
  return {
      'id': record.id, 'image': record.image,
      'conversations': json.dumps(record.conversations, ensure_ascii=False),
      'task': record.task, 'granularity': record.granularity,
      'boxes': np.asarray(record.boxes, np.float32).reshape(-1, 4),
      'labels': list(record.labels), 'colors': list(record.colors),
      'source': record.source, 'licence': record.licence,
      'meta': json.dumps(record.meta, ensure_ascii=False, sort_keys=True),
  }


class _DeterministicWriter(writer_lib.ExampleWriter):
  """tfds' writer, with each tf.train.Example serialized deterministically (features in key
  order). Why: tfds serializes with the protobuf map in its in-memory order, which differs from
  process to process, so the same records gave different files; with this, a dataset built
  twice is the same bytes (the tfds hook for custom writers: DatasetBuilder._example_writer)."""

  def write(self, path, examples):
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    parse = tf.train.Example.FromString
    return super().write(path, ((key, parse(data).SerializeToString(deterministic=True))
                                for key, data in examples))


class _Uncounted(Skips):
  """The skips of a repeated pass: counted and logged by the first pass already."""

  def add(self, skip, file, record, split=NO_SPLIT) -> None:
    pass


class _FromSpec:
  """A class attribute read from the builder's SourceSpec (the spec is imported when used)."""

  def __init__(self, get):
    self.get = get

  def __get__(self, obj, cls):
    return self.get(cls.spec())


class SourceBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A builder for one SourceSpec; subclasses name it (`SOURCE`) or override `spec`.

  Options the source's samples() takes beyond the contract (box_dialect, num_images, ...) come
  from the builder config (`config_options`) and from builder kwargs (`options`).
  """
  SOURCE = ''
  VERSION = _FromSpec(lambda s: tfds.core.Version(s.version))
  RELEASE_NOTES = {'1.0.0': 'First tfds release (ArrayRecord, random access).'}
  MANUAL_DOWNLOAD_INSTRUCTIONS = _FromSpec(
      lambda s: f'Place the files by hand (nothing is downloaded). Layout:\n{s.layout}')

  def __init__(self, *, seed: int = 0, licence: Optional[str] = None,
               max_image_pixels: int = image_ops.MAX_IMAGE_PIXELS, **kwargs):
    kwargs.setdefault('file_format', 'array_record')   # random access (tfds.data_source)
    self.options = {k: kwargs.pop(k) for k in list(kwargs) if k in self.OPTIONS}
    self.seed, self.max_image_pixels = int(seed), int(max_image_pixels)
    self.licence = licence if licence is not None else self.spec().licence
    self.licence_given = licence is not None
    super().__init__(**kwargs)
    self.skips = Skips()
    self.written: Dict[str, int] = {}

  OPTIONS: Tuple[str, ...] = ()   # builder kwargs passed on to samples()

  @classmethod
  def spec(cls) -> SourceSpec:
    from skymoe_jax.data.convert import benchmarks  # pylint: disable=g-import-not-at-top
    return benchmarks.SOURCES[cls.SOURCE]

  def config_options(self) -> Dict:
    return {}

  def extra_metadata(self) -> Dict:
    return {}

  def on_record(self, record: records.Record) -> None:
    """Called with each record written (a source's own counts)."""

  def _info(self) -> tfds.core.DatasetInfo:
    s = self.spec()
    return self.dataset_info_from_configs(
        description=s.description, features=features(), homepage=s.homepage,
        citation=s.citation, license=self.licence, disable_shuffling=True,
        metadata=tfds.core.MetadataDict())

  def _manual_dir(self, dl_manager):
    return dl_manager.manual_dir

  def _example_writer(self):
    return _DeterministicWriter(file_format=self.info.file_format)

  def _split_generators(self, dl_manager):
    manual_dir = self._manual_dir(dl_manager)
    return {split: self._generate_examples(manual_dir, split)
            for split in self.present_splits(manual_dir)}

  def present_splits(self, manual_dir) -> Tuple[str, ...]:
    """The splits with at least one record: tfds cannot write an empty split, and a split whose
    every sample is skipped is left out (its skips still counted), as the old converters did.

    One listing pass of samples(); make() is called only until a split's first record. The
    inputs samples() skips itself are counted from this pass (every pass of a deterministic
    source skips the same ones); the skips of a split left out, too (it gets no pass of its own).
    """
    pass_skips = Skips()
    made, failed = set(), collections.defaultdict(list)
    for split, file, where, make in self.samples(manual_dir, pass_skips, None):
      if split in made:
        continue
      try:
        make()
        made.add(split)
      except Skip as skip:
        failed[split].append((skip, file, where))
    self._count_pre_sample(pass_skips)
    for split in sorted(set(failed) - made):
      for skip, file, where in failed[split]:
        self.skips.add(skip, file, where, split)
    self._update_metadata()
    order = list(self.spec().splits) + sorted(made - set(self.spec().splits))
    return tuple(s for s in order if s in made)

  def _count_pre_sample(self, pass_skips: Skips) -> None:
    for s, counts in pass_skips.per_split.items():
      for reason, k in counts.items():
        self.skips.count(reason, k, s)

  def samples(self, manual_dir, skips: Skips, split: Optional[str]):
    """The source's samples of `split` (all splits for None): a pass of samples(), filtered."""
    it = self.spec().samples(manual_dir, skips, seed=self.seed, licence=self.licence,
                             max_image_pixels=self.max_image_pixels,
                             **self.config_options(), **self.options)
    return it if split is None else (s for s in it if s[0] == split)

  def _generate_examples(self, manual_dir, split: str) -> Iterator[Tuple[int, Dict]]:
    # A split's own pass: its make() failures are counted here, the skips samples() adds
    # itself were counted by present_splits' pass (pass_skips is dropped).
    n = 0
    for sample_split, file, where, make in self.samples(manual_dir, _Uncounted(), split):
      try:
        record = make()
      except Skip as skip:
        self.skips.add(skip, file, where, sample_split)
        continue
      self.on_record(record)
      yield n, example(record)
      n += 1
    self._update_metadata()
    self.written[split] = n

  def _update_metadata(self):
    per_split = {s: dict(sorted(c.items())) for s, c in sorted(self.skips.per_split.items()) if c}
    self.info.metadata.update(
        licence=self.licence, source=self.spec().name,
        skipped=dict(sorted(self.skips.counts.items())), skipped_per_split=per_split,
        **self.extra_metadata())


# ------------------------------------------------------------------------------- benchmarks

class SkymoeUcmerced(SourceBuilder):
  """UC Merced land use, scene classification (21 classes)."""
  SOURCE = 'ucmerced'


class SkymoeNwpuResisc45(SourceBuilder):
  """NWPU-RESISC45, scene classification (45 classes)."""
  SOURCE = 'nwpu_resisc45'


class SkymoeRsvqaLr(SourceBuilder):
  """RSVQA low resolution: VQA and counting."""
  SOURCE = 'rsvqa_lr'


class SkymoeDiorRsvg(SourceBuilder):
  """DIOR-RSVG visual grounding."""
  SOURCE = 'dior_rsvg'


class SkymoeUcmCaptions(SourceBuilder):
  """UCM-Captions image captioning."""
  SOURCE = 'ucm_captions'


class SkymoeAid(SourceBuilder):
  """AID aerial scene classification (30 classes)."""
  SOURCE = 'aid'


class SkymoeWhuRs19(SourceBuilder):
  """WHU-RS19 scene classification (19 classes)."""
  SOURCE = 'whu_rs19'


class SkymoeRsvqaHr(SourceBuilder):
  """RSVQA high resolution: VQA and counting."""
  SOURCE = 'rsvqa_hr'


class SkymoeRsicd(SourceBuilder):
  """RSICD image captioning."""
  SOURCE = 'rsicd'


class SkymoeNwpuCaptions(SourceBuilder):
  """NWPU-Captions image captioning."""
  SOURCE = 'nwpu_captions'


class SkymoeSydneyCaptions(SourceBuilder):
  """Sydney-Captions image captioning."""
  SOURCE = 'sydney_captions'


class SkymoeDotaV2Counting(SourceBuilder):
  """Counting questions from the DOTA-v2 box annotations."""
  SOURCE = 'dota_v2_counting'


class SkymoeHrrsdCounting(SourceBuilder):
  """Counting questions from the HRRSD box annotations."""
  SOURCE = 'hrrsd_counting'


class SkymoeRsodCounting(SourceBuilder):
  """Counting questions from the RSOD box annotations."""
  SOURCE = 'rsod_counting'


BENCHMARKS = {c.SOURCE: c for c in (
    SkymoeUcmerced, SkymoeNwpuResisc45, SkymoeRsvqaLr, SkymoeDiorRsvg, SkymoeUcmCaptions,
    SkymoeAid, SkymoeWhuRs19, SkymoeRsvqaHr, SkymoeRsicd, SkymoeNwpuCaptions,
    SkymoeSydneyCaptions, SkymoeDotaV2Counting, SkymoeHrrsdCounting, SkymoeRsodCounting)}


# ------------------------------------------------------------------ instruction data, NEON

@dataclasses.dataclass
class InstructConfig(tfds.core.BuilderConfig):
  box_dialect: str = 'geochat'


class SkymoeInstruct(SourceBuilder):
  """LLaVA/GeoChat instruction files: manual_dir/<split>.json|.jsonl + manual_dir/images/."""
  BUILDER_CONFIGS = [InstructConfig(name=d, box_dialect=d, description=f'boxes in the {d} dialect')
                     for d in ('geochat', 'vhm', 'lhrs', 'deepseek_vl2', 'paligemma')]
  OPTIONS = ('pad_to_square', 'source')

  @classmethod
  def spec(cls) -> SourceSpec:
    from skymoe_jax.data.convert import instruct  # pylint: disable=g-import-not-at-top
    return instruct.SPEC

  def config_options(self) -> Dict:
    return {'box_dialect': self.builder_config.box_dialect}

  def samples(self, manual_dir, skips, split):
    return self.spec().samples(manual_dir, skips, licence=self.licence,
                               max_image_pixels=self.max_image_pixels,
                               splits=None if split is None else (split,),
                               **self.config_options(), **self.options)

  def extra_metadata(self) -> Dict:
    return dict(box_dialect=self.builder_config.box_dialect,
                pad_to_square=bool(self.options.get('pad_to_square', False)))


class SkymoeNeon(SourceBuilder):
  """NEON tree tiles (deepforest wheel): counting and grounding crops."""
  OPTIONS = ('crop_size', 'min_visible', 'max_grounding_boxes', 'test_tiles')
  MANUAL_DOWNLOAD_INSTRUCTIONS = None  # optional: the installed wheel's data/ by default
  stats: Optional[Dict] = None

  def samples(self, manual_dir, skips, split):
    stats = {}
    if self.stats is None:
      self.stats = stats  # from the first pass (every pass sees the same tiles)
    it = self.spec().samples(manual_dir, skips, licence=self.licence,
                             max_image_pixels=self.max_image_pixels, stats=stats, **self.options)
    return it if split is None else (s for s in it if s[0] == split)

  def extra_metadata(self) -> Dict:
    return dict(self.stats or {}, crop_size=self.options.get('crop_size', 400),
                min_visible=self.options.get('min_visible', 0.5))

  @classmethod
  def spec(cls) -> SourceSpec:
    from skymoe_jax.data.convert import neon  # pylint: disable=g-import-not-at-top
    return neon.SPEC

  def _manual_dir(self, dl_manager):
    from skymoe_jax.data.convert import neon  # pylint: disable=g-import-not-at-top
    given = dl_manager._manual_dir  # pylint: disable=protected-access
    if given and storage.path(given).exists():
      return storage.path(given)
    found = neon.find_data_dir()
    if found is None:
      raise FileNotFoundError('skymoe_neon: no manual_dir given and no deepforest wheel '
                              'installed (pip install --no-deps deepforest==2.1.0)')
    return storage.path(found)


# ------------------------------------------------------------------------ synthetic scenes

@dataclasses.dataclass
class SyntheticConfig(tfds.core.BuilderConfig):
  num_images: int = 2000
  seed: int = 0
  image_size: int = 128
  val_fraction: float = 0.1
  object_scale: float = 1.0   # synthetic.Difficulty's fields
  max_objects: int = 8
  scene_mix: float = 0.0
  local_questions: int = 1

  @property
  def difficulty(self):
    from skymoe_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.Difficulty(self.object_scale, self.max_objects, self.scene_mix,
                                self.local_questions)


def synthetic_config(num_images: int, seed: int, image_size: int = 128,
                     val_fraction: float = 0.2, difficulty=None) -> SyntheticConfig:
  """The config of these params: one of SkymoeSynthetic.BUILDER_CONFIGS (tfds refuses a new
  config named like one of them) or a new one."""
  config = _synthetic_config(num_images, seed, image_size, val_fraction, difficulty)
  for known in SkymoeSynthetic.BUILDER_CONFIGS:
    if known.name == config.name:
      return known
  return config


def _synthetic_config(num_images, seed, image_size, val_fraction, difficulty=None
                      ) -> SyntheticConfig:
  from skymoe_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  d = synthetic.Difficulty(*(difficulty or ()))
  return SyntheticConfig(
      name=synthetic.dataset_name(num_images, seed, image_size, val_fraction, d),
      num_images=int(num_images), seed=int(seed), image_size=int(image_size),
      val_fraction=float(val_fraction), object_scale=float(d.object_scale),
      max_objects=int(d.max_objects), scene_mix=float(d.scene_mix),
      local_questions=int(d.local_questions))


class SkymoeSynthetic(SourceBuilder):
  """The procedural aerial scenes; no input files, the config's generator params say it all."""
  BUILDER_CONFIGS = [_synthetic_config(2000, 0, 128, 0.1), _synthetic_config(64, 0, 128, 0.25)]
  MANUAL_DOWNLOAD_INSTRUCTIONS = None

  @classmethod
  def spec(cls) -> SourceSpec:
    from skymoe_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    return synthetic.SPEC

  def _manual_dir(self, dl_manager):
    return None

  def present_splits(self, manual_dir):
    from skymoe_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    c = self.builder_config
    sizes = synthetic.split_sizes(c.num_images, c.val_fraction)
    return tuple(s for s in synthetic.SPLITS if sizes[s])

  def samples(self, manual_dir, skips, split):
    from skymoe_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    c = self.builder_config
    return synthetic.split_samples(split, c.num_images, c.seed, c.image_size, c.val_fraction,
                                   c.difficulty)

  counts: Optional[Dict] = None

  def on_record(self, record):
    from skymoe_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    if self.counts is None:
      self.counts = synthetic.empty_counts()
    synthetic.count(self.counts, record)

  def extra_metadata(self) -> Dict:
    from skymoe_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    c = self.builder_config
    return dict(generator=synthetic.recorded_params(c.num_images, c.seed, c.image_size,
                                              c.val_fraction, c.difficulty),
                format_version=synthetic.FORMAT_VERSION,
                counts=self.counts or synthetic.empty_counts())


# ------------------------------------------------------------ migration of the old shards

def _old_info(old_dir) -> Dict:
  path = storage.path(old_dir) / records.INFO_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path}: no dataset of the old shard format here')
  info = json.loads(path.read_text())
  if not isinstance(info.get('splits'), dict):
    raise ValueError(f'{path}: not the old shard format (already a tfds dataset?)')
  return info


def old_shard_samples(manual_dir, skips: Skips, *, seed: int = 0, licence: str = '',
                      max_image_pixels: int = 0, splits=None) -> Iterator:
  """The records of an old-format folder (dataset_info.json + <split>-NNNNN.tfrecord), split by
  split, shard by shard, streamed with tf.data.TFRecordDataset; a record records.decode refuses
  is skipped as unreadable_record."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  del seed, licence, max_image_pixels
  info = _old_info(manual_dir)
  root = storage.path(manual_dir)
  for split, entry in sorted(info['splits'].items()):
    if splits is not None and split not in splits:
      continue
    for name in entry['files']:
      path = root / name
      for n, data in enumerate(tf.data.TFRecordDataset(os.fspath(path)).as_numpy_iterator()):
        yield split, path, f'record {n}', functools.partial(_decode_old, data, f'{path} record {n}')


def _decode_old(data: bytes, where: str) -> records.Record:
  try:
    return records.decode(data, where)
  except records.RecordError as e:
    raise Skip('unreadable_record', '<record>', str(e)) from None


OLD_SHARDS = SourceSpec(
    name='migrated', version='1.0.0',
    description='A dataset of the pre-tfds shard format, migrated record for record.',
    homepage='', citation='', licence='', splits=(),
    layout='the old dataset folder: dataset_info.json + <split>-NNNNN.tfrecord',
    samples=old_shard_samples)


class SkymoeMigrated(SourceBuilder):
  """An old-format folder (manual_dir) as a tfds dataset: the same records in the same order."""

  @classmethod
  def spec(cls) -> SourceSpec:
    return OLD_SHARDS

  def __init__(self, **kwargs):
    self.old_info = None
    super().__init__(**kwargs)

  def present_splits(self, manual_dir):
    self.old_info = _old_info(manual_dir)
    if not self.licence_given:  # the old dataset's (migrate_shards.py passes it, for the info)
      self.licence = self.old_info.get('licence', '')
    return tuple(s for s, e in sorted(self.old_info['splits'].items()) if e.get('records'))

  def samples(self, manual_dir, skips, split):
    return old_shard_samples(manual_dir, skips, splits=None if split is None else (split,))

  def extra_metadata(self) -> Dict:
    old = self.old_info or {}
    keep = {k: v for k, v in old.items() if k not in ('splits', 'skipped', 'skipped_per_split')}
    return dict(migrated_from=keep, old_skipped=old.get('skipped', {}),
                old_skipped_per_split=old.get('skipped_per_split', {}))


# ----------------------------------------------------------------- records given in Python

RECORDS = SourceSpec(
    name='records', version='1.0.0',
    description='Records given in Python (tests, tools): written as they are, in their order.',
    homepage='', citation='', licence='', splits=(), layout='(none: the records are given)',
    samples=lambda *a, **k: iter(()))


class SkymoeRecords(SourceBuilder):
  """Writes the records of builder kwarg `records` ({split: [records.Record, ...]}) unchanged:
  a dataset made of chosen records, broken ones included (tests of the readers and pipeline)."""
  OPTIONS = ('records',)
  MANUAL_DOWNLOAD_INSTRUCTIONS = None

  @classmethod
  def spec(cls) -> SourceSpec:
    return RECORDS

  def _manual_dir(self, dl_manager):
    return None

  def present_splits(self, manual_dir):
    return tuple(s for s, recs in self.options['records'].items() if recs)

  def samples(self, manual_dir, skips, split):
    return ((split, '<given>', f'record {i}', (lambda r=r: r))
            for i, r in enumerate(self.options['records'][split]))


def write_records(out, splits: Dict[str, List[records.Record]], licence: str = '') -> Dict:
  """A tfds dataset of exactly these records at version folder `out`; returns the summary."""
  return build_at(out, 'records', None, records=splits, licence=licence)


BUILDERS = {**{PREFIX + k: v for k, v in BENCHMARKS.items()}, 'skymoe_instruct': SkymoeInstruct,
            'skymoe_neon': SkymoeNeon, 'skymoe_synthetic': SkymoeSynthetic,
            'skymoe_migrated': SkymoeMigrated, 'skymoe_records': SkymoeRecords}


# ---------------------------------------------------------------------------------- build()

def builder(name: str, data_dir, config=None, **options) -> SourceBuilder:
  """The builder `name` (skymoe_<source>, or just <source>), with `config` (a name or a
  BuilderConfig) and options (seed, licence, max_image_pixels, and the source's own)."""
  cls = _builder_cls(name)
  kwargs = {k: v for k, v in options.items() if v is not None}
  if config is not None:
    kwargs['config'] = config
  return cls(data_dir=os.fspath(storage.path(data_dir)), **kwargs)


def build(name: str, manual_dir, data_dir, config=None, **options) -> Dict:
  """Builds dataset `name` from manual_dir into tfds' place under data_dir
  (data_dir/name/[config/]version); returns the summary. An existing dataset there is replaced
  only once the new one is complete (build_at)."""
  b = builder(name, data_dir, config, **options)
  return build_at(storage.path(b.data_dir), name, manual_dir, config, **options)


def build_at(out, name: str, manual_dir, config=None, *, replaces=(), **options) -> Dict:
  """Builds dataset `name` into the version folder `out` (any folder; a data_dir names it).

  A non-empty `out` must hold a dataset of the same builder (or one named in `replaces`),
  checked before any work: a wrong --out never clobbers another dataset or a user's folder.

  Locally the dataset is built in a staging data_dir beside `out` and swapped in by renames,
  so a crash or a bad input mid-way leaves the old dataset as it was (tfds' own overwrite
  deletes the old data first). For a bucket URL it is built in a local temporary folder and
  uploaded file by file, dataset_info.json last (a bucket has no atomic folder rename: until
  the upload ends, readers see the old info file), then files of an older build are removed.
  """
  out = storage.path(out)
  _check_replaceable(out, _builder_cls(name).name, replaces)
  manual = os.fspath(storage.path(manual_dir)) if manual_dir else None
  if storage.is_remote(out):
    with tempfile.TemporaryDirectory(prefix='skymoe-build-') as tmp:
      local = storage.path(tmp) / 'dataset'
      build_at(local, name, manual_dir, config, **options)
      out.mkdir(parents=True, exist_ok=True)
      names = sorted(p.name for p in local.iterdir())
      for n in sorted(names, key=lambda n: n == records.INFO_FILE):
        (out / n).write_bytes((local / n).read_bytes())
      for old in out.iterdir():
        if old.name not in names:
          old.unlink()
    return summary(out)
  out.parent.mkdir(parents=True, exist_ok=True)
  staged = out.parent / f'.{out.name}.staging-{os.getpid()}'
  if staged.exists():
    staged.rmtree()
  aside = out.parent / f'.{out.name}.old-{os.getpid()}'
  try:
    b = builder(name, staged, config, **options)
    b.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual))
    if out.exists():
      out.rename(aside)
    storage.path(b.data_dir).rename(out)
    if aside.exists():
      aside.rmtree()
  finally:
    if staged.exists():
      staged.rmtree()
  return summary(out)


def _builder_cls(name: str):
  key = name if name.startswith(PREFIX) else PREFIX + name
  if key not in BUILDERS:
    raise KeyError(f'no builder {name!r}; known: {sorted(BUILDERS)}')
  return BUILDERS[key]


def _check_replaceable(out, builder_name: str, replaces) -> None:
  if not out.exists() or not any(True for _ in out.iterdir()):
    return
  try:
    old = json.loads((out / records.INFO_FILE).read_text()).get('name')
  except (OSError, ValueError):
    old = None
  if old is None:
    raise FileExistsError(f'{out} exists and holds no dataset; not replacing it (pick another '
                          'output folder)')
  if old != builder_name and old not in replaces:
    raise FileExistsError(f'{out} holds dataset {old!r}, not {builder_name!r}; not replacing it '
                          '(pick another output folder)')


def summary(version_dir) -> Dict:
  """The data_prep summary of a built dataset (the same keys the converters printed)."""
  info = records.read_info(version_dir)
  meta = info['metadata']
  out = dict(written=sum(info['splits'].values()), skipped=meta.get('skipped', {}),
             splits=info['splits'], out=os.fspath(version_dir), name=info['name'],
             version=info['version'])
  for k, v in meta.items():  # the source's extras (box_dialect, generator, NEON's tile stats)
    if k not in ('skipped', 'skipped_per_split', 'source'):
      out.setdefault(k, v)
  return out
