"""One process of a multi-process run of the sharded train step (started by test_multihost).

  python tests/multihost_worker.py --process_id=0 --num_processes=2 --port=12345

(or the SKYMOE_COORDINATOR / SKYMOE_NUM_PROCESSES / SKYMOE_PROCESS_ID environment variables).
Each process has 4 CPU devices; together they form the tiny model's mesh data=2 x expert=4.
The last line printed is JSON: {"process_index", "process_count", "devices", "losses"}.

The functions above the __main__ block are shared with the test, which runs the same steps in
one process as the reference.
"""
import argparse
import json
import os
import pathlib

if __name__ == '__main__':  # before jax is imported; the test's own process is set by conftest
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             ' --xla_force_host_platform_device_count=4').strip()
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  os.environ.setdefault('JAX_DEFAULT_PRNG_IMPL', 'rbg')  # as conftest: compiles faster

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from skymoe_jax import config as config_lib  # noqa: E402
from skymoe_jax.model import factory  # noqa: E402
from skymoe_jax.parallel import mesh as mesh_lib  # noqa: E402
from skymoe_jax.parallel import multihost  # noqa: E402
from skymoe_jax.training import state as state_lib  # noqa: E402
from skymoe_jax.training import step as step_lib  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 8
TEXT = 6
STEPS = 3
SEED = 1
MESH = dict(data=2, fsdp=1, expert=4, tensor=1)


def tiny_config():
  config = config_lib.load(str(REPO / 'configs' / 'tiny.py'))
  config.mesh.update(MESH)
  config.model.moe.update(ep_strategy='ring', backend='ragged', capacity_factor=8.0)
  return config


def global_batch(config, step: int) -> dict:
  """The full global batch of a step, the same in every process (numpy, seeded by step)."""
  rng = np.random.default_rng(1000 + step)
  v = config.model.vision
  mask = np.ones((GLOBAL_BATCH, TEXT), bool)
  mask[1, :2] = False  # some padding
  mask[6, :3] = False  # ... in the second process's rows too
  return {
      'images': rng.normal(size=(GLOBAL_BATCH, v.image_size, v.image_size, 3)).astype(np.float32),
      'tokens': rng.integers(0, config.model.llm.vocab_size, (GLOBAL_BATCH, TEXT)).astype(
          np.int32),
      'token_mask': mask,
      'loss_mask': mask & (np.arange(TEXT) >= 2),
      'task_id': rng.integers(0, 5, GLOBAL_BATCH).astype(np.int32),
      'granularity_id': rng.integers(0, 3, GLOBAL_BATCH).astype(np.int32),
  }


def position_checksum(tokens, images):
  """A number that changes when rows move: row-weighted sums of tokens and images."""
  w = jnp.arange(1, tokens.shape[0] + 1, dtype=jnp.float32)
  return (jnp.sum(tokens.astype(jnp.float32) * w[:, None])
          + jnp.sum(jnp.sum(images, axis=(1, 2, 3)) * w))


def numpy_position_checksum(batch) -> float:
  w = np.arange(1, batch['tokens'].shape[0] + 1, dtype=np.float64)
  return float(np.sum(batch['tokens'] * w[:, None])
               + np.sum(batch['images'].astype(np.float64).sum(axis=(1, 2, 3)) * w))


def train_losses(config, mesh, place_batch) -> list:
  """STEPS sharded SGD steps from the seeded initial state; the loss of each step.

  place_batch(global numpy batch) -> what the step is called with.
  """
  model = factory.create_model(config)
  tx = optax.sgd(0.1)
  # The impl explicitly, so worker and test agree whatever their default. rbg compiles faster
  # than threefry on CPU (29 s vs 42 s for these steps in one process); its bits may depend on
  # the layout, but every run compared uses the same mesh data=2 x expert=4 over 8 devices.
  rng = jax.random.key(SEED, impl='rbg')
  state = state_lib.create_train_state(config, model, tx, mesh, rng)
  step = step_lib.make_train_step(config, model, tx, mesh)
  losses = []
  for i in range(STEPS):
    state, metrics = step(state, place_batch(global_batch(config, i)))
    losses.append(float(metrics['loss']))
  return losses


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--process_id', type=int, default=None)
  parser.add_argument('--num_processes', type=int, default=None)
  parser.add_argument('--port', type=int, default=None, help='coordinator port on localhost')
  args = parser.parse_args(argv)

  config = tiny_config()
  if args.port is not None:
    config.distributed = dict(coordinator_address=f'127.0.0.1:{args.port}',
                              num_processes=args.num_processes, process_id=args.process_id,
                              initialization_timeout=120)
  elif args.process_id is not None:  # coordinator from the environment
    config.distributed = dict(num_processes=args.num_processes, process_id=args.process_id)
  index, count = multihost.initialize(config)

  mesh = mesh_lib.create_mesh(config)
  rows = multihost.host_batch_slice(GLOBAL_BATCH)

  # Devices interleaved across processes: process p's devices would hold every other block of
  # rows, not the contiguous block it loads. make_global_batch must refuse that mesh.
  by_process = mesh_lib.process_major_devices()
  interleaved = [d for pair in zip(by_process[:4], by_process[4:]) for d in pair]
  interleaved_rejected = None  # one process: nothing to interleave
  if count == 2 and len(by_process) == 8:
    try:
      multihost.check_batch_layout(mesh_lib.create_mesh(config, interleaved), config,
                                   GLOBAL_BATCH)
      interleaved_rejected = False
    except ValueError as e:
      interleaved_rejected = 'process-major' in str(e)

  checksums = []
  checksum_fn = jax.jit(position_checksum)

  def place(batch):
    placed = multihost.make_global_batch({k: v[rows] for k, v in batch.items()}, mesh, config)
    # Every local shard holds the global rows its index names ...
    for name, array in placed.items():
      for shard in array.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), batch[name][shard.index],
                                      err_msg=f'{name} shard on device {shard.device}')
    # ... and a row-order-sensitive number computed over all processes (the loss is not).
    checksums.append(float(checksum_fn(placed['tokens'], placed['images'])))
    return placed

  losses = train_losses(config, mesh, place)
  report = {
      'process_index': index,
      'process_count': count,
      'local_devices': [d.id for d in jax.local_devices()],
      'mesh_devices': [[d.id, d.process_index] for d in mesh.devices.flat],
      'jax_devices': [[d.id, d.process_index] for d in jax.devices()],
      'rows': [rows.start, rows.stop],
      'losses': losses,
      'checksums': checksums,
      'interleaved_mesh_rejected': interleaved_rejected,
  }
  if count > 1:
    jax.distributed.shutdown()
  print(json.dumps(report), flush=True)


if __name__ == '__main__':
  main()
