"""The batch contract: the arrays of a training batch, by name, with their rank and dtype.

The input pipeline's output signature, the train step's shardings, the AOT compile's abstract
batch and the model's example inputs are all built from this one table. Every array's leading
axis is the batch; the rest of its shape follows from the config (`shapes`).
"""
from typing import Dict, NamedTuple, Sequence

import numpy as np


class Field(NamedTuple):
  rank: int
  dtype: np.dtype


FIELDS = {
    'images': Field(4, np.dtype(np.float32)),       # [B, H, W, 3] normalised pixels
    'tokens': Field(2, np.dtype(np.int32)),         # [B, T] text after the image tokens
    'token_mask': Field(2, np.dtype(bool)),         # [B, T] real (not padding) tokens
    'loss_mask': Field(2, np.dtype(bool)),          # [B, T] answer tokens: the CE targets
    'task_id': Field(1, np.dtype(np.int32)),        # [B] data/tasks.py TASKS index
    'granularity_id': Field(1, np.dtype(np.int32)),  # [B] data/tasks.py GRANULARITIES index
    'local_images': Field(4, np.dtype(np.float32)),  # [B, H, W, 3] local crops (data.local_views)
    'pair_index': Field(1, np.dtype(np.int32)),     # [B] an edited row's original row, else -1
}

# SkyMoE.__call__'s arguments, in order.
MODEL_INPUTS = ('images', 'tokens', 'token_mask', 'task_id', 'granularity_id')
TRAIN_INPUTS = MODEL_INPUTS[:3] + ('loss_mask',) + MODEL_INPUTS[3:]
CONTRASTIVE_INPUTS = ('local_images', 'pair_index')   # only with train.contrastive_weight > 0


def train_fields(config) -> tuple:
  """Names of the arrays the train step takes."""
  contrastive = CONTRASTIVE_INPUTS if config.train.contrastive_weight > 0 else ()
  return TRAIN_INPUTS + contrastive


def pipeline_fields(config) -> tuple:
  """Names of the arrays the input pipeline produces (local crops only with data.local_views)."""
  local = ('local_images',) if config.data.local_views else ()
  return TRAIN_INPUTS + local + ('pair_index',)


def shapes(config, rows: int, names: Sequence[str], text_len: int = 0
           ) -> Dict[str, tuple]:
  """{name: (shape, dtype)} of a batch of `rows` rows (text_len default: config.data.text_len)."""
  s = config.model.vision.image_size
  t = text_len or config.data.text_len
  by_rank = {1: (rows,), 2: (rows, t), 4: (rows, s, s, 3)}
  return {n: (by_rank[FIELDS[n].rank], FIELDS[n].dtype) for n in names}
