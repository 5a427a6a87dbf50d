"""The device mesh and the logical-axis rules that map model axis names onto it.

One mesh, axes ('data', 'fsdp', 'expert', 'tensor'), sizes from config.mesh (-1: the rest of
the devices). Outside the MoE layers `expert` is one more batch axis. The rule table
(config.mesh.rules, default config.DEFAULT_RULES) is the only place where a logical name (embed,
mlp, heads, exp, ...) meets a mesh axis; model code only ever names logical axes.

Several slices (a multislice job: TPU slices joined by the data-centre network, DCN, far slower
than the chips' ICI): config.mesh.data/fsdp/expert/tensor then size the mesh inside one slice
and config.mesh.dcn_data / dcn_fsdp say how the slices are laid along data and fsdp (as
MaxText's ici_* / dcn_*_parallelism; expert and tensor never leave a slice). Each mesh axis is
the product of the two, slice-major: data index = slice position x in-slice data + in-slice
index, as jax's mesh_utils.create_hybrid_device_mesh lays it. Defaults (dcn_data=-1,
dcn_fsdp=1): the slices only split the batch, so the only traffic between slices is the gradient
reduction over data; fsdp gathers, expert exchanges and tensor collectives stay on ICI. One
slice (devices without slice_index count as one) gives exactly the mesh of a single slice.
"""
import contextlib
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import numpy as np

from skymoe_jax import registry
from skymoe_jax.config import ConfigError, vision_tokens
from skymoe_jax.model import layers

MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')
BATCH_AXES = ('data', 'fsdp', 'expert')  # the default rules' activation_batch
DCN_AXES = ('data', 'fsdp')  # the axes that may span slices (config.mesh.dcn_<axis>)


def _sizes_text(sizes) -> str:
  return 'x'.join(f'{a}={s}' for a, s in zip(MESH_AXES, sizes))


def mesh_shape(mesh_cfg, num_devices: int, batch_size: Optional[int] = None,
               batch_axes: Sequence[str] = BATCH_AXES,
               batch_field: str = 'config.data.batch_size') -> tuple:
  """Axis sizes with -1 resolved; raises ConfigError naming the field when they cannot work.

  -1 on one axis: that axis takes the rest of the devices. -1 on one batch axis and on `tensor`
  (MaxText's ici_fsdp_parallelism=-1, as configs/skymoe_7b.py does): the batch axis takes the
  largest share of the rest that `batch_size` still divides over all batch axes, and `tensor`
  the devices left over. With batch_size given, the batch must divide over the batch axes
  (batch_field: where the batch size came from, for the error).
  """
  sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
  for axis, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ConfigError(f'config.mesh.{axis}={size}: sizes must be positive or -1 (the rest)')
  auto = [a for a, s in zip(MESH_AXES, sizes) if s == -1]
  known = math.prod(s for s in sizes if s != -1)
  if len(auto) > 2 or (len(auto) == 2 and (auto[1] != 'tensor' or auto[0] not in batch_axes)):
    raise ConfigError(f'config.mesh.{auto[-1]}=-1: -1 goes on one axis, or on one batch axis '
                      f'{tuple(batch_axes)} and tensor, got {_sizes_text(sizes)}')
  if auto and num_devices % known:
    raise ConfigError(f'config.mesh.{auto[0]}=-1: the {known} devices of the fixed axes '
                      f'({_sizes_text(sizes)}) do not divide the {num_devices} devices')
  rest = num_devices // known if auto else 1
  if len(auto) == 2:
    if batch_size is None:
      raise ValueError('mesh_shape: a batch axis and tensor are both -1: the batch size decides '
                       'their split, none was given')
    fixed_batch = math.prod(s for a, s in zip(MESH_AXES, sizes) if a in batch_axes and s != -1)
    if batch_size % fixed_batch:
      fields = ', '.join(f'config.mesh.{a}={s}' for a, s in zip(MESH_AXES, sizes)
                         if a in batch_axes and s != -1)
      raise ConfigError(f'{fields}: the batch of {batch_size} ({batch_field}) does not divide '
                        f'over their {fixed_batch} batch shards')
    share = max(n for n in range(1, rest + 1)
                if rest % n == 0 and batch_size % (fixed_batch * n) == 0)
    sizes[MESH_AXES.index(auto[0])] = share
    sizes[MESH_AXES.index('tensor')] = rest // share
  elif auto:
    sizes[MESH_AXES.index(auto[0])] = rest
  if math.prod(sizes) > num_devices:
    raise ConfigError(f'config.mesh={_sizes_text(sizes)} needs {math.prod(sizes)} devices, only '
                      f'{num_devices} exist')
  ways = math.prod(s for a, s in zip(MESH_AXES, sizes) if a in batch_axes)
  if batch_size is not None and batch_size % ways:
    fields = ', '.join(f'config.mesh.{a}={s}' for a, s in zip(MESH_AXES, sizes) if a in batch_axes)
    raise ConfigError(f'{fields}: the batch of {batch_size} ({batch_field}) does not divide over '
                      f'the {ways} batch shards; choose batch axes whose product divides it and '
                      'put the other devices on tensor (or tensor=-1)')
  return tuple(sizes)


def slice_of(device) -> int:
  """The device's slice (jax's slice_index, what create_hybrid_device_mesh groups by); 0 for a
  device that has none (CPU, GPU, a single TPU slice's compile-only devices)."""
  return int(getattr(device, 'slice_index', 0) or 0)


def group_by_slice(devices: Sequence) -> list:
  """[[devices of one slice, in the given order], ...] in slice_index order."""
  groups = {}
  for d in devices:
    groups.setdefault(slice_of(d), []).append(d)
  out = [groups[k] for k in sorted(groups)]
  sizes = {k: len(v) for k, v in sorted(groups.items())}
  if len(set(sizes.values())) > 1:
    raise ValueError(f'the devices are spread unevenly over slices (slice_index: devices) '
                     f'{sizes}: a multislice mesh needs the same devices in every slice')
  return out


def dcn_shape(mesh_cfg, num_slices: int, batch_size: Optional[int] = None,
              batch_axes: Sequence[str] = BATCH_AXES,
              batch_field: str = 'config.data.batch_size') -> tuple:
  """How the slices are laid along each mesh axis (1 on expert and tensor), -1 resolved.

  config.mesh.dcn_data / dcn_fsdp: -1 on one of them takes the slices the other leaves;
  their product must be the number of slices. config.mesh.num_slices, when set (> 0, the
  launcher sets it), must match the slices the devices are in. Raises ConfigError naming
  the field; batch_size given: the batch must divide over the slice-wise batch shards.
  """
  get = mesh_cfg.get if hasattr(mesh_cfg, 'get') else dict(mesh_cfg).get
  expected = int(get('num_slices', 0) or 0)
  if expected < 0 or (expected and expected != num_slices):
    raise ConfigError(f'config.mesh.num_slices={expected}: the devices are in {num_slices} '
                      'slice(s) (their slice_index); 0 = take them from the devices')
  for key in mesh_cfg.keys():
    if key.startswith('dcn_') and key[4:] not in DCN_AXES:
      raise ConfigError(f'config.mesh.{key}: only {", ".join("dcn_" + a for a in DCN_AXES)} '
                        'exist: expert and tensor traffic stays inside a slice')
  sizes = {a: int(get(f'dcn_{a}', -1 if a == 'data' else 1)) for a in DCN_AXES}
  text = ', '.join(f'config.mesh.dcn_{a}={s}' for a, s in sizes.items())
  for axis, size in sizes.items():
    if size == 0 or size < -1:
      raise ConfigError(f'config.mesh.dcn_{axis}={size}: sizes must be positive or -1 (the '
                        'slices the other axis leaves)')
  auto = [a for a, s in sizes.items() if s == -1]
  if len(auto) > 1:
    raise ConfigError(f'config.mesh.dcn_{auto[-1]}=-1: -1 goes on one of dcn_data, dcn_fsdp '
                      f'({text})')
  known = math.prod(s for s in sizes.values() if s != -1)
  if auto:
    if num_slices % known:
      raise ConfigError(f'config.mesh.dcn_{auto[0]}=-1: the other dcn axes ({text}) do not '
                        f'divide the {num_slices} slices')
    sizes[auto[0]] = num_slices // known
  if math.prod(sizes.values()) != num_slices:
    raise ConfigError(f'{text}: their product must be the {num_slices} slice(s) the devices '
                      'are in')
  ways = math.prod(s for a, s in sizes.items() if a in batch_axes)
  if batch_size is not None and batch_size % ways:
    fields = ', '.join(f'config.mesh.dcn_{a}={s}' for a, s in sizes.items() if a in batch_axes)
    raise ConfigError(f'{fields}: the batch of {batch_size} ({batch_field}) does not divide '
                      f'over the {ways} slice-wise batch shards')
  return tuple(sizes.get(a, 1) for a in MESH_AXES)


def process_major_devices(devices: Optional[Sequence] = None) -> list:
  """Devices ordered by (process index, id).

  jax does not promise that device ids are grouped by process (on multi-host TPU they follow
  the chip topology). The mesh is filled row-major and its batch axes lead, so this order gives
  each process a contiguous block of the batch, in process order: the rows it loads
  (multihost.host_batch_slice).
  """
  devices = jax.devices() if devices is None else devices
  return sorted(devices, key=lambda d: (d.process_index, d.id))


def hybrid_devices(slices: Sequence[Sequence], ici: Sequence[int],
                   dcn: Sequence[int]) -> np.ndarray:
  """The device array of shape ici x dcn (axis by axis): slice k's first prod(ici) devices,
  in their order, reshaped to `ici`, placed as block k (row-major) of a `dcn` grid of blocks.

  The layout of jax's mesh_utils.create_hybrid_device_mesh, which is not called itself: it
  orders each slice by its ICI torus (create_device_mesh), which interleaves the hosts (on
  v5p:2x2x4 host 0's chips land at positions 0, 1, 8, 9), so a host's devices would no longer
  hold one contiguous block of the batch (multihost.host_batch_slice); within a slice the
  order here is the one a single slice has always had.
  """
  blocks = [np.array(list(group)[:math.prod(ici)]).reshape(ici) for group in slices]
  grid = np.empty(tuple(dcn), dtype=object)
  for k, index in enumerate(np.ndindex(*dcn)):
    grid[index] = blocks[k]
  return np.block(grid.tolist()) if len(blocks) > 1 else blocks[0]


def create_mesh(config, devices: Optional[Sequence] = None, batch_size: Optional[int] = None,
                batch_field: str = 'config.data.batch_size') -> jax.sharding.Mesh:
  """The mesh config.mesh describes, over the first devices it needs (Auto axis types).

  devices defaults to all devices in process-major order; a given list is used as it is
  (grouped by slice when they are in several). batch_size: the global batch the batch axes
  must divide (checked only when given: evaluation and chat pad their own batches); a batch
  axis and tensor both -1 are split by it, default config.data.batch_size. Several slices: the
  in-slice axes are resolved for one slice's devices and its share of the batch.
  """
  devices = process_major_devices() if devices is None else list(devices)
  if batch_size is None and sum(int(config.mesh[a]) == -1 for a in MESH_AXES) == 2:
    batch_size = config.data.batch_size
  slices = group_by_slice(devices)
  axes = batch_axes(config)
  dcn = dcn_shape(config.mesh, len(slices), batch_size, axes, batch_field)
  ways = math.prod(s for a, s in zip(MESH_AXES, dcn) if a in axes)
  if ways > 1 and batch_size is not None:
    batch_size, batch_field = batch_size // ways, f'{batch_field}={batch_size} / {ways} slices'
  ici = mesh_shape(config.mesh, len(slices[0]), batch_size, axes, batch_field)
  return jax.sharding.Mesh(hybrid_devices(slices, ici, dcn), MESH_AXES,
                           axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def slice_axes(mesh) -> dict:
  """{mesh axis: how many slices it spans} for a mesh's device array (1: inside a slice)."""
  ids = np.vectorize(slice_of, otypes=[int])(mesh.devices)
  out = {}
  for k, axis in enumerate(mesh.axis_names):
    # Slices met along this axis with the other indices fixed, the most of any line.
    lines = np.moveaxis(ids, k, -1).reshape(-1, ids.shape[k])
    out[axis] = max(len(set(line)) for line in lines)
  return out


def device_slices(mesh) -> list:
  """The slice of each device of the mesh in flat order: the logical device ids a compiled
  program's replica groups name are positions in this order (its device assignment)."""
  return [slice_of(d) for d in mesh.devices.flat]


def device_coordinates(mesh) -> list:
  """{mesh axis: index} of each device of the mesh in flat order (as device_slices)."""
  shape = mesh.devices.shape
  return [dict(zip(mesh.axis_names, (int(i) for i in np.unravel_index(k, shape))))
          for k in range(mesh.devices.size)]


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


def tokens_per_device(config, mesh_shape: dict, batch_size: int, seq_len: int) -> float:
  """Sequence positions of activations one device holds per layer: the batch over its batch
  shards, times the sequence, over the tensor ways that split the heads and hidden units."""
  ways = math.prod(mesh_shape[a] for a in batch_axes(config))
  return batch_size * seq_len / (ways * mesh_shape['tensor'])


def remat_policy(config, mesh_shape: dict, batch_size: Optional[int] = None,
                 seq_len: Optional[int] = None) -> str:
  """config.model.remat_policy, with 'auto' chosen by the mesh: the first entry
  (max_tokens, policy) of config.model.remat_auto whose max_tokens holds tokens_per_device,
  'full' past the last. batch_size / seq_len default to the config's training batch (image
  tokens + data.text_len). Call before building the model, and build it with the answer."""
  m = config.model
  if m.remat_policy != 'auto':
    return m.remat_policy
  batch_size = config.data.batch_size if batch_size is None else batch_size
  seq_len = seq_len or vision_tokens(m) + config.data.text_len
  tokens = tokens_per_device(config, dict(mesh_shape), batch_size, seq_len)
  table = sorted((int(limit), name) for limit, name in m.get('remat_auto', ()))
  for _, name in table:
    registry.lookup(layers.REMAT_POLICIES, name, 'config.model.remat_auto', 'remat policy')
    if name == 'auto':
      raise ConfigError("config.model.remat_auto: 'auto' cannot choose itself")
  return next((name for limit, name in table if tokens <= limit), 'full')
