"""Projects the skymoe_7b train step onto TPU v5p from its ahead-of-time compile: roofline step
time, projected MFU, and MaxText's published Mixtral 8x7B MFU on v5p for comparison.

  python benchmarks/tpu_projection.py --out=tpu_projection.json \
      [--cases=v5p:4x4x4,v5p:2x2x4/1x8x2x1@full] [--batch_size=144] [--seq_len=2048] \
      [--config=configs/skymoe_7b.py] [--save_dir=/tmp/tpu_proj]
  python benchmarks/tpu_projection.py --from_json=/tmp/tpu_proj/A.aot.json,/tmp/tpu_proj/B.aot.json
  python benchmarks/tpu_projection.py --self_check      # the HLO counters on small functions
  python benchmarks/tpu_projection.py --cases=v5p:2x2x4 --num_slices=2 \
      --out=benchmarks/results/tpu_projection_v5p_2slices.json    # a multislice job

A case is TOPOLOGY[/DATAxFSDPxEXPERTxTENSOR][@REMAT_POLICY]; without them the config's own
mesh and remat policy (skymoe_7b: resolved for the topology). Each is compiled with
skymoe_jax.profiling.aot (5-11 minutes and ~4 GiB each for the 7B model on this 2-core host); its report is written to
SAVE_DIR/<case>.aot.json and the optimized HLO to SAVE_DIR/<case>.hlo.txt.gz, which --from_json
reads back (the HLO is re-counted, so no compile is repeated).

The cost model is skymoe_jax/profiling/roofline.py: from the compiled HLO, per device and per
step (loop bodies times their trip counts), compiled FLOPs (dots, convolutions, grouped-matmul
kernels; a breakdown by phase and model area), HBM bytes and the ICI bytes a ring schedule sends;
then per chip compute, memory and collective times with the chip's figures from
skymoe_jax/parallel/hardware.py (v5p), roofline step = max(compute, memory) with collectives
assumed hidden under it (the no-overlap sum is given too), projected MFU = model FLOPs /
(chips x peak x step). This script adds MaxText's published MFU for comparison, prints a table
and writes JSON.

--num_slices=N compiles each case for N slices of its topology (config.mesh.dcn_* lay them out):
the program is compiled per slice, its in-slice collectives are costed as above, and what
crosses the data-centre network between slices (the megascale transfers of the compiled HLO,
profiling/hlo.py) is listed under `cross_slice` with its bytes per step; the roofline does not
include that traffic.
"""
import argparse
import gzip
import json
import os
import pathlib
import sys
import time

# As in skymoe_jax/aot_compile.py, before jax is imported: CPU jax for everything but the TPU
# topology, and no libtpu lockfile (a second jax process would otherwise fail to get it).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from skymoe_jax import config as config_lib  # noqa: E402
from skymoe_jax.parallel import hardware  # noqa: E402
from skymoe_jax.profiling import aot  # noqa: E402
from skymoe_jax.profiling import hlo  # noqa: E402
from skymoe_jax.profiling import roofline  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
CHIP = hardware.CHIPS['v5p']

# MaxText's published Mixtral 8x7B training MFU on v5p (dropless megablox MoE): its benchmark
# table gives 52.6-54.9% (end_to_end/tpu/mixtral/Run_Mixtral.md: v5p-128, 251.94 TFLOP/s per
# chip, 54.89%). MaxText's FLOP convention halves the causal attention term; model/flops.py's
# model_flops counts it in full (for this model the attention is 6% of model_flops).
MAXTEXT_MIXTRAL_MFU = (0.526, 0.549)
MAXTEXT_SOURCE = ("MaxText's published benchmark table (AI-Hypercomputer/maxtext), Mixtral 8x7B "
                  'on v5p: 52.6-54.9% MFU (v5p-128: 251.94 TFLOP/s/chip, 54.89%)')

DEFAULT_CASES = 'v5p:4x4x4,v5p:2x2x4'  # the config's own mesh and remat policy
MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def peaks(chip=CHIP) -> dict:
  """The chip's figures the projection uses, as the output JSON's 'peaks' records them."""
  return {'name': chip.name, 'peak_bf16_flops_per_s': chip.peak_bf16_flops_per_s,
          'hbm_bytes_per_s': chip.hbm_bytes_per_s,
          'ici_bidirectional_bytes_per_s': chip.ici_bidirectional_bytes_per_s,
          'ici_send_bytes_per_s': chip.ici_send_bytes_per_s, 'source': chip.source}


def project(report: dict, analysis) -> dict:
  """roofline.project on v5p, with the step time MaxText's published MFU would give."""
  out = roofline.project(report, analysis, CHIP)
  peak = CHIP.peak_bf16_flops_per_s
  out['maxtext_mixtral_mfu'] = list(MAXTEXT_MIXTRAL_MFU)
  out['step_s_at_maxtext_mfu'] = [report['model_flops'] / (report['num_chips'] * peak * f)
                                  for f in MAXTEXT_MIXTRAL_MFU]
  return out


# --- Compiling, or reading back ------------------------------------------------------------------

def parse_case(case: str) -> tuple:
  """'v5p:4x4x4[/1x8x2x4][@save_proj]' -> (topology, {'data': 1, ...} or {} for the config's
  own mesh, remat policy or '' for the config's own)."""
  case, _, policy = case.partition('@')
  topology, _, mesh = case.partition('/')
  sizes = [int(s) for s in mesh.split('x')] if mesh else []
  if sizes and len(sizes) != len(MESH_AXES):
    raise ValueError(f'case {case!r}: expected TOPOLOGY[/DATAxFSDPxEXPERTxTENSOR][@POLICY], '
                     'e.g. v5p:4x4x4/1x8x2x4@save_proj')
  return topology, dict(zip(MESH_AXES, sizes)), policy


def case_tag(topology: str, mesh: dict, policy: str = '', num_slices: int = 1) -> str:
  mesh_text = 'x'.join(str(mesh[a]) for a in MESH_AXES) if mesh else 'default'
  return (topology.replace(':', '_') + (f'_x{num_slices}slices' if num_slices > 1 else '') + '_'
          + mesh_text + (f'_{policy}' if policy else ''))


def compile_case(config_path, topology, mesh, batch_size, seq_len, save_dir,
                 policy='', num_slices: int = 1) -> tuple:
  """aot_compile for one case; returns (report, hlo text) and saves both under save_dir."""
  config = config_lib.load(str(config_path))
  config.mesh.update(mesh)
  if policy:
    config.model.remat_policy = policy
  report, hlo_text = aot.aot_compile(config, topology, batch_size, seq_len,
                                     name=pathlib.Path(config_path).name, with_hlo=True,
                                     num_slices=num_slices)
  tag = case_tag(topology, mesh, policy, num_slices)
  save_dir = pathlib.Path(save_dir)
  save_dir.mkdir(parents=True, exist_ok=True)
  hlo_file = save_dir / f'{tag}.hlo.txt.gz'
  with gzip.open(hlo_file, 'wt') as f:
    f.write(hlo_text)
  report['hlo_file'] = str(hlo_file)
  with open(save_dir / f'{tag}.aot.json', 'w') as f:
    json.dump(report, f, indent=1)
  return report, hlo_text


def read_case(path) -> tuple:
  """(report, hlo text or None) from an AOT JSON: its 'hlo_file', else FILE.aot.json's
  sibling FILE.hlo.txt.gz (a `python -m skymoe_jax.aot_compile` JSON on its own has no HLO to
  count)."""
  path = pathlib.Path(path)
  with open(path) as f:
    text = f.read().strip()
  try:
    report = json.loads(text)
  except json.JSONDecodeError:  # skymoe_jax.aot_compile's stdout: the JSON is its last line
    report = json.loads(text.splitlines()[-1])
  candidates = [report.get('hlo_file'), str(path).replace('.aot.json', '') + '.hlo.txt.gz']
  for hlo_file in candidates:
    if hlo_file and pathlib.Path(hlo_file).exists() and hlo_file.endswith('.gz'):
      with gzip.open(hlo_file, 'rt') as f:
        return report, f.read()
  return report, None


def cross_slice(report: dict, hlo_text: str) -> dict:
  """What crosses between slices per device and step, recounted from the HLO: by kind and axes,
  the transfers that are no data-parallel gradient reduction, and the per-step total."""
  axes = report.get('slice_axes', [])
  transfers = [dict(t, axes=axes) for t in hlo.megascale_transfers(hlo_text)]
  per_step = [t['bytes'] * t['runs'] for t in transfers if t['runs'] is not None]
  return {'slice_axes': axes,
          'summary': hlo.summarize_cross_slice(transfers),
          'not_gradient_reductions': hlo.not_gradient_reductions(transfers),
          'bytes_per_step_per_device': (sum(per_step) if len(per_step) == len(transfers)
                                        else None),
          'sources': sorted({t['source'].rsplit('_', 1)[0] for t in transfers}),
          'note': ('one send per transfer (its recv is the other half); bytes: the sent buffer '
                   'of one device; per step: times the runs of its loop')}


def run_case(report: dict, hlo_text) -> dict:
  analysis = None
  slices = report.get('num_slices', 1)
  if hlo_text is not None:
    moe = report.get('moe', {})
    # A multislice program is compiled per slice: its groups count one slice's devices.
    analysis = roofline.analyze_hlo(hlo_text, report['num_devices'] // slices,
                                    moe.get('num_experts', 0), moe.get('ep_strategy', ''))
  out = {'projection': project(report, analysis), 'hlo_analysis': analysis, 'aot_report': report}
  if slices > 1 and hlo_text is not None:
    out['cross_slice'] = cross_slice(report, hlo_text)
  return out


# --- Self check: the counters against hand counts and cost_analysis ------------------------------

def _compile(fn, *args, device=None):
  """(optimized HLO text, cost_analysis FLOPs) of jit(fn) for ((shape, dtype), ...) args."""
  sharding = jax.sharding.SingleDeviceSharding(device) if device is not None else None
  compiled = jax.jit(fn).lower(*[jax.ShapeDtypeStruct(s, d, sharding=sharding)
                                 for s, d in args]).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return compiled.as_text(), float(cost.get('flops', 0.0))


def self_check(device=None) -> list:
  """Small jitted functions whose matmul FLOPs are known by hand, compiled on CPU (device None)
  or for a TPU device: [(case, expected, counted, cost_analysis FLOPs)]. The TPU-only cases
  pin down how ragged_dot compiles: a grouped-matmul kernel forward and for the input
  gradient, and a dense matmul over every group, masked, for the weight gradient."""
  f32, bf16 = 'float32', 'bfloat16'
  m, k, n, steps = 64, 96, 128, 5

  def scanned(x, w):  # x: [m, k]; w: [k, k]; 5 matmuls in a loop
    return jax.lax.scan(lambda c, _: (jnp.tanh(c @ w), None), x, None, length=steps)[0]

  def chain(x, w1, w2):  # unscanned: [m, k] @ [k, n] @ [n, k]
    return (x @ w1) @ w2

  def conv(x, w):  # NHWC 2-D convolution, stride 2, padding 1, rhs dilation 2
    return jax.lax.conv_general_dilated(x, w, (2, 2), ((1, 1), (1, 1)), rhs_dilation=(2, 2),
                                        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def batched(a, b):  # attention-like: [8, 32, 16] x [8, 16, 32]
    return jnp.einsum('hqd,hdk->hqk', a, b)

  def positions(size, kernel, stride, pad, dilation):  # of one spatial dimension, by brute force
    out = (size + 2 * pad - (kernel - 1) * dilation - 1) // stride + 1
    return sum(1 for o in range(out) for t in range(kernel)
               if 0 <= o * stride + t * dilation - pad < size)

  cases = [
      ('matmul in lax.scan x5', scanned, [((m, k), f32), ((k, k), f32)], steps * 2 * m * k * k),
      ('two chained matmuls', chain, [((m, k), f32), ((k, n), f32), ((n, k), f32)],
       2 * m * k * n + 2 * m * n * k),
      ('strided dilated padded conv', conv, [((2, 15, 15, 8), f32), ((3, 3, 8, 16), f32)],
       2 * 2 * 8 * 16 * positions(15, 3, 2, 1, 2) ** 2),
      ('batched matmul', batched, [((8, 32, 16), f32), ((8, 16, 32), f32)],
       2 * 8 * 32 * 16 * 32),
  ]
  if device is not None and device.platform == 'tpu':
    rows, d, f, groups = 512, 256, 384, 4
    ragged = [((rows, d), bf16), ((groups, d, f), bf16), ((groups,), 'int32')]

    def loss(x, w, sizes):
      return jnp.sum(jax.lax.ragged_dot(x, w, sizes).astype(jnp.float32))

    cases += [
        ('ragged_dot (kernel)', jax.lax.ragged_dot, ragged, 2 * rows * d * f),
        ('grad ragged_dot (kernel + masked dense)', jax.grad(loss, argnums=(0, 1)), ragged,
         2 * rows * d * f * (1 + groups)),
    ]
  results = []
  for name, fn, args, expected in cases:
    text, cost = _compile(fn, *args, device=device)
    results.append((name, expected, roofline.hlo_flops(text)['total'], cost))
  return results


def bytes_check(device) -> tuple:
  """HBM bytes of (x @ w1) @ w2 in bf16 for a TPU device, against a hand count that assumes
  the [1024, 2048] intermediate goes through HBM: (expected, counted)."""
  b = 2  # bf16
  shapes = [((1024, 512), jnp.bfloat16), ((512, 2048), jnp.bfloat16), ((2048, 512), jnp.bfloat16)]
  text, _ = _compile(lambda x, w1, w2: (x @ w1) @ w2, *shapes, device=device)
  expected = b * (1024 * 512 + 2 * 512 * 2048 + 2 * 1024 * 2048 + 1024 * 512)
  return expected, roofline.hlo_hbm_bytes(text)['hbm_bytes']


def _print_self_check():
  print(f'{"":9s}{"case":42s}{"expected":>12s}{"counted":>12s}{"cost_analysis":>15s}')
  platforms = [('cpu', None)]
  try:
    platforms.append(('tpu v5p', aot.topology_devices('v5p:2x2x1')[0]))
  except Exception as e:  # pylint: disable=broad-except
    print(f'(no TPU topology from libtpu, CPU only: {e})')
  ok = True
  for label, device in platforms:
    for name, expected, counted, cost in self_check(device):
      ok &= counted == expected
      print(f'{label:8s} {name:42s}{expected:12.0f}{counted:12.0f}{cost:15.0f}'
            f'{"" if counted == expected else "   MISMATCH"}')
  print('cost_analysis counts the scanned matmul once (and adds elementwise FLOPs: tanh)')
  if len(platforms) > 1:
    expected, counted = bytes_check(platforms[1][1])
    print(f'tpu v5p  HBM bytes of two chained bf16 matmuls: hand count {expected:.0f}, '
          f'counted {counted:.0f}')
  return ok


# --- Command line --------------------------------------------------------------------------------

_ROWS = [
    # label, key, format
    ('chips', 'chips', '{:d}'),
    ('mesh d x f x e x t', 'mesh', None),
    ('remat policy', 'remat_policy', None),
    ('memory per chip (GiB)', 'memory_per_chip_gib', '{:.1f}'),
    (f'fits {CHIP.hbm_gib} GiB HBM', 'fits_hbm', None),
    ('model FLOPs (step, all chips)', 'model_flops', '{:.4g}'),
    ('model FLOPs per chip', 'model_flops_per_chip', '{:.4g}'),
    ('XLA cost_analysis FLOPs / device', 'xla_cost_analysis_flops_per_device', '{:.4g}'),
    ('compiled FLOPs / device (trip-counted)', 'compiled_flops_per_device', '{:.4g}'),
    ('  same, every grouped-matmul row', 'compiled_flops_all_rows_per_device', '{:.4g}'),
    ('  of which MoE weight grad, dense masked', 'dense_masked_weight_grad_flops_per_device',
     '{:.4g}'),
    ('model / compiled', 'model_over_compiled', '{:.3f}'),
    ('HBM bytes / device', 'hbm_bytes_per_device', '{:.4g}'),
    ('collective result bytes / device', 'collective_result_bytes_per_device', '{:.4g}'),
    ('ICI bytes sent / device (ring)', 'ici_send_bytes_per_device', '{:.4g}'),
    ('compute time (s)', 'compute_s', '{:.3f}'),
    ('HBM time (s)', 'memory_s', '{:.3f}'),
    ('collective time, all links (s)', 'collective_s', '{:.3f}'),
    ('roofline step, overlapped (s)', 'roofline_step_s', '{:.3f}'),
    ('step, collectives not overlapped (s)', 'no_overlap_step_s', '{:.3f}'),
    ('bound by', 'bound', None),
    ('projected MFU (overlapped)', 'projected_mfu', '{:.1%}'),
    ('projected MFU (not overlapped)', 'projected_mfu_no_overlap', '{:.1%}'),
    ('  if the MoE weight grad were grouped', 'projected_mfu_grouped_weight_grad', '{:.1%}'),
    ('MaxText Mixtral MFU on v5p', 'maxtext_mixtral_mfu', 'pct-range'),
    ('step at MaxText MFU (s)', 'step_s_at_maxtext_mfu', 'range'),
]


def _cell(value, fmt):
  if value is None:
    return 'n/a'
  if fmt == 'pct-range':
    return '-'.join(f'{v:.1%}' for v in value)
  if fmt == 'range':
    return '-'.join(f'{v:.3f}' for v in value)
  if isinstance(value, dict):
    return 'x'.join(str(v) for v in value.values())
  return fmt.format(value) if fmt else str(value)


def format_table(projections) -> str:
  heads = [p['topology'] for p in projections]
  width = max(12, *(len(h) for h in heads),
              *(len(_cell(p.get(key), fmt)) for p in projections for _, key, fmt in _ROWS))
  lines = [f'{"":40s}' + ''.join(f'{h:>{width + 2}s}' for h in heads)]
  for label, key, fmt in _ROWS:
    lines.append(f'{label:40s}' + ''.join(f'{_cell(p.get(key), fmt):>{width + 2}s}'
                                          for p in projections))
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='tpu_projection.json')
  parser.add_argument('--cases', default=DEFAULT_CASES,
                      help='comma-separated TOPOLOGY[/DATAxFSDPxEXPERTxTENSOR][@REMAT_POLICY]')
  parser.add_argument('--config', default=str(REPO / 'configs' / 'skymoe_7b.py'))
  parser.add_argument('--batch_size', type=int, default=144)
  parser.add_argument('--seq_len', type=int, default=2048)
  parser.add_argument('--save_dir', default='/tmp/tpu_proj')
  parser.add_argument('--num_slices', type=int, default=1,
                      help='compile each case for this many slices of its topology')
  parser.add_argument('--from_json', default='',
                      help='comma-separated AOT JSON files written earlier (no compile)')
  parser.add_argument('--self_check', action='store_true')
  args = parser.parse_args()
  if args.self_check:
    sys.exit(0 if _print_self_check() else 1)

  results = []
  if args.from_json:
    sources = [read_case(p) for p in args.from_json.split(',')]
  else:
    sources = []
    for case in args.cases.split(','):
      topology, mesh, policy = parse_case(case)
      start = time.perf_counter()
      sources.append(compile_case(args.config, topology, mesh, args.batch_size, args.seq_len,
                                  args.save_dir, policy, args.num_slices))
      print(f'compiled {case} in {time.perf_counter() - start:.0f} s', flush=True)
  for report, hlo_text in sources:
    results.append(run_case(report, hlo_text))
  projections = [r['projection'] for r in results]
  print(format_table(projections))
  for r in results:
    a = r['hlo_analysis']
    if a:
      print(f"\n{r['projection']['topology']}: compiled FLOPs by (phase/area), per device:")
      total = a['flops']['total']
      for label, value in a['flops']['by_area'].items():
        print(f'  {label:60s} {value:11.4g}  {value / total:6.1%}')
  with open(args.out, 'w') as f:
    json.dump({'peaks': peaks(), 'maxtext': {'mfu': list(MAXTEXT_MIXTRAL_MFU),
                                         'source': MAXTEXT_SOURCE},
               'overlap_assumption': ('roofline_step_s = max(compute, memory): collectives '
                                      'fully overlapped; no_overlap_step_s adds them'),
               'cases': results}, f, indent=1)


if __name__ == '__main__':
  main()
