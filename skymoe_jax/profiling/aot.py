"""The full sharded train step compiled ahead of time for a TPU topology, on a CPU-only machine.

  aot_compile(config, 'v5p:4x4x4', batch_size=144) -> report dict

Needs libtpu (`pip install "jax[tpu]==0.10.2"`): jax.experimental.topologies then describes a TPU
pod's devices without any TPU attached, and XLA's TPU compiler builds the real executable for it.
Nothing is allocated: state and batch are ShapeDtypeStructs that carry their shardings. The
report holds memory per device, XLA's FLOP count, the model's FLOPs, and the bytes moved by each
kind of collective (read from the compiled HLO, profiling/roofline.py). The command is
`python -m skymoe_jax.aot_compile`.
"""
import copy
import time

import jax
import optax

from skymoe_jax import config as config_lib
from skymoe_jax.data import batch as batch_lib
from skymoe_jax.model import attention_kernels, factory, layout
from skymoe_jax.model.moe import backends
from skymoe_jax.model import flops as flops_lib
from skymoe_jax.config import num_feature_layers
from skymoe_jax.parallel import hardware
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.parallel import sharding
from skymoe_jax.profiling import hlo
from skymoe_jax.profiling import roofline
from skymoe_jax.training import state as state_lib
from skymoe_jax.training import step as step_lib

GiB = hardware.GiB

# Adam's learning rate does not change what compiles; the optimizer state (mu, nu) does.
LEARNING_RATE = 2e-5


def topology_devices(topology: str, num_slices: int = 1):
  """The compile-only TPU devices of a topology such as 'v5p:4x4x4' (needs libtpu), of
  num_slices such slices (each device's slice_index says which; one slice: none is set)."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  if num_slices < 1:
    raise ValueError(f'--num_slices={num_slices}: must be >= 1')
  extra = {'num_slices': num_slices} if num_slices > 1 else {}
  try:
    desc = topologies.get_topology_desc(platform='tpu', topology_name=topology, **extra)
  except RuntimeError as e:
    raise RuntimeError(f'--topology={topology!r}: no TPU topology ({e}); AOT compilation needs '
                       'libtpu: pip install "jax[tpu]==0.10.2"') from e
  return list(desc.devices)


def hbm_bytes_per_device(topology: str, devices) -> tuple:
  """(HBM bytes one device may use, devices per chip).

  A chip's HBM is shared by its devices: v5p, v5e and v6e show one device per chip; a v4
  topology description shows its two TensorCores as two devices.
  """
  generation = topology.split(':')[0]
  chip = hardware.CHIPS.get(generation)
  if chip is None or chip.hbm_bytes is None:
    known = sorted(g for g, c in hardware.CHIPS.items() if c.hbm_bytes is not None)
    raise ValueError(f'--topology={topology!r}: HBM size unknown for {generation!r}; known: '
                     f'{known}')
  chips = len({(mesh_lib.slice_of(d), tuple(d.coords)) for d in devices})  # coords: per slice
  per_chip = len(devices) // chips
  return chip.hbm_bytes // per_chip, per_chip


def abstract_batch(config, mesh, batch_size: int, seq_len: int) -> dict:
  """ShapeDtypeStructs of one training batch, with the shardings the train step expects."""
  m = config.model
  nv = config_lib.vision_tokens(m)
  text_len = seq_len - nv
  if text_len < 2:
    raise ValueError(f'--seq_len={seq_len} must hold the {nv} image tokens and at least 2 text '
                     'tokens')
  if seq_len > m.llm.max_seq_len:
    raise ValueError(f'--seq_len={seq_len} exceeds config.model.llm.max_seq_len='
                     f'{m.llm.max_seq_len}')
  shapes = batch_lib.shapes(config, batch_size, batch_lib.train_fields(config), text_len)
  sh = sharding.batch_shardings(mesh, config)
  return {k: jax.ShapeDtypeStruct(shape, dtype, sharding=sh[k])
          for k, (shape, dtype) in shapes.items()}


def scan_trip_counts(config) -> dict:
  """How many times XLA's loops over repeated layers run (0 = layers not scanned)."""
  m = config.model
  if not m.scan_layers:
    return {'decoder_scanned_blocks': 0, 'decoder_layers_per_block': 0,
            'vision_scanned_layers': 0}
  period = layout.decoder_period(m)
  return {'decoder_scanned_blocks': m.llm.num_layers // period,
          'decoder_layers_per_block': period,
          'vision_scanned_layers': num_feature_layers(m.vision.depth, m.vision.feature_layer)}


# --- The compile ---------------------------------------------------------------------------------

def _memory(compiled, hbm_bytes: int) -> dict:
  stats = compiled.memory_analysis()
  names = ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes',
           'alias_size_in_bytes', 'generated_code_size_in_bytes', 'host_argument_size_in_bytes',
           'host_output_size_in_bytes', 'host_temp_size_in_bytes', 'peak_memory_in_bytes')
  mem = {n.replace('_size_in_bytes', '_bytes').replace('_in_bytes', '_bytes'):
         int(getattr(stats, n)) for n in names if hasattr(stats, n)}
  # The donated state's buffers are reused for the new state: aliased bytes are counted once.
  total = (mem['argument_bytes'] + mem['output_bytes'] + mem['temp_bytes']
           - mem.get('alias_bytes', 0))
  mem['total_bytes'] = total
  mem['total_gib'] = round(total / GiB, 3)
  mem['hbm_bytes'] = hbm_bytes
  mem['hbm_gib'] = round(hbm_bytes / GiB, 3)
  mem['fits_hbm'] = total + mem.get('generated_code_bytes', 0) <= hbm_bytes
  if 'peak_memory_bytes' in mem:
    # XLA's own peak figure; it came out below the sum above in every compile we ran (the sum
    # counts the whole temp allocation as live next to all arguments). fits_hbm uses the sum.
    mem['peak_gib'] = round(mem['peak_memory_bytes'] / GiB, 3)
    mem['fits_hbm_by_peak'] = mem['peak_memory_bytes'] <= hbm_bytes
  return mem


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per program
    cost = cost[0] if cost else {}
  return dict(cost or {})


def cross_slice_report(hlo_text: str, mesh) -> dict:
  """What the compiled step sends between slices: every transfer, a summary by kind and axes,
  and those that are no data-parallel gradient reduction (none, for a good multislice mesh)."""
  spanning = [a for a, n in mesh_lib.slice_axes(mesh).items() if n > 1]
  cross = hlo.cross_slice_collectives(hlo_text, mesh_lib.device_slices(mesh),
                                      mesh_lib.device_coordinates(mesh), spanning)
  return {'slice_axes': spanning,
          'cross_slice_summary': hlo.summarize_cross_slice(cross),
          'cross_slice_not_gradient_reductions': hlo.not_gradient_reductions(cross),
          'cross_slice_collectives': cross}


def aot_compile(config, topology: str, batch_size: int, seq_len: int = 0, devices=None,
                name: str = '', with_hlo: bool = False, num_slices: int = 1):
  """Compiles make_train_step(...).jitted (AdamW) for `topology`; returns the report dict
  (with_hlo: the pair (report, the compiled program's optimized HLO text)).

  seq_len 0 means config.model.llm.max_seq_len. devices: the topology's devices when the
  caller already has them. name: the config's name for the report. num_slices > 1: that many
  slices of `topology` (a multislice job; config.mesh.dcn_* lay them out); the report then
  lists the collectives whose replica groups cross slices.
  """
  config = copy.deepcopy(config)
  m = config.model
  seq_len = seq_len or m.llm.max_seq_len
  devices = topology_devices(topology, num_slices) if devices is None else devices
  hbm, devices_per_chip = hbm_bytes_per_device(topology, devices)

  # The mesh first: its -1 axes and the remat policy 'auto' are resolved for this batch.
  mesh = mesh_lib.create_mesh(config, devices=devices, batch_size=batch_size,
                              batch_field=f'--batch_size={batch_size}')
  m.remat_policy = mesh_lib.remat_policy(config, mesh.shape, batch_size, seq_len)
  model = factory.create_model(config)
  tx = optax.adamw(LEARNING_RATE)
  abstract_state, state_sh = state_lib.state_shardings(config, model, tx, mesh)
  state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                       abstract_state, state_sh)
  batch = abstract_batch(config, mesh, batch_size, seq_len)
  step = step_lib.make_train_step(config, model, tx, mesh)

  start = time.perf_counter()
  with mesh_lib.activate(mesh, config):
    lowered = step.jitted.lower(state, batch)
  lower_seconds = time.perf_counter() - start
  compiled = lowered.compile()
  compile_seconds = time.perf_counter() - start

  cost = _cost(compiled)
  platform = devices[0].platform
  attention_impl = m.attention_impl
  if attention_impl == 'auto':
    with jax.set_mesh(mesh):
      attention_impl = attention_kernels.auto_choice(m.dtype)
  hlo_text = compiled.as_text()
  flops = flops_lib.model_flops(config, batch_size, seq_len)
  xla_flops = float(cost.get('flops', 0.0))
  trips = scan_trip_counts(config)
  report = {
      'config': name,
      'topology': topology,
      'device_kind': devices[0].device_kind,
      'num_devices': len(mesh.devices.flat),
      'num_chips': len(mesh.devices.flat) // devices_per_chip,
      'num_slices': len(mesh_lib.group_by_slice(list(mesh.devices.flat))),
      'mesh': dict(mesh.shape),
      'slices_per_axis': mesh_lib.slice_axes(mesh),
      'batch_axes': list(mesh_lib.batch_axes(config)),
      'batch_size': batch_size,
      'seq_len': seq_len,
      'text_len': seq_len - config_lib.vision_tokens(m),
      'remat_policy': m.remat_policy,
      'tokens_per_device': mesh_lib.tokens_per_device(config, mesh.shape, batch_size, seq_len),
      'attention_impl': attention_impl,
      'dtype': m.dtype,
      'moe': {'backend': m.moe.backend, 'ep_strategy': m.moe.ep_strategy,
              'ragged_impl': backends.resolve_ragged_impl(m.moe.ragged_impl, platform),
              'num_experts': m.moe.num_experts,
              'top_k': m.moe.top_k},
      'optimizer': f'optax.adamw({LEARNING_RATE})',
      'lower_seconds': round(lower_seconds, 2),
      'compile_seconds': round(compile_seconds, 2),
      'memory_per_device': _memory(compiled, hbm),
      'xla_flops_per_device': xla_flops,
      'xla_bytes_accessed_per_device': float(cost.get('bytes accessed', 0.0)),
      **flops,
      'xla_flops_x_devices_over_model_flops': (xla_flops * len(mesh.devices.flat)
                                               / flops['model_flops']),
      'scan': trips,
      'flops_note': (
          "XLA's cost_analysis counts a while-loop body once, not once per iteration: the "
          f"{trips['decoder_scanned_blocks']} scanned decoder blocks and "
          f"{trips['vision_scanned_layers']} scanned vision layers each appear once in "
          'xla_flops_per_device: with scan_layers the XLA figure undercounts the step and the '
          'ratio is no measure of overhead (remat recomputation, padding, dispatch); '
          'model_flops excludes remat recomputation'),
      'collectives_per_device': roofline.collective_bytes(hlo_text),
      'collectives_note': ('one device; count / bytes: each collective op in the compiled HLO '
                           'once, as written (an op in a scanned loop body once); '
                           'bytes_per_step: times the runs of its loop (trip counts read from '
                           'the loop conditions)'),
  }
  if report['num_slices'] > 1:
    report.update(cross_slice_report(hlo_text, mesh))

  return (report, hlo_text) if with_hlo else report
