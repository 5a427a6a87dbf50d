"""The training input pipeline: a pure function of (seed, step, host), run by tf.data.

  step -> positions in the source mixture -> records (random access, records.open_split: tfds)
       -> decode -> CDA edits (cda.py) -> global view + local crop (image_ops.py)
       -> chat template -> tokens with a loss mask on assistant turns -> pad to data.text_len
       -> one fixed-shape host batch

Why a function of the step and not a stream: every batch is rebuilt from (config.seed, step,
process index) alone, so the iterator state is just the next step number, a resumed run sees
exactly the batches an uninterrupted one would, and hosts never coordinate. tf.data runs the batch
builder (a `tf.numpy_function`) for several steps in parallel and prefetches the results.

Mixture: each block of MIXTURE_BLOCK positions holds round(weight x block) positions of each
source in a seeded order; a source walks through its records in a fresh seeded permutation per
epoch (an epoch holds each record data.task_repeats[its task] times). Host h of H builds rows
[h B/H, (h+1) B/H) of global batch `step` from its own positions.

Batch layout (per host, B rows): the first rows are originals; with CDA on, the last
round(B x cda.edit_fraction) rows are edited copies of originals of the same batch
(`pair_index` = the row of the original, -1 for originals), so each unedited original sits in
the same batch as its edit. Bad records (unreadable, undecodable image, an image of more than
data.max_image_pixels pixels, refused from its header before decoding, malformed conversation)
are replaced by a seeded random record of the same source; every replacement, truncation and
CDA fallback is counted in the batch's `counters` (see COUNTERS), which the trainer logs.
"""
import functools
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf

from skymoe_jax.data import batch as batch_lib
from skymoe_jax.data import cda, image_ops, records, synthetic, tasks, template as template_lib
from skymoe_jax.data import tokenizer as tokenizer_lib

MIXTURE_BLOCK = 1000
MAX_REPLACEMENTS = 16  # bad records in a row before the pipeline gives up on a source
COUNTERS = ('unreadable_record', 'undecodable_image', 'malformed_conversation', 'truncated',
            'cda_not_applicable', 'image_too_large')


class DataError(RuntimeError):
  """The data cannot produce a batch (e.g. a source is empty or almost all bad)."""


class _Skip(Exception):
  def __init__(self, reason: str, message: str):
    super().__init__(message)
    self.reason = reason


def _rng(*key: int) -> np.random.Generator:
  return np.random.default_rng(list(key))


# Purposes of the per-row random streams (part of their seeds, so streams never overlap).
_MIX, _PERM, _REPLACE, _VIEW, _EDIT = range(5)


class Mixture:
  """Global position -> (source index, record index): exact weights per block, no repeats
  within a source's epoch."""

  def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int,
               names: Sequence[str]):
    self.sizes, self.seed = list(sizes), seed
    w = np.asarray(weights, np.float64)
    if len(w) == 0 or np.any(w < 0) or w.sum() <= 0:
      raise DataError(f'data.sources weights {list(weights)} must be >= 0 with a positive sum')
    raw = w / w.sum() * MIXTURE_BLOCK
    counts = np.floor(raw).astype(int)
    for i in np.argsort(-(raw - counts))[:MIXTURE_BLOCK - counts.sum()]:
      counts[i] += 1  # largest remainders get the leftover positions
    for name, weight, count, size in zip(names, weights, counts, sizes):
      if weight > 0 and count == 0:
        raise DataError(f'data.sources.{name}.weight={weight} is below 1/{MIXTURE_BLOCK} of '
                        'the total')
      if count and size == 0:
        raise DataError(f'data.sources.{name} has no records')
    self.counts = counts

  @functools.lru_cache(maxsize=8)
  def _block(self, block: int) -> Tuple[np.ndarray, np.ndarray]:
    """(source of each offset, its rank among that source's offsets in the block)."""
    order = np.repeat(np.arange(len(self.counts)), self.counts)
    order = _rng(self.seed, _MIX, block).permutation(order)
    rank = np.zeros(len(order), np.int64)
    for s in range(len(self.counts)):
      where = order == s
      rank[where] = np.arange(where.sum())
    return order, rank

  @functools.lru_cache(maxsize=16)
  def _permutation(self, source: int, epoch: int) -> np.ndarray:
    return _rng(self.seed, _PERM, source, epoch).permutation(self.sizes[source])

  def __call__(self, position: int) -> Tuple[int, int]:
    block, offset = divmod(position, MIXTURE_BLOCK)
    order, rank = self._block(block)
    s = int(order[offset])
    k = block * int(self.counts[s]) + int(rank[offset])
    epoch, i = divmod(k, self.sizes[s])
    return s, int(self._permutation(s, epoch)[i])


def task_indices(split: records.Split, repeats: Dict[str, int], where: str) -> np.ndarray:
  """The record indices of one epoch of a source under data.task_repeats: each record of task t
  repeats[t] times, in record order (every repeat 1: 0..n-1, and no record is read). An
  unreadable record keeps one place, so that drawing it is counted and replaced as usual."""
  if all(n == 1 for n in repeats.values()):
    return np.arange(len(split))

  def times(i):
    try:
      return repeats[split.record(i).task]
    except records.RecordError:
      return 1

  counts = np.asarray([times(i) for i in range(len(split))], np.int64)
  if not counts.any():
    raise DataError(f'{where}: data.task_repeats {dict(repeats)} leaves none of its '
                    f'{len(split)} records')
  return np.repeat(np.arange(len(split)), counts)


def host_rows(config, process_count: int) -> Tuple[int, int]:
  """(originals, edits) rows in one host's batch."""
  d = config.data
  if d.batch_size % process_count:
    raise DataError(f'config.data.batch_size={d.batch_size} must divide evenly over '
                    f'{process_count} processes')
  rows = d.batch_size // process_count
  edits = int(round(rows * d.cda.edit_fraction)) if d.cda.enabled else 0
  if edits >= rows:
    raise DataError(f'config.data.cda.edit_fraction={d.cda.edit_fraction} leaves no row for '
                    f'the originals of a {rows}-row host batch')
  return rows - edits, edits


class BatchBuilder:
  """build(step) -> this host's batch of global batch `step` (a dict of numpy arrays)."""

  def __init__(self, config, tokenizer: tokenizer_lib.Tokenizer, process_index: int = 0,
               process_count: int = 1, palette=None):
    d = config.data
    self.config, self.tokenizer = config, tokenizer
    self.seed = config.seed
    self.process_index, self.process_count = process_index, process_count
    self.num_originals, self.num_edits = host_rows(config, process_count)
    self.image_size = config.model.vision.image_size
    self.text_len = d.text_len
    self.template = template_lib.get_template(d.template)
    self.max_image_pixels = int(d.max_image_pixels)
    self.palette = palette
    names = sorted(d.sources)
    if not names:
      raise DataError('config.data.sources is empty')
    self.sources = [records.open_split(d.sources[n].data_dir, d.sources[n].split)
                    for n in names]
    self.source_names = names
    # Per source, the record behind each position of its epoch.
    self.epochs = [task_indices(r, dict(d.task_repeats), f'data.sources.{n}')
                   for r, n in zip(self.sources, names)]
    self.mixture = Mixture([len(e) for e in self.epochs], [d.sources[n].weight for n in names],
                           self.seed, names)
    if tokenizer.vocab_size > config.model.llm.vocab_size:
      raise DataError(f'the tokenizer has {tokenizer.vocab_size} pieces, more than '
                      f'config.model.llm.vocab_size={config.model.llm.vocab_size}')
    kinds = [(k, float(d.cda[f'{k}_weight'])) for k in cda.EDITS]
    self.edit_kinds = [k for k, w in kinds if w > 0]
    self.edit_weights = np.asarray([w for _, w in kinds if w > 0])
    # data.cda.counterfactual='rerender': each source's generator params (synthetic scenes only).
    self.rerender = None
    if d.cda.enabled and d.cda.counterfactual == 'rerender':
      self.rerender = []
      for n in names:
        params = synthetic.generator_params(records.read_info(d.sources[n].data_dir))
        if params is None and d.sources[n].weight > 0:
          raise DataError(f"config.data.cda.counterfactual='rerender' draws the edited scenes "
                          f'again, which only the synthetic scenes can: source {n} '
                          f'({d.sources[n].data_dir}) is not {synthetic.BUILDER}')
        self.rerender.append(params)

  # -- one sample ---------------------------------------------------------------------------

  def _load(self, source: int, index: int) -> cda.Sample:
    reader = self.sources[source]
    try:
      r = reader.record(index)
    except records.RecordError as e:
      raise _Skip('unreadable_record', str(e)) from None
    try:
      image = image_ops.decode(r.image, self.max_image_pixels)
    except image_ops.ImageTooLargeError as e:
      raise _Skip('image_too_large', f'{reader.where(index)} (id {r.id!r}): field image: {e}'
                  ) from None
    except image_ops.ImageDecodeError as e:
      raise _Skip('undecodable_image', f'{reader.where(index)}: field image: {e}') from None
    return cda.Sample(id=r.id, image=image, conversations=r.conversations, task=r.task,
                      granularity=r.granularity, boxes=r.boxes, labels=r.labels, colors=r.colors)

  def _encode(self, sample: cda.Sample, rng: np.random.Generator, counters: np.ndarray
              ) -> Dict[str, np.ndarray]:
    """Sample -> one batch row; raises _Skip for a conversation the template rejects."""
    d = self.config.data
    try:
      ids, loss_mask, info = self.tokenizer.encode_conversation(
          self.template, sample.conversations, self.text_len)
    except (template_lib.ConversationError, tokenizer_lib.TokenizeError) as e:
      raise _Skip('malformed_conversation', f'record {sample.id}: field conversations: {e}'
                  ) from None
    if info.get('truncated'):
      counters[COUNTERS.index('truncated')] += 1
    n = len(ids)
    row = {
        'images': image_ops.normalize(
            image_ops.global_view(sample.image, self.image_size, d.pad_to_square)),
        'tokens': np.pad(ids, (0, self.text_len - n)).astype(np.int32),
        'token_mask': np.arange(self.text_len) < n,
        'loss_mask': np.pad(loss_mask, (0, self.text_len - n)).astype(bool),
        'task_id': np.int32(tasks.task_id(sample.task)),
        'granularity_id': np.int32(tasks.granularity_id(sample.granularity)),
    }
    if d.local_views:
      row['local_images'] = image_ops.normalize(image_ops.local_view(
          sample.image, sample.boxes, self.image_size, rng, d.object_centred_prob,
          tuple(d.local_scale)))
    return row

  def _original(self, step: int, j: int, counters: np.ndarray):
    """(sample, row, source) of original row j, replacing bad records by seeded random ones."""
    positions_per_step = self.num_originals * self.process_count
    position = step * positions_per_step + self.process_index * self.num_originals + j
    source, index = self.mixture(position)
    epoch = self.epochs[source]
    view_rng = _rng(self.seed, _VIEW, step, self.process_index, j)
    for attempt in range(MAX_REPLACEMENTS + 1):
      try:
        sample = self._load(source, int(epoch[index]))
        return sample, self._encode(sample, view_rng, counters), source
      except _Skip as skip:
        counters[COUNTERS.index(skip.reason)] += 1
        last = skip
        replace = _rng(self.seed, _REPLACE, step, self.process_index, j, attempt)
        index = int(replace.integers(len(epoch)))
    raise DataError(f'source {self.source_names[source]}: {MAX_REPLACEMENTS + 1} bad records in '
                    f'a row, the last: {last}')

  def _edit(self, originals: List[cda.Sample], sources: List[int], rng: np.random.Generator
            ) -> Tuple[Optional[cda.Sample], int]:
    """An edited copy of one of the originals, and that original's row; (None, -1) if no edit
    applies to any of them."""
    for j in rng.permutation(len(originals)):
      kinds = rng.choice(len(self.edit_kinds), size=len(self.edit_kinds), replace=False,
                         p=self.edit_weights / self.edit_weights.sum())
      for k in kinds:
        kind = self.edit_kinds[k]
        if self.rerender is not None:
          try:
            edited = synthetic.counterfactual(originals[j], kind, rng, self.palette,
                                              self.rerender[sources[j]])
          except ValueError as e:
            raise DataError(f'source {self.source_names[sources[j]]}: {e}') from None
        else:
          edited = cda.EDITS[kind](originals[j], rng, self.palette)
        if edited is not None:
          return edited, int(j)
    return None, -1

  # -- one batch ----------------------------------------------------------------------------

  def build(self, step: int) -> Dict[str, np.ndarray]:
    step = int(step)
    counters = np.zeros(len(COUNTERS), np.int32)
    samples, rows, sources = [], [], []
    for j in range(self.num_originals):
      sample, row, source = self._original(step, j, counters)
      samples.append(sample)
      rows.append(row)
      sources.append(source)
    pair_index = [-1] * self.num_originals
    for e in range(self.num_edits):
      rng = _rng(self.seed, _EDIT, step, self.process_index, e)
      edited, j = self._edit(samples, sources, rng) if self.edit_kinds else (None, -1)
      if edited is None:
        # Nothing editable in this batch: one more original fills the row.
        counters[COUNTERS.index('cda_not_applicable')] += 1
        _, row, _ = self._original(step, self.num_originals + e, counters)
      else:
        try:
          row = self._encode(edited, rng, counters)
        except _Skip as skip:  # an edit always renders; a failure here is a bug
          raise DataError(f'CDA edit {edited.edit} of {edited.id}: {skip}') from None
      rows.append(row)
      pair_index.append(j)
    batch = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    batch['pair_index'] = np.asarray(pair_index, np.int32)
    batch['counters'] = counters
    return batch

  def output_signature(self) -> Dict[str, tf.TensorSpec]:
    """The batch contract's fields (data/batch.py) plus this batch's skip counters."""
    rows = self.num_originals + self.num_edits
    shapes = batch_lib.shapes(self.config, rows, batch_lib.pipeline_fields(self.config),
                              self.text_len)
    spec = {name: tf.TensorSpec(shape, tf.as_dtype(dtype))
            for name, (shape, dtype) in shapes.items()}
    spec['counters'] = tf.TensorSpec((len(COUNTERS),), tf.int32)
    return spec


def make_dataset(builder: BatchBuilder, start_step: int, end_step: Optional[int] = None
                 ) -> tf.data.Dataset:
  """tf.data over steps [start_step, end_step): batches built in parallel, in step order."""
  spec = builder.output_signature()
  keys = list(spec)

  def build(step):
    batch = builder.build(step)
    return tuple(batch[k] for k in keys)

  def as_dict(step):
    values = tf.numpy_function(build, [step], [spec[k].dtype for k in keys], stateful=False)
    return {k: tf.ensure_shape(v, spec[k].shape) for k, v in zip(keys, values)}

  steps = tf.data.Dataset.range(start_step, end_step if end_step is not None else 2**62)
  d = builder.config.data
  return (steps.map(as_dict, num_parallel_calls=d.num_parallel_batches, deterministic=True)
          .prefetch(d.prefetch_batches))


class DataIterator:
  """Batches from `start_step` on; `state()` is everything needed to resume exactly."""

  def __init__(self, builder: BatchBuilder, start_step: int = 0):
    self.builder = builder
    self.next_step = int(start_step)
    self._iterator = make_dataset(builder, self.next_step).as_numpy_iterator()

  def __iter__(self) -> Iterator[Dict[str, np.ndarray]]:
    return self

  def __next__(self) -> Dict[str, np.ndarray]:
    batch = next(self._iterator)
    self.next_step += 1
    return batch

  def state(self) -> Dict[str, int]:
    return {'next_step': self.next_step, 'seed': self.builder.seed}

  @classmethod
  def restore(cls, builder: BatchBuilder, state: Dict[str, int]) -> 'DataIterator':
    if state['seed'] != builder.seed:
      raise DataError(f'the checkpoint\'s data state has seed {state["seed"]}, config.seed is '
                      f'{builder.seed}: the batches would differ from the original run')
    return cls(builder, state['next_step'])
