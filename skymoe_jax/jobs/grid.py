"""The sweep helpers config files use in get_sweep(): product and zip_ of override dicts.

  from skymoe_jax.jobs.grid import product
  def get_sweep(arg=None):
    return product({'optimizer.learning_rate': [1e-3, 3e-4]}, seed=[0, 1])

Standard library only (not in sweep.py): config files import it at their top, and loading a
config, which every command does, must not pay for what running a sweep imports (tensorflow,
orbax: seconds).
"""
import itertools
from typing import Dict, List


def _columns(factor) -> List[List[Dict]]:
  """A factor as columns of runs: {field: [values]} gives one column per field, a list of
  override dicts (an earlier product or zip_) is one column itself."""
  if isinstance(factor, dict):
    columns = []
    for field, values in factor.items():
      if not isinstance(values, (list, range)):
        raise ValueError(f'sweep field {field!r}: give a list of values, not {values!r} (a '
                         'tuple is one value of a tuple field: wrap it in a list)')
      columns.append([{field: v} for v in values])
    return columns
  runs = list(factor)
  if not all(isinstance(r, dict) for r in runs):
    raise ValueError(f'a sweep factor is a dict of value lists or a list of dicts: {factor!r}')
  return [runs]


def _merge(*runs: Dict) -> Dict:
  merged = {}
  for run in runs:
    for field, value in run.items():
      if field in merged:
        raise ValueError(f'sweep field {field!r} is set twice in one run')
      merged[field] = value
  return merged


def product(*factors, **fields) -> List[Dict]:
  """Every combination: product({'optimizer.learning_rate': [1e-3, 3e-4]}, seed=[0, 1]) is four
  runs. Factors are {field: [values]} dicts or lists of runs; keywords are top-level fields."""
  columns = [c for f in (*factors, fields) for c in _columns(f)]
  return [_merge(*combo) for combo in itertools.product(*columns)]


def zip_(*factors, **fields) -> List[Dict]:
  """Values side by side: zip_({'optimizer.learning_rate': [1e-3, 3e-4]}, seed=[0, 1]) is two
  runs, (1e-3, 0) and (3e-4, 1). Every column must have the same length."""
  columns = [c for f in (*factors, fields) for c in _columns(f)]
  if len({len(c) for c in columns}) > 1:
    raise ValueError(f'zip_ of columns of different lengths: {[len(c) for c in columns]}')
  return [_merge(*row) for row in zip(*columns)] if columns else [{}]
