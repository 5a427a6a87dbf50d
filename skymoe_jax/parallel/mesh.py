"""The device mesh and the logical-axis rules that map model axis names onto it.

One mesh, axes ('data', 'fsdp', 'expert', 'tensor'), sizes from config.mesh (-1: the rest of
the devices). Outside the MoE layers `expert` is one more batch axis. The rule table
(config.mesh.rules, default config.DEFAULT_RULES) is the only place where a logical name (embed,
mlp, heads, exp, ...) meets a mesh axis; model code only ever names logical axes.
"""
import contextlib
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def mesh_shape(mesh_cfg, num_devices: int) -> tuple:
  """Axis sizes with the (at most one) -1 resolved; checks they fit the devices."""
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ValueError(f'config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}')
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f'config.mesh: sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}')
  if -1 in sizes:
    if num_devices % known:
      raise ValueError(f'config.mesh: {known} devices for the fixed axes do not divide the '
                       f'{num_devices} devices')
    sizes[sizes.index(-1)] = num_devices // known
  if math.prod(sizes) > num_devices:
    raise ValueError(f'config.mesh={dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} '
                     f'devices, only {num_devices} exist')
  return tuple(sizes)


def process_major_devices(devices: Optional[Sequence] = None) -> list:
  """Devices ordered by (process index, id).

  jax does not promise that device ids are grouped by process (on multi-host TPU they follow
  the chip topology). The mesh is filled row-major and its batch axes lead, so this order gives
  each process a contiguous block of the batch, in process order: the rows it loads
  (multihost.host_batch_slice).
  """
  devices = jax.devices() if devices is None else devices
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def create_mesh(config, devices: Optional[Sequence] = None) -> jax.sharding.Mesh:
  """The mesh config.mesh describes, over the first devices it needs (Auto axis types).

  devices defaults to all devices in process-major order; a given list is used as it is.
  """
  devices = process_major_devices() if devices is None else list(devices)
  shape = mesh_shape(config.mesh, len(devices))
  used = np.array(devices[:math.prod(shape)]).reshape(shape)
  return jax.sharding.Mesh(used, MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_rules(config):
  """The rule table as the tuple of (name, axes) pairs flax expects."""
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in config.mesh.rules)


@contextlib.contextmanager
def activate(mesh, config):
  """Mesh and rules in force for tracing: with_logical_constraint and shard_map see both."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(logical_rules(config)):
    yield


def logical_to_sharding(boxed_tree, mesh, config):
  """NamedShardings for a tree of nn.Partitioned (or abstract) leaves, via the rules."""
  specs = nn.get_partition_spec(boxed_tree)
  return nn.logical_to_mesh_sharding(specs, mesh, logical_rules(config))


def batch_axes(config) -> tuple:
  """Mesh axes the batch dimension is split over."""
  axes = dict(logical_rules(config)).get('activation_batch')
  return tuple(axes) if isinstance(axes, tuple) else ((axes,) if axes else ())


def batch_sharding(mesh, config, ndim: int = 1):
  """Sharding of an input array whose leading axis is the batch."""
  spec = jax.P(batch_axes(config), *([None] * (ndim - 1)))
  return jax.sharding.NamedSharding(mesh, spec)
