"""The workdir: one stage of one run on disk, and the only code that knows its layout.

  WORKDIR/config.json          the resolved config (stage II reads its stage-I workdir's)
  WORKDIR/tokenizer.model      the run's tokenizer
  WORKDIR/checkpoints/<step>/  orbax: 'state' (the train state) and 'data' (the pipeline position)
  WORKDIR/metrics.jsonl        one JSON object per logged step; TensorBoard events next to it
  WORKDIR/eval/<step>/         evaluation outputs (evaluation/runner.py)

`read_config` reads a run's config, `restore_params` its parameters alone (no optimizer state
ever leaves the disk), and the Checkpointer saves and restores the whole train state.

Checkpoints: one step directory holds two items: 'state' ({'step', 'params', 'opt_state'},
saved with StandardSave, each host writing its own shards) and 'data' (a small JSON dict such as
{"next_step": 12, "seed": 0}). Restoring takes an abstract target whose leaves are
jax.ShapeDtypeStruct with a sharding, so a checkpoint written on one mesh restores onto any
other: Orbax reads exactly the slices each device of the new layout needs.

Before restoring, the stored tree is compared with the target leaf by leaf, and any missing,
extra or reshaped entry raises CheckpointMismatchError listing the '/'-joined paths. (Orbax's
own error for this is a ValueError that calls the target "Source" and the checkpoint "Target".)

Saves are asynchronous by default: save() returns once the arrays are copied off the devices,
so the train step may donate them right away; wait() blocks until the files are complete.
Which steps are saved is an explicit policy: multiples of save_interval_steps (and a
preemption signal); save(force=True) writes any step. Old steps beyond max_to_keep are deleted.
"""
import json
import os
import pathlib
import shutil
from typing import Optional

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from skymoe_jax.data import sources
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.model.layout import param_path
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.parallel import sharding

CONFIG_FILE = 'config.json'
TOKENIZER_FILE = 'tokenizer.model'
METRICS_FILE = 'metrics.jsonl'
CHECKPOINTS = 'checkpoints'
EVAL = 'eval'


def resolve(workdir) -> pathlib.Path:
  return pathlib.Path(workdir).expanduser().resolve()


def checkpoint_dir(workdir) -> pathlib.Path:
  return resolve(workdir) / CHECKPOINTS


def tokenizer_path(workdir) -> pathlib.Path:
  return resolve(workdir) / TOKENIZER_FILE


def eval_dir(workdir, step: int) -> pathlib.Path:
  return resolve(workdir) / EVAL / str(step)


def read_config(workdir) -> ml_collections.ConfigDict:
  """The config the trainer wrote into the workdir."""
  path = resolve(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path}: not a training workdir (no {CONFIG_FILE})')
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def write_config(config, workdir) -> None:
  """The resolved config into the workdir (process 0 only)."""
  if jax.process_index() == 0:
    (resolve(workdir) / CONFIG_FILE).write_text(config.to_json_best_effort(indent=1) + '\n')


def init_workdir(config, workdir) -> pathlib.Path:
  """config.train.init_from: absolute, or relative to the workdir's parent (a sibling stage)."""
  path = pathlib.Path(os.path.expanduser(config.train.init_from))
  return path if path.is_absolute() else resolve(workdir).parent / path


def prepare_tokenizer(config, workdir) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, made once into the workdir so later stages and evaluation use the
  same: config.data.tokenizer copied, else the init_from workdir's, else one trained on the
  sources' text. Process 0 makes it; the others wait, then read the same file."""
  local = tokenizer_path(workdir)
  if local.exists() or jax.process_index() != 0:
    sources.sync('tokenizer')
    return tokenizer_lib.Tokenizer(local)
  d = config.data
  if d.tokenizer:
    shutil.copyfile(os.path.expanduser(d.tokenizer), local)
  elif config.train.init_from:
    shutil.copyfile(tokenizer_path(init_workdir(config, workdir)), local)
  else:
    vocab = d.tokenizer_vocab_size or config.model.llm.vocab_size
    tokenizer_lib.ensure(local.with_suffix(''), [s.data_dir for s in d.sources.values()], vocab)
  sources.sync('tokenizer')
  return tokenizer_lib.Tokenizer(local)


def restore_params(config, workdir, step: Optional[int] = None, mesh=None):
  """(step, params) of the workdir's checkpoint `step` (None: the latest), laid out on the mesh
  (default: config's) as in training.

  Only the parameters are read (an orbax partial restore): the optimizer state, twice the
  parameters' size with Adam, never comes off disk.
  """
  mesh = mesh or mesh_lib.create_mesh(config)
  abstract, shardings = sharding.param_shardings(config, mesh)
  target = {'params': abstract_like(abstract, shardings)}
  directory = checkpoint_dir(workdir)
  with Checkpointer(directory) as ckpt:
    step = ckpt.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {directory}')
    ckpt.check_matches(step, target)  # a config/checkpoint mismatch names the parameter
  manager = ocp.CheckpointManager(directory,
                                  item_handlers={_STATE: ocp.PyTreeCheckpointHandler()})
  try:
    restored = manager.restore(step, args=ocp.args.Composite(**{_STATE: ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)}))
  finally:
    manager.close()
  return step, restored[_STATE]['params']


_STATE, _DATA = 'state', 'data'


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree differs from the restore target; the message names the paths."""


def abstract_like(state_shapes, shardings):
  """Restore target: ShapeDtypeStructs with shardings (training/state.py's state_shardings)."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      state_shapes, shardings)


def _leaf_shapes(tree) -> dict:
  return {param_path(path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _listing(paths, limit=20) -> str:
  paths = sorted(paths)
  more = f' ... and {len(paths) - limit} more' if len(paths) > limit else ''
  return ', '.join(paths[:limit]) + more


def _json_default(x):
  if isinstance(x, (np.generic, jax.Array)) and np.ndim(x) == 0:
    return np.asarray(x).item()
  raise TypeError(f'data_state value {x!r} of type {type(x).__name__} is not JSON')


_plain_array_saves = []


def _use_plain_array_saves():
  """In one process, no replica-parallel saving: it slices every replicated array per device
  and compiles each slice, hundreds of small compiles on a first save (20 s for the tiny model
  on 8 CPU devices) that buy nothing here. The registry is process-wide: register once."""
  if jax.process_count() == 1 and not _plain_array_saves:
    ocp.type_handlers.register_type_handler(
        jax.Array, ocp.type_handlers.ArrayHandler(use_replica_parallel=False), override=True)
    _plain_array_saves.append(True)


class Checkpointer:
  """Save / restore of (train state, data state) at integer steps under one directory."""

  def __init__(self, directory, save_interval_steps: int = 1, max_to_keep: Optional[int] = None,
               async_save: bool = True):
    directory = os.fspath(directory)
    if '://' not in directory:
      directory = os.path.abspath(directory)  # Orbax wants absolute local paths
    options = ocp.CheckpointManagerOptions(
        # Only interval steps (and a preemption notice): the default policy would also save
        # whatever step comes first, which makes the saved steps depend on where a run starts.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(int(save_interval_steps)),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=policies.LatestN(n=max_to_keep),
        enable_async_checkpointing=async_save)
    _use_plain_array_saves()
    # Handlers named up front, so a fresh process can read a step's metadata before restoring.
    self._manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(),
                       _DATA: ocp.JsonCheckpointHandler()})

  @property
  def directory(self):
    return self._manager.directory

  def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
    """Starts saving state and data_state at step; False if the policy skipped it.

    A step that is already saved is never overwritten (a forced final save after an
    interval save of the same step is a no-op).
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    data = json.loads(json.dumps(dict(data_state), default=_json_default))
    return self._manager.save(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state), _DATA: ocp.args.JsonSave(data)}), force=force)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list:
    return sorted(self._manager.all_steps())

  def check_matches(self, step: int, abstract_state) -> None:
    """Raises CheckpointMismatchError unless the stored state has the target's paths and shapes.

    A target with only some of the state's parts ({'params': ...}) is compared on those parts.
    """
    stored = self._manager.metadata(step).item_metadata[_STATE]
    stored = getattr(stored, 'tree', stored)
    saved = _leaf_shapes({k: v for k, v in stored.items() if k in abstract_state})
    wanted = _leaf_shapes(abstract_state)
    problems = []
    if extra := saved.keys() - wanted.keys():
      problems.append(f'in the checkpoint but not in the target: {_listing(extra)}')
    if missing := wanted.keys() - saved.keys():
      problems.append(f'in the target but missing from the checkpoint: {_listing(missing)}')
    reshaped = [f'{p} {saved[p]} (saved) vs {wanted[p]} (target)'
                for p in sorted(saved.keys() & wanted.keys()) if saved[p] != wanted[p]]
    if reshaped:
      problems.append(f'shapes differ: {_listing(reshaped)}')
    if problems:
      raise CheckpointMismatchError(
          f'checkpoint step {step} in {self.directory} does not fit the restore target:\n  ' +
          '\n  '.join(problems))

  def restore(self, step: Optional[int], abstract_state) -> tuple:
    """(state, data_state) of step (None: the latest), laid out as abstract_state's shardings."""
    self.wait()  # a step still being written is not visible yet
    step = self.latest_step() if step is None else int(step)
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
      if getattr(leaf, 'sharding', None) is None:
        raise ValueError(f'restore target {param_path(path)} has no sharding: build the target '
                         'with abstract_like(shapes, shardings)')
    self.check_matches(step, abstract_state)
    restored = self._manager.restore(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardRestore(abstract_state), _DATA: ocp.args.JsonRestore()}))
    return restored[_STATE], restored[_DATA]

  def wait(self) -> None:
    """Blocks until every started save is complete on disk (and old steps are deleted)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
