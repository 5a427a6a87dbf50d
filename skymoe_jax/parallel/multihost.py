"""Running one job over several processes (hosts): start-up, which rows each host loads, and
global batches built from every host's own rows.

Every process runs the same program over the same global mesh; each one only touches its own
(addressable) devices. Start-up comes from config.distributed or, for fields left unset, the
environment:

  config.distributed.coordinator_address  SKYMOE_COORDINATOR     'host:port' of process 0
  config.distributed.num_processes        SKYMOE_NUM_PROCESSES
  config.distributed.process_id           SKYMOE_PROCESS_ID
  config.distributed.auto = True          SKYMOE_COORDINATOR=auto  let jax find them (Cloud TPU,
                                                                  Slurm, Open MPI)

With none of them set the job is a single process and `initialize` does nothing.

A process that dies must not leave the others waiting in a collective for ever: the coordination
service declares a process dead when it has sent no heartbeat for
config.distributed.heartbeat_timeout_seconds (60 by default; jax's own default is 100) and then
aborts every other process of the job (SIGABRT, a non-zero exit) so that the launcher sees the
failure and the job can be rerun: it resumes from the last checkpoint that verifies.
config.distributed.shutdown_timeout_seconds (120; jax: 300) bounds how long a process that is
exiting (an exception included) waits for the others at the shutdown barrier, which is what
frees a survivor stuck in a collective with a process that is still alive but leaving.
Checkpoints are safe either way: Orbax publishes a step only once every process has written it
(an interrupted save stays an ignored temporary folder), and restores verify (workdir.py).

Data: host p loads rows host_batch_slice(B) of the global batch of B rows (the p-th contiguous
block) and `make_global_batch` assembles the global jax.Arrays. That is only right when the
devices of process p hold exactly those rows under the batch sharding, which depends on the
order of devices in the mesh: parallel.mesh.create_mesh orders them process-major, and
make_global_batch checks the layout before it trusts it.
"""
import math
import os
from typing import Optional

import jax
import numpy as np

from skymoe_jax import config as config_lib
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.parallel import sharding

ENV_COORDINATOR = 'SKYMOE_COORDINATOR'
ENV_NUM_PROCESSES = 'SKYMOE_NUM_PROCESSES'
ENV_PROCESS_ID = 'SKYMOE_PROCESS_ID'
AUTO = 'auto'
# config.distributed fields passed on to jax.distributed.initialize as they are (when set).
TIMEOUT_FIELDS = ('initialization_timeout', 'heartbeat_timeout_seconds',
                  'shutdown_timeout_seconds')


def _setting(dist, field, env_name, environ):
  """config.distributed.<field> if set, else the environment variable, else None."""
  value = dist.get(field)
  if value is None or value == '':
    value = environ.get(env_name) or None
  return value


def _as_int(value, field, env_name):
  if value is None:
    return None
  try:
    return int(value)
  except (TypeError, ValueError):
    raise ValueError(f'config.distributed.{field} (or ${env_name})={value!r}: not an integer') \
        from None


def _timeouts(dist) -> dict:
  """The timeouts of config.distributed; a field that a replaced config.distributed lacks takes
  base_config's default, so a dead process is noticed within a bounded time whatever the
  config."""
  defaults = config_lib.base_config().distributed
  out = {}
  for field in TIMEOUT_FIELDS:
    value = dist.get(field, defaults.get(field))
    if value is not None:
      out[field] = int(value)
  return out


def distributed_settings(config=None, environ=None) -> Optional[dict]:
  """The keyword arguments for jax.distributed.initialize, or None for a single process.

  Each field comes from config.distributed when set there, else from its environment variable;
  the timeouts (TIMEOUT_FIELDS) come from config.distributed alone, defaults included.
  'auto' (config.distributed.auto=True or SKYMOE_COORDINATOR=auto) passes only the fields that
  are set and lets jax detect the rest (Cloud TPU, Slurm, Open MPI).
  """
  environ = os.environ if environ is None else environ
  dist = (config.get('distributed', None) if config is not None else None) or {}
  coordinator = _setting(dist, 'coordinator_address', ENV_COORDINATOR, environ)
  num_processes = _as_int(_setting(dist, 'num_processes', ENV_NUM_PROCESSES, environ),
                          'num_processes', ENV_NUM_PROCESSES)
  process_id = _as_int(_setting(dist, 'process_id', ENV_PROCESS_ID, environ), 'process_id',
                       ENV_PROCESS_ID)
  auto = bool(dist.get('auto', False)) or (isinstance(coordinator, str)
                                            and coordinator.lower() == AUTO)
  if auto and isinstance(coordinator, str) and coordinator.lower() == AUTO:
    coordinator = None
  extra = _timeouts(dist)

  if auto:
    given = dict(coordinator_address=coordinator, num_processes=num_processes,
                 process_id=process_id)
    return {**{k: v for k, v in given.items() if v is not None}, **extra}
  if coordinator is None and num_processes is None and process_id is None:
    return None  # single process
  missing = [f'config.distributed.{field} (or ${env})' for field, env, v in (
      ('coordinator_address', ENV_COORDINATOR, coordinator),
      ('num_processes', ENV_NUM_PROCESSES, num_processes),
      ('process_id', ENV_PROCESS_ID, process_id)) if v is None]
  if missing:
    raise ValueError(f'multi-process start-up needs {", ".join(missing)} as well (or '
                     f'config.distributed.auto=True / ${ENV_COORDINATOR}=auto to let jax '
                     'detect them)')
  if num_processes < 1:
    raise ValueError(f'config.distributed.num_processes={num_processes}: must be >= 1')
  if not 0 <= process_id < num_processes:
    raise ValueError(f'config.distributed.process_id={process_id}: must be in '
                     f'[0, num_processes={num_processes})')
  return dict(coordinator_address=coordinator, num_processes=num_processes,
              process_id=process_id, **extra)


def initialize(config=None) -> tuple:
  """Joins the multi-process job that config / environment describe; (process_index, count).

  Must run before anything else touches jax devices. Does nothing for a single process, or when
  jax.distributed is already initialized.
  """
  settings = distributed_settings(config)
  if settings is not None and not jax.distributed.is_initialized():
    dist = (config.get('distributed', None) if config is not None else None) or {}
    # Cross-process collectives of the CPU backend (gloo is jax 0.10's default; set it so a
    # changed default cannot silently leave CPU processes without collectives). The option
    # only affects the CPU client, so it is harmless on TPU / GPU.
    jax.config.update('jax_cpu_collectives_implementation',
                      dist.get('cpu_collectives') or 'gloo')
    jax.distributed.initialize(**settings)
  return jax.process_index(), jax.process_count()


def host_batch_slice(global_batch_size: int, process_index: Optional[int] = None,
                     process_count: Optional[int] = None) -> slice:
  """The rows of a global batch this process loads: its contiguous block, in process order."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if global_batch_size % count:
    raise ValueError(f'global batch size {global_batch_size} is not divisible by the '
                     f'{count} processes')
  per_host = global_batch_size // count
  return slice(index * per_host, (index + 1) * per_host)


def process_rows(sharding, global_batch_size: int) -> list:
  """The sorted global rows (leading axis) held by this process's devices under `sharding`."""
  rows = set()
  for index in sharding.addressable_devices_indices_map((global_batch_size,)).values():
    rows.update(range(*index[0].indices(global_batch_size)))
  return sorted(rows)


def check_batch_layout(mesh, config, global_batch_size: int) -> None:
  """Raises unless this process's devices hold exactly its host_batch_slice rows."""
  shards = math.prod(mesh.shape[a] for a in mesh_lib.batch_axes(config))
  if global_batch_size % shards:
    raise ValueError(f'global batch size {global_batch_size} is not divisible by the {shards} '
                     f'batch shards of mesh axes {mesh_lib.batch_axes(config)}')
  expected = host_batch_slice(global_batch_size)
  held = process_rows(mesh_lib.batch_sharding(mesh, config), global_batch_size)
  if held != list(range(expected.start, expected.stop)):
    span = f'rows {held[0]}..{held[-1]} ({len(held)} rows)' if held else 'no rows'
    raise ValueError(
        f'process {jax.process_index()} loads rows {expected.start}..{expected.stop - 1} of the '
        f'global batch, but its devices hold {span} under the mesh {dict(mesh.shape)}: build '
        'the mesh with parallel.mesh.create_mesh (process-major device order) and keep '
        'non-batch mesh axes (tensor) within one process')


def make_global_batch(local_batch: dict, mesh, config) -> dict:
  """Global jax.Arrays, sharded as the train step expects, from this process's rows.

  local_batch: numpy arrays holding rows host_batch_slice(global batch size) of every field;
  the global batch size is their leading size times the number of processes.
  """
  sizes = {k: np.shape(v)[0] for k, v in local_batch.items()}
  if len(set(sizes.values())) != 1:
    raise ValueError(f'batch fields have different numbers of rows: {sizes}')
  global_size = next(iter(sizes.values())) * jax.process_count()
  check_batch_layout(mesh, config, global_size)
  shardings = sharding.batch_shardings(mesh, config)
  out = {}
  for name, value in local_batch.items():
    value = np.asarray(value)
    target = shardings.get(name) or mesh_lib.batch_sharding(mesh, config, value.ndim)
    out[name] = jax.make_array_from_process_local_data(target, value,
                                                       (global_size,) + value.shape[1:])
  return out
