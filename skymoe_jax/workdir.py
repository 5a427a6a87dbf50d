"""The workdir: one stage of one run on disk, and the only code that knows its layout.

  WORKDIR/config.json          the resolved config (stage II reads its stage-I workdir's)
  WORKDIR/config_history.jsonl the changes a resume made to it: {step, field, old, new, time}
  WORKDIR/train.lock           while a trainer runs: {host, pid, since} (TrainerLock)
  WORKDIR/tokenizer.model      the run's tokenizer
  WORKDIR/checkpoints/<step>/  orbax: 'state' (the train state) and 'data' (the pipeline
                               position), and skymoe_manifest.json (each file's size)
  WORKDIR/checkpoints/<step>.damaged/  a checkpoint that failed verification, set aside
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

Every restore is verified, because a damaged checkpoint that restores is worse than none: the
run continues from garbage and retention then deletes the good steps. Once a save is complete,
process 0 writes the step's manifest (each file's size: a stat per file, cheap at pod scale);
a restore checks it, that the metadata files parse, that Orbax reads the arrays (its
checksums), and that every floating-point leaf is finite. A step that fails raises
CheckpointDamagedError naming the step and the file (or the leaves), one message; restoring
"the latest" falls back to the newest step that verifies, with a warning naming the damaged
one, and the trainer sets the damaged steps aside as <step>.damaged (kept, not deleted).

Saves are asynchronous by default: save() returns once the arrays are copied off the devices,
so the train step may donate them right away; wait() blocks until the files are complete.
Which steps are saved is an explicit policy: multiples of save_interval_steps (and a
preemption signal); save(force=True) writes any step. Retention keeps the newest max_to_keep
steps and, always, the newest step whose manifest verifies: it is decided when a step is saved,
before that step verifies, so a newer damaged or unverified step never pushes the last good one
out (with max_to_keep=1 the previous step stays until the next save).

The config on resume: only RESUMABLE_FIELDS may differ from the saved config.json (check_resume
refuses anything else before a file is written); commit_config records each change in
config_history.jsonl and rewrites config.json. truncate_metrics drops the metrics rows a
resume is about to log again. TrainerLock keeps a second trainer out of a workdir.
"""
import dataclasses
import datetime
import fcntl
import fnmatch
import json
import os
import re
import socket
from typing import Callable, Optional

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from skymoe_jax import config as config_lib
from skymoe_jax import storage
from skymoe_jax.data import sources
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.model.layout import param_path
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.parallel import sharding

CONFIG_FILE = 'config.json'
CONFIG_HISTORY_FILE = 'config_history.jsonl'
LOCK_FILE = 'train.lock'
MANIFEST_FILE = 'skymoe_manifest.json'  # in each checkpoint step directory
DAMAGED_SUFFIX = '.damaged'
TOKENIZER_FILE = 'tokenizer.model'
METRICS_FILE = 'metrics.jsonl'
CHECKPOINTS = 'checkpoints'
EVAL = 'eval'


def resolve(workdir) -> epath.Path:
  """The workdir as a path: local ones absolute, bucket URLs (gs://) as they are."""
  return storage.resolve(workdir)


def checkpoint_dir(workdir) -> epath.Path:
  return resolve(workdir) / CHECKPOINTS


def tokenizer_path(workdir) -> epath.Path:
  return resolve(workdir) / TOKENIZER_FILE


def eval_dir(workdir, step: int) -> epath.Path:
  return resolve(workdir) / EVAL / str(step)


def latest_eval_step(workdir) -> Optional[int]:
  """The last step with a finished evaluation (its metrics.json written), or None."""
  folder = resolve(workdir) / EVAL
  steps = [int(p.name) for p in folder.iterdir()
           if p.name.isdigit() and (p / 'metrics.json').exists()] if folder.is_dir() else []
  return max(steps, default=None)


def read_config(workdir) -> ml_collections.ConfigDict:
  """The config the trainer wrote into the workdir. A field newer than the workdir takes its
  default (base_config's): a new field's default is the behaviour the run had without it."""
  path = resolve(workdir) / CONFIG_FILE
  if not path.exists():
    raise FileNotFoundError(f'{path}: not a training workdir (no {CONFIG_FILE})')
  return ml_collections.ConfigDict(
      _with_defaults(json.loads(path.read_text()), _as_json(config_lib.base_config())))


def _with_defaults(saved: dict, defaults: dict, prefix: str = '') -> dict:
  """saved, plus the fields of defaults it lacks (not inside data.sources' entries)."""
  out = dict(saved)
  for key, value in defaults.items():
    field = f'{prefix}{key}.'
    if key not in out:
      out[key] = value
    elif isinstance(value, dict) and isinstance(out[key], dict) and \
        not field.startswith(_OPEN_SECTIONS):
      out[key] = _with_defaults(out[key], value, field)
  return out


def write_config(config, workdir) -> None:
  """The resolved config into the workdir (process 0 only), replacing the file atomically."""
  if jax.process_index() == 0:
    write_atomically(resolve(workdir) / CONFIG_FILE,
                      config.to_json_best_effort(indent=1) + '\n')


def write_atomically(path, text: str) -> None:
  """A reader (or a kill mid-write) sees the old file or the new one, never half of one."""
  storage.write_text_atomically(path, text)


# -- the config on resume -----------------------------------------------------------------------

# Fields a resumed run may change (fnmatch patterns over dotted names). None changes what a
# training step computes: how long the run is (a larger total_steps stretches the cosine
# schedule, see training/loop.py), how often it logs, saves and evaluates, evaluation itself,
# the machines and mesh it runs on (a checkpoint restores onto any mesh) and the memory the
# step may use (remat), how the input pipeline overlaps, and where the same data lives. Any
# other change would make a mixed run; it is refused, and a new workdir is the way to make it.
RESUMABLE_FIELDS = (
    'train.total_steps', 'train.log_every', 'train.tensorboard', 'train.checkpoint_every',
    'train.checkpoint_ocdbt',
    'train.keep_checkpoints',
    'train.eval_every', 'eval.*', 'distributed.*',
    'mesh.data', 'mesh.fsdp', 'mesh.expert', 'mesh.tensor', 'model.remat_policy',
    'model.remat_auto',
    'data.num_parallel_batches', 'data.prefetch_batches',
    'data.sources.*.data_dir', 'data.synthetic.cache_dir')
_OPEN_SECTIONS = ('data.sources.',)  # entries named by the config file, not by the schema
_ABSENT = '<absent>'


def _flat(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and value:
      out.update(_flat(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def _as_json(config) -> dict:
  return json.loads(config.to_json_best_effort())


def config_changes(saved: dict, config: dict) -> tuple:
  """(allowed, refused) lists of (field, saved value, new value), configs as JSON dicts.

  A field the saved config lacks because it is newer than the workdir is allowed at its
  default (base_config's), and one the schema no longer has is allowed to go; in data.sources
  every entry is compared, since a source added or dropped changes the data.
  """
  defaults = _flat(_as_json(config_lib.base_config()))
  old, new = _flat(saved), _flat(config)
  allowed, refused = [], []
  for field in sorted(old.keys() | new.keys()):
    before, after = old.get(field, _ABSENT), new.get(field, _ABSENT)
    if before == after:
      continue
    schema = not field.startswith(_OPEN_SECTIONS)
    if (any(fnmatch.fnmatchcase(field, p) for p in RESUMABLE_FIELDS) or
        (schema and before is _ABSENT and after == defaults.get(field, _ABSENT)) or
        (schema and after is _ABSENT and field not in defaults)):
      allowed.append((field, before, after))
    else:
      refused.append((field, before, after))
  return allowed, refused


def _saved_config(workdir) -> Optional[dict]:
  path = resolve(workdir) / CONFIG_FILE
  return json.loads(path.read_text()) if path.exists() else None


def has_checkpoints(workdir) -> bool:
  directory = checkpoint_dir(workdir)
  return directory.is_dir() and any(p.name.isdigit() for p in directory.iterdir())


def check_resume(config, workdir) -> None:
  """Refuses, before anything is built or written, to resume a workdir's checkpoints with a
  config that changes more than RESUMABLE_FIELDS: a ConfigError names each field, its saved
  and its new value. A workdir without checkpoints has nothing to mix with: any config goes."""
  saved = _saved_config(workdir)
  if saved is None or not has_checkpoints(workdir):
    return
  _, refused = config_changes(saved, _as_json(config))
  if refused:
    path = resolve(workdir) / CONFIG_FILE
    listing = '\n  '.join(f'config.{f}={new!r} (saved: {old!r})' for f, old, new in refused)
    raise config_lib.ConfigError(
        f'{path}: resuming these checkpoints with another config would make a mixed run; a '
        f'resume may change only {", ".join(RESUMABLE_FIELDS)}, but these differ:\n  {listing}'
        '\nUse the saved values, or a new workdir.')


def commit_config(config, workdir, step: int) -> list:
  """config.json := config; each field changed from the saved one is logged and appended to
  config_history.jsonl as {step, field, old, new, time} (step: the one training resumes
  from). Returns the changes. Process 0 writes."""
  saved = _saved_config(workdir)
  allowed, refused = config_changes(saved, _as_json(config)) if saved else ([], [])
  changes = allowed + refused  # refused ones only where nothing was trained (check_resume)
  if jax.process_index() == 0:
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    if changes:
      rows = []
      for field, old, new in changes:
        logging.warning('%s: config.%s changed from %r to %r at step %d', workdir, field, old,
                        new, step)
        rows.append(json.dumps({'step': int(step), 'field': field, 'old': old, 'new': new,
                                'time': now}) + '\n')
      storage.append_text(resolve(workdir) / CONFIG_HISTORY_FILE, ''.join(rows))
    if changes or saved is None:
      write_config(config, workdir)
  return changes


# -- metrics ------------------------------------------------------------------------------------

def truncate_metrics(workdir, step: int) -> int:
  """Drops the rows of metrics.jsonl past `step` (a run killed after its last checkpoint
  logged them; the resume logs them again) and any line a kill cut short; the file is replaced
  atomically. Returns the number of lines dropped. Process 0 only."""
  path = resolve(workdir) / METRICS_FILE
  if jax.process_index() != 0 or not path.exists():
    return 0
  kept, dropped = [], 0
  for line in path.read_text().splitlines():
    try:
      keep = int(json.loads(line)['step']) <= step
    except (ValueError, KeyError, TypeError):
      keep = False
    if keep:
      kept.append(line + '\n')
    else:
      dropped += 1
  if dropped:
    write_atomically(path, ''.join(kept))
    logging.info('%s: dropped %d rows past step %d (logged again on resume)', path, dropped, step)
  return dropped


# -- one trainer per workdir --------------------------------------------------------------------

class WorkdirLockedError(RuntimeError):
  """Another trainer holds the workdir's lock; the message names its host and pid."""


def _pid_alive(pid) -> bool:
  try:
    os.kill(int(pid), 0)
  except ProcessLookupError:
    return False
  except (PermissionError, OverflowError, ValueError, TypeError):
    return True  # someone else's process, or a pid we cannot judge: assume it runs
  return True


class TrainerLock:
  """WORKDIR/train.lock while a trainer runs: two trainers on one workdir would overwrite
  each other's checkpoints, config and metrics.

  The file holds {host, pid, since} and an flock on it (released by the kernel when the
  process dies, whatever kills it). A lock is stale, and taken over with a warning, only when
  no process holds the flock and its pid no longer runs on this host; one from another host is
  refused (its pid cannot be checked from here), and the message says which file to delete
  when that trainer is gone. Process 0 takes it; the lock is released on exit, exceptions
  included.

  In a bucket there is no flock: the lock is the object alone, written by its holder and deleted
  on release. One left by a killed trainer is stale when it names this host and a pid that no
  longer runs; one naming another host is refused as above.
  """

  def __init__(self, workdir):
    self.path = resolve(workdir) / LOCK_FILE
    self._fd = None
    self._remote_held = False

  def __enter__(self):
    if jax.process_index() == 0:
      self._acquire()
    return self

  def __exit__(self, *exc):
    self.release()

  def _refuse(self, holder: dict, why: str = ''):
    raise WorkdirLockedError(
        f'{self.path.parent} is in use by another trainer: {self.path} is held by host '
        f'{holder.get("host", "?")}, pid {holder.get("pid", "?")} (since '
        f'{holder.get("since", "?")}){why}. Wait for it to finish, or delete {self.path} if '
        'that trainer no longer runs.')

  def _acquire_remote(self):
    me = {'host': socket.gethostname(), 'pid': os.getpid()}
    if self.path.exists():
      try:
        holder = json.loads(self.path.read_text() or '{}')
      except (ValueError, UnicodeDecodeError):
        holder = {'host': '?', 'pid': '?', 'since': 'unreadable lock file'}
      holder = holder if isinstance(holder, dict) else {}
      if holder.get('host') != me['host']:
        self._refuse(holder, ' on another host')
      if _pid_alive(holder.get('pid')):  # this process too: one lock per workdir
        self._refuse(holder)
      logging.warning('%s: taking over the stale lock of pid %s on %s (since %s): that '
                      'process no longer runs', self.path, holder.get('pid'),
                      holder.get('host'), holder.get('since'))
    since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
    self.path.write_text(json.dumps(dict(me, since=since)) + '\n')
    self._remote_held = True

  def _acquire(self):
    if storage.is_remote(self.path):
      return self._acquire_remote()
    me = {'host': socket.gethostname(), 'pid': os.getpid()}
    for _ in range(5):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        try:
          fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
          held_elsewhere = False
        except BlockingIOError:
          held_elsewhere = True
        if held_elsewhere:
          self._refuse(self._holder(fd))
        try:
          if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
            continue  # released (unlinked) while we opened it: try the new file
        except FileNotFoundError:
          continue
        holder = self._holder(fd)
        if holder:
          if holder.get('host') != me['host']:
            self._refuse(holder, ' on another host')
          if holder.get('pid') != me['pid'] and _pid_alive(holder.get('pid')):
            self._refuse(holder)
          logging.warning('%s: taking over the stale lock of pid %s on %s (since %s): that '
                          'process no longer runs', self.path, holder.get('pid'),
                          holder.get('host'), holder.get('since'))
        since = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(dict(me, since=since)) + '\n').encode(), 0)
        os.fsync(fd)
        self._fd, fd = fd, None
        return
      finally:
        if fd is not None:
          os.close(fd)
    raise WorkdirLockedError(f'{self.path}: could not take the lock (other trainers keep '
                             'taking and releasing it)')

  @staticmethod
  def _holder(fd) -> dict:
    try:
      holder = json.loads(os.pread(fd, 4096, 0).decode() or '{}')
    except (ValueError, UnicodeDecodeError):
      return {'host': '?', 'pid': '?', 'since': 'unreadable lock file'}
    return holder if isinstance(holder, dict) else {}

  def release(self):
    if self._remote_held:
      self._remote_held = False
      try:
        self.path.unlink()
      except FileNotFoundError:
        pass
      return
    if self._fd is None:
      return
    try:
      if os.stat(self.path).st_ino == os.fstat(self._fd).st_ino:
        os.unlink(self.path)
    except FileNotFoundError:
      pass
    finally:
      os.close(self._fd)  # drops the flock
      self._fd = None


def init_workdir(config, workdir) -> epath.Path:
  """config.train.init_from: absolute (or a bucket URL), or relative to the workdir's parent (a
  sibling stage, in the same bucket for a gs:// workdir)."""
  text = config.train.init_from
  if storage.is_remote(text):
    return storage.path(text)
  path = storage.path(text)
  return path if path.is_absolute() else resolve(workdir).parent / text


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
    storage.copy_file(d.tokenizer, local)
  elif config.train.init_from:
    storage.copy_file(tokenizer_path(init_workdir(config, workdir)), local)
  else:
    vocab = d.tokenizer_vocab_size or config.model.llm.vocab_size
    coordinates = d.get('tokenizer_coordinates', '')
    try:
      tokenizer_lib.user_symbols(coordinates)  # a dialect without coordinate pieces is refused
    except ValueError as e:
      raise config_lib.ConfigError(f'config.data.tokenizer_coordinates={coordinates!r}: {e}'
                                   ) from None
    tokenizer_lib.ensure(local.with_suffix(''), [s.data_dir for s in d.sources.values()], vocab,
                         coordinates=coordinates)
  sources.sync('tokenizer')
  return tokenizer_lib.Tokenizer(local)


def restore_params(config, workdir, step: Optional[int] = None, mesh=None):
  """(step, params) of the workdir's checkpoint `step` (None: the newest that verifies, with a
  warning naming any newer damaged one), laid out on the mesh (default: config's) as in
  training. A damaged `step` raises CheckpointDamagedError naming the step and the file.

  Only the parameters are read (an orbax partial restore): the optimizer state, twice the
  parameters' size with Adam, never comes off disk.
  """
  mesh = mesh or mesh_lib.create_mesh(config)
  abstract, shardings = sharding.param_shardings(config, mesh)
  target = {'params': abstract_like(abstract, shardings)}
  with Checkpointer(checkpoint_dir(workdir)) as ckpt:
    step, restored = ckpt.restore_partial(step, target)
  return step, restored['params']


_STATE, _DATA = 'state', 'data'


class CheckpointMismatchError(ValueError):
  """The checkpoint's tree differs from the restore target; the message names the paths."""


class CheckpointDamagedError(ValueError):
  """A checkpoint step failed verification; one message names the step and the file (or the
  leaves that are not finite)."""


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


_METADATA_FILES = ('_CHECKPOINT_METADATA', '_METADATA', '_sharding', 'metadata')  # JSON
_FILE_IN_MESSAGE = re.compile(r'file "([^"]+)"')


def _files(step_dir: epath.Path, prefix: str = '') -> dict:
  """Relative path -> size of every file under a step directory but the manifest."""
  out = {}
  for path in step_dir.iterdir():
    name = prefix + path.name
    if path.is_dir():
      out.update(_files(path, name + '/'))
    elif name != MANIFEST_FILE:
      out[name] = int(path.stat().length)
  return out


def _first_line(e: BaseException, limit: int = 160) -> str:
  """The exception in one short line: its first line without TensorStore's spec, and of a
  long one the end, where a chain of 'context: context: cause' puts the cause."""
  text = str(e).strip().splitlines()[0] if str(e).strip() else ''
  text = text.split(' [tensorstore_spec=')[0]
  if len(text) > limit:
    text = '...' + text[-limit:]
  return f'{type(e).__name__}: {text}'


_finite_flags = jax.jit(lambda xs: jnp.stack([jnp.isfinite(x).all() for x in xs]))


def nonfinite_leaves(tree) -> list:
  """'/'-joined paths of the floating-point leaves of `tree` that hold a NaN or an Inf: one
  small jitted reduction, so the arrays stay on their devices (any mesh, any process count)."""
  named = [(param_path(path), x) for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
           if jnp.issubdtype(x.dtype, jnp.floating)]
  if not named:
    return []
  finite = _finite_flags([x for _, x in named])
  return [name for (name, _), ok in zip(named, np.asarray(jax.device_get(finite))) if not ok]


def _everywhere(ok: bool) -> bool:
  """True only if `ok` on every process, so that all take the same step (or all fall back)."""
  if jax.process_count() == 1:
    return ok
  return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


@dataclasses.dataclass
class _KeepNewestVerified:
  """orbax preservation policy: the newest n steps (None: all) and, whatever n, the newest step
  whose files verify, so that newer damaged or not yet verified steps never push it out."""
  n: Optional[int]
  verified: Callable[[int], bool]

  def should_preserve(self, checkpoints, *, context):
    keep = list(policies.LatestN(n=self.n).should_preserve(checkpoints, context=context))
    for i in reversed(range(len(checkpoints))):
      if self.verified(checkpoints[i].step):
        keep[i] = True
        break
    return keep


class Checkpointer:
  """Save / restore of (train state, data state) at integer steps under one directory."""

  def __init__(self, directory, save_interval_steps: int = 1, max_to_keep: Optional[int] = None,
               async_save: bool = True, use_ocdbt: bool = True):
    directory = os.fspath(directory)
    if '://' not in directory:
      directory = os.path.abspath(directory)  # Orbax wants absolute local paths
    options = ocp.CheckpointManagerOptions(
        # Only interval steps (and a preemption notice): the default policy would also save
        # whatever step comes first, which makes the saved steps depend on where a run starts.
        save_decision_policy=policies.AnySavePolicy([
            policies.FixedIntervalPolicy(int(save_interval_steps)),
            policies.PreemptionCheckpointingPolicy()]),
        preservation_policy=_KeepNewestVerified(max_to_keep, self._verified),
        enable_async_checkpointing=async_save)
    _use_plain_array_saves()
    # Handlers named up front, so a fresh process can read a step's metadata before restoring.
    self._manager = ocp.CheckpointManager(
        directory, options=options,
        item_handlers={_STATE: ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt),
                       _DATA: ocp.JsonCheckpointHandler()})
    self._partial = None   # a second manager for partial (params-only) restores, made on use
    self._unverified = []  # saved steps whose manifest is not written yet

  @property
  def directory(self):
    return self._manager.directory

  def _step_dir(self, step: int) -> epath.Path:
    return epath.Path(self.directory) / str(int(step))

  def save(self, step: int, state, data_state: dict, force: bool = False) -> bool:
    """Starts saving state and data_state at step; False if the policy skipped it.

    A step that is already saved is never overwritten (a forced final save after an
    interval save of the same step is a no-op). The previous save is completed (and its
    manifest written) first, as Orbax itself waits for it; steps that are not saved wait for
    nothing.
    """
    step = int(step)
    if step in self._manager.all_steps():
      return False
    if not (force or self._manager.should_save(step)):
      return False
    self._write_manifests()
    data = json.loads(json.dumps(dict(data_state), default=_json_default))
    saved = self._manager.save(step, args=ocp.args.Composite(**{
        _STATE: ocp.args.StandardSave(state), _DATA: ocp.args.JsonSave(data)}), force=True)
    if saved:
      self._unverified.append(step)
    return saved

  def _write_manifests(self) -> None:
    """Completes the saves started so far, then (process 0) writes each one's manifest."""
    if not self._unverified:
      return
    self._manager.wait_until_finished()
    steps, self._unverified = self._unverified, []
    if jax.process_index() != 0:
      return
    for step in steps:
      step_dir = self._step_dir(step)
      if not step_dir.exists():
        continue  # the save failed; Orbax logged why
      storage.write_text_atomically(
          step_dir / MANIFEST_FILE, json.dumps({'step': step, 'files': _files(step_dir)}, indent=0))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list:
    return sorted(self._manager.all_steps())

  # -- verification ------------------------------------------------------------------------------

  def _file_problem(self, step: int) -> tuple:
    """(problem naming a file or None, whether a manifest vouched for the sizes)."""
    step_dir = self._step_dir(step)
    if not step_dir.is_dir():
      return f'{step_dir} is missing', False
    manifest = step_dir / MANIFEST_FILE
    sizes, verified = None, manifest.exists()
    if verified:
      try:
        sizes = json.loads(manifest.read_text())['files']
      except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        return f'{MANIFEST_FILE}: unreadable ({_first_line(e)})', False
      for name, size in sorted(sizes.items()):
        path = step_dir / name
        if not path.exists():
          return f'{name}: missing ({size} bytes when saved)', False
        actual = int(path.stat().length)
        if actual != size:
          return f'{name}: {actual} bytes, {size} when saved', False
    names = sizes or _files(step_dir)
    for name in sorted(n for n in names if n.rsplit('/', 1)[-1] in _METADATA_FILES):
      try:
        json.loads((step_dir / name).read_text())
      except (ValueError, UnicodeDecodeError) as e:
        return f'{name}: not readable JSON ({_first_line(e)})', False
    return None, verified

  def _verified(self, step: int) -> bool:
    """Whether step has a manifest and its files match it (the retention policy's test)."""
    problem, verified = self._file_problem(step)
    return verified and problem is None

  def _damaged(self, step: int, what: str) -> CheckpointDamagedError:
    return CheckpointDamagedError(f'checkpoint step {step} in {self.directory} is damaged: '
                                  f'{what}')

  def _read_error(self, step: int, e: Exception, reading: str) -> CheckpointDamagedError:
    """Orbax / TensorStore's error while reading step, as one line naming the file (the last
    one its message names, else `reading`)."""
    step_dir = str(self._step_dir(step))
    names = [m for m in _FILE_IN_MESSAGE.findall(str(e)) if m.startswith(step_dir)]
    where = names[-1][len(step_dir):].strip('/') if names else ''
    return self._damaged(step, f'{where or reading}: {_first_line(e)}')

  def _restore_verified(self, step: int, target: dict, read: Callable) -> tuple:
    """read(step) of target, verified before (files, metadata, tree) and after (finite)."""
    problem, verified = self._file_problem(step)
    if problem:
      raise self._damaged(step, problem)
    if not verified:
      logging.info('checkpoint step %d in %s has no %s (saved by an older version, or stopped '
                   'before it was written): restoring without the size check', step,
                   self.directory, MANIFEST_FILE)
    try:
      self.check_matches(step, target)
    except CheckpointMismatchError:
      raise
    except Exception as e:  # metadata that parses as JSON, but not as the arrays' metadata
      raise self._read_error(step, e, f'{_STATE}/_METADATA') from None
    try:
      restored = read(step)
    except Exception as e:
      raise self._read_error(step, e, f'reading {_STATE}') from None
    tree = restored[0] if isinstance(restored, tuple) else restored
    if bad := nonfinite_leaves(tree):
      raise self._damaged(step, f'{_STATE}: not finite: {_listing(bad, 8)}')
    return restored

  def _restore_newest_good(self, target: dict, read: Callable, set_aside: bool = False):
    """(step, read(step)) of the newest step that verifies; warns naming each newer damaged
    one (and with set_aside moves them to <step>.damaged). All damaged: one error naming each
    step and its file."""
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      raise FileNotFoundError(f'no checkpoint in {self.directory}')
    damaged = []
    for step in steps:
      try:
        restored, error = self._restore_verified(step, target, read), None
      except CheckpointDamagedError as e:
        restored, error = None, e
      if not _everywhere(error is None):
        error = error or self._damaged(step, 'damaged as read by another process')
        logging.warning('%s; trying the checkpoint before it', error)
        damaged.append((step, error))
        continue
      if damaged and set_aside:
        self._set_aside([s for s, _ in damaged])
      return step, restored
    raise CheckpointDamagedError(
        f'every checkpoint in {self.directory} is damaged:\n  ' +
        '\n  '.join(str(e) for _, e in damaged)) from None

  def _set_aside(self, steps) -> None:
    """Damaged steps renamed <step>.damaged (kept for a look, outside Orbax's steps), so the
    run saves those steps again and retention no longer counts them."""
    if jax.process_index() == 0:
      for step in steps:
        source = self._step_dir(step)
        dest, n = source.parent / f'{step}{DAMAGED_SUFFIX}', 1
        while dest.exists():
          dest, n = source.parent / f'{step}{DAMAGED_SUFFIX}.{n}', n + 1
        source.rename(dest)
        logging.warning('moved damaged checkpoint step %d to %s (kept; delete it when done '
                        'with it)', step, dest)
    sources.sync('checkpoints set aside')
    self._manager.reload()

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

  # -- restoring ---------------------------------------------------------------------------------

  def restore(self, step: Optional[int], abstract_state) -> tuple:
    """(state, data_state) of step (None: the newest that verifies), laid out as
    abstract_state's shardings. A damaged step raises CheckpointDamagedError."""
    if step is None:
      return self.restore_latest(abstract_state)[1:]
    self._check_target(abstract_state)
    return self._restore_verified(int(step), abstract_state, self._read_full(abstract_state))

  def restore_latest(self, abstract_state, set_aside: bool = False) -> tuple:
    """(step, state, data_state) of the newest step that verifies; newer damaged steps are
    named in a warning and, with set_aside (the trainer, which saves those steps again),
    moved to <step>.damaged."""
    self._check_target(abstract_state)
    step, (state, data) = self._restore_newest_good(
        abstract_state, self._read_full(abstract_state), set_aside)
    return step, state, data

  def restore_partial(self, step: Optional[int], target: dict) -> tuple:
    """(step, tree) with only `target`'s parts of the state ({'params': ...}): an orbax partial
    restore, verified like restore(); step None: the newest that verifies."""
    self.wait()
    if self._partial is None:
      self._partial = ocp.CheckpointManager(
          self.directory, item_handlers={_STATE: ocp.PyTreeCheckpointHandler()})

    def read(s):
      return self._partial.restore(s, args=ocp.args.Composite(**{_STATE: ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
          partial_restore=True)}))[_STATE]

    if step is None:
      return self._restore_newest_good(target, read)
    return int(step), self._restore_verified(int(step), target, read)

  def _check_target(self, abstract_state) -> None:
    self.wait()  # a step still being written is not visible yet
    for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_state)[0]:
      if getattr(leaf, 'sharding', None) is None:
        raise ValueError(f'restore target {param_path(path)} has no sharding: build the target '
                         'with abstract_like(shapes, shardings)')

  def _read_full(self, abstract_state) -> Callable:
    def read(step):
      restored = self._manager.restore(step, args=ocp.args.Composite(**{
          _STATE: ocp.args.StandardRestore(abstract_state), _DATA: ocp.args.JsonRestore()}))
      return restored[_STATE], restored[_DATA]
    return read

  def wait(self) -> None:
    """Blocks until every started save is complete on disk, its manifest written (and old
    steps deleted)."""
    self._manager.wait_until_finished()
    self._write_manifests()

  def close(self) -> None:
    try:
      self._write_manifests()
    finally:
      self._manager.close()
      if self._partial is not None:
        self._partial.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()
