"""Projects the skymoe_7b train step onto TPU v5p from its ahead-of-time compile: roofline step
time, projected MFU, and MaxText's published Mixtral 8x7B MFU on v5p for comparison.

  python benchmarks/tpu_projection.py --out=tpu_projection.json \
      [--cases=v5p:4x4x4/1x8x2x4,v5p:2x2x4/1x8x2x1] [--batch_size=144] [--seq_len=2048] \
      [--config=configs/skymoe_7b.py] [--save_dir=/tmp/tpu_proj]
  python benchmarks/tpu_projection.py --from_json=/tmp/tpu_proj/A.aot.json,/tmp/tpu_proj/B.aot.json
  python benchmarks/tpu_projection.py --self_check      # the HLO counters on small functions

A case is TOPOLOGY/DATAxFSDPxEXPERTxTENSOR. Each is compiled with launch/aot_compile.aot_compile
(6-8 minutes and ~3 GiB each for the 7B model on this 2-core host); its report is written to
SAVE_DIR/<case>.aot.json and the optimized HLO to SAVE_DIR/<case>.hlo.txt.gz, which --from_json
reads back (the HLO is re-counted, so no compile is repeated).

From the compiled HLO, per device and per step (loop bodies times their trip counts):
  - compiled FLOPs: 2 x output elements x contracted size of every dot / convolution (on TPU the
    dots are printed as convolutions; holes of dilated / padded windows are not counted), plus
    the Mosaic grouped-matmul kernels ragged_dot lowers to (2 x rows x K x N; with ring expert
    parallelism only the rows of local experts, local / all experts of them for balanced
    routing). XLA's cost_analysis counts a while-loop body once, so it undercounts scanned
    layers. A breakdown by phase (forward / remat / backward) and model area shows where the
    compiled work beyond model_flops comes from.
  - HBM bytes: operands + results of every top-level instruction / fusion (what is in VMEM,
    memory space S(1), is not HBM traffic; dynamic slices and in-place updates count the slice).
  - ICI bytes: collective results (aot_compile.collective_bytes) and the traffic a ring
    schedule sends per device for them (reduce-scatter sends (n-1) x its result, ...).
Then per chip: compute time = FLOPs / peak, memory time = bytes / HBM bandwidth, collective
time = traffic / ICI bandwidth; roofline step = max(compute, memory), collectives assumed hidden
under it (the no-overlap sum is given too); projected MFU = model FLOPs / (chips x peak x step).
Prints a table and writes JSON.
"""
import argparse
import collections
import gzip
import json
import math
import os
import pathlib
import re
import sys
import time

# As in launch/aot_compile.py, before jax is imported: CPU jax for everything but the TPU
# topology, and no libtpu lockfile (a second jax process would otherwise fail to get it).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
  sys.path.insert(0, str(REPO))
from skymoe_jax.profiling import hlo  # noqa: E402  (text only: no jax)

# --- TPU v5p peaks, per chip ---------------------------------------------------------------------
# Cloud TPU documentation, "TPU v5p" system architecture table (cloud.google.com/tpu/docs/v5p):
# peak compute per chip (bf16) 459 TFLOPs; HBM bandwidth 2765 GBps; bidirectional inter-chip
# interconnect (ICI) bandwidth per chip 1200 GBps (the older version of the page: "Interchip
# Interconnect BW 4800 Gbps", i.e. 600 GB/s, one direction). A chip sends at most half of the
# bidirectional figure, 600 GB/s, summed over its 6 torus links: a collective over one torus
# dimension uses 2 of them, so the collective times below are lower bounds.
V5P = {
    'name': 'TPU v5p',
    'peak_bf16_flops_per_s': 459e12,
    'hbm_bytes_per_s': 2765e9,
    'ici_bidirectional_bytes_per_s': 1200e9,
    'ici_send_bytes_per_s': 600e9,
    'source': ('Cloud TPU docs, TPU v5p system architecture (cloud.google.com/tpu/docs/v5p): '
               '459 TFLOPs bf16, 2765 GBps HBM, 1200 GBps bidirectional ICI per chip'),
}

# MaxText's published Mixtral 8x7B training MFU on v5p (dropless megablox MoE): its benchmark
# table gives 52.6-54.9% (end_to_end/tpu/mixtral/Run_Mixtral.md: v5p-128, 251.94 TFLOP/s per
# chip, 54.89%). MaxText's FLOP convention halves the causal attention term; summary.model_flops
# counts it in full (for this model the attention is 6% of model_flops).
MAXTEXT_MIXTRAL_MFU = (0.526, 0.549)
MAXTEXT_SOURCE = ("MaxText's published benchmark table (AI-Hypercomputer/maxtext), Mixtral 8x7B "
                  'on v5p: 52.6-54.9% MFU (v5p-128: 251.94 TFLOP/s/chip, 54.89%)')

DEFAULT_CASES = 'v5p:4x4x4/1x8x2x4,v5p:2x2x4/1x8x2x1'
MESH_AXES = ('data', 'fsdp', 'expert', 'tensor')


def load_aot():
  """launch/aot_compile.py (imported on first use: it sets up jax for TPU topologies)."""
  from launch import aot_compile  # pylint: disable=g-import-not-at-top
  return aot_compile


# --- Reading the optimized HLO -------------------------------------------------------------------

_OP_NAME = re.compile(r'op_name="([^"]*)"')


class Module:
  """A compiled HLO module: computations, their instructions, and how often each runs."""

  def __init__(self, hlo_text: str):
    lines, self.entry = hlo.computations(hlo_text)
    if self.entry is None:
      raise ValueError('no ENTRY computation in the HLO text')
    self.comps = {c: [i for i in map(hlo.parse_instruction, ls) if i]
                  for c, ls in lines.items()}
    self.shapes = {c: {i.name: i.shape for i in instrs} for c, instrs in self.comps.items()}
    self._users, self._names = {}, {}
    # Runs per step: while bodies times the trip count read from their `i < N` condition
    # (None where a count cannot be read); 0 for computations never called from ENTRY.
    self.runs = hlo.executions(lines, self.entry)
    # Computations that are pieces of another instruction (fusion bodies, reducers, kernels'
    # bodies, loop conditions): their memory traffic is their caller's, not their own.
    self.inner = set()
    self.callers = collections.defaultdict(list)  # computation -> [(caller, hlo.Instr)]
    for c, instrs in self.comps.items():
      for i in instrs:
        for kind, t in hlo.called(i.attrs):
          self.callers[t].append((c, i))
          if kind in ('to_apply', 'condition', 'called_computations') or (
              kind == 'calls' and i.opcode == 'fusion'):
            self.inner.add(t)

  def operand_shape(self, comp: str, name: str) -> str:
    return self.shapes.get(comp, {}).get(name, '')

  def instr(self, comp: str, name: str):
    return self._by_name(comp).get(name)

  def root(self, comp: str):
    return next((i for i in self.comps.get(comp, ()) if i.root), None)

  def called(self, instr) -> str:
    match = re.search(r'calls=%?([\w.\-]+)', instr.attrs)
    return match.group(1) if match else ''

  def parameter(self, comp: str, index: int):
    return next((i for i in self.comps.get(comp, ()) if i.opcode == 'parameter'
                 and i.args.strip() == str(index)), None)

  def users(self, comp: str) -> dict:
    """{value name: [(instruction using it, operand position)]} within one computation."""
    if comp not in self._users:
      users = collections.defaultdict(list)
      for i in self.comps.get(comp, ()):
        for pos, o in enumerate(i.operands):
          users[o].append((i, pos))
      self._users[comp] = users
    return self._users[comp]

  def _by_name(self, comp: str) -> dict:
    if comp not in self._names:
      self._names[comp] = {i.name: i for i in self.comps.get(comp, ())}
    return self._names[comp]

  def op_name(self, comp: str, instr: hlo.Instr) -> str:
    """The instruction's source op_name, else that of the fusion that calls its computation."""
    seen = set()
    while True:
      match = _OP_NAME.search(instr.attrs)
      if match:
        return match.group(1)
      callers = self.callers.get(comp, ())
      if not callers or comp in seen or comp not in self.inner:
        return ''
      seen.add(comp)
      comp, instr = callers[0]


# --- FLOPs ---------------------------------------------------------------------------------------

def _ints(text: str):
  return [int(x) for x in text.split(',') if x]


def _window(attrs: str, n: int) -> dict:
  """Per spatial dimension: size, stride, padding low, lhs / rhs dilation (XLA's defaults)."""
  w = {'size': [1] * n, 'stride': [1] * n, 'pad': [0] * n, 'lhs_dilate': [1] * n,
       'rhs_dilate': [1] * n}
  match = re.search(r'window=\{([^}]*)\}', attrs)
  for field, value in re.findall(r'(\w+)=(\S+)', match.group(1) if match else ''):
    if field == 'pad':
      w['pad'] = [int(p.split('_')[0]) for p in value.split('x')]
    elif field in w:
      w[field] = [int(v) for v in value.split('x')]
  return w


def _valid_pairs(in_size, size, out_size, stride, pad_lo, lhs_dilate, rhs_dilate) -> int:
  """(output position, kernel position) pairs that land on a real input element: not in the
  padding, not in a hole of a dilated input (what XLA's cost analysis counts too)."""
  last = (in_size - 1) * lhs_dilate  # the last real element, in dilated coordinates
  total = 0
  for k in range(size):
    offset = k * rhs_dilate - pad_lo  # position of output 0: o * stride + offset
    lo = max(0, -(offset // stride) if offset < 0 else 0)
    while lo < out_size and lo * stride + offset < 0:
      lo += 1
    hi = min(out_size - 1, (last - offset) // stride) if last >= offset else -1
    if hi < lo:
      continue
    if lhs_dilate == 1:
      total += hi - lo + 1
    else:  # only positions on the dilation grid are real
      total += sum(1 for o in range(lo, hi + 1) if (o * stride + offset) % lhs_dilate == 0)
  return total


def conv_flops(out_dims, lhs_dims, rhs_dims, attrs: str) -> int:
  """2 x batch x output features x input features per group x valid window positions."""
  match = re.search(r'dim_labels=([0-9a-z]+)_([0-9a-z]+)->([0-9a-z]+)', attrs)
  lhs_l, rhs_l, out_l = match.groups()
  groups = re.search(r'feature_group_count=(\d+)', attrs)
  batch_groups = re.search(r'batch_group_count=(\d+)', attrs)
  groups = int(groups.group(1)) if groups else 1
  batch_groups = int(batch_groups.group(1)) if batch_groups else 1
  spatial = sorted(int(c) for c in lhs_l if c.isdigit())
  w = _window(attrs, len(spatial))
  positions = 1
  for d in spatial:
    positions *= _valid_pairs(lhs_dims[lhs_l.index(str(d))], rhs_dims[rhs_l.index(str(d))],
                              out_dims[out_l.index(str(d))], w['stride'][d], w['pad'][d],
                              w['lhs_dilate'][d], w['rhs_dilate'][d])
  return (2 * (lhs_dims[lhs_l.index('b')] // batch_groups)
          * (lhs_dims[lhs_l.index('f')] // groups) * rhs_dims[rhs_l.index('o')] * positions)


_FLOAT = ('bf16', 'f16', 'f32', 'f64', 'f8e4m3fn', 'f8e5m2', 'f8e4m3b11fnuz', 'f8e4m3fnuz',
          'f8e5m2fnuz')


def grouped_matmul(instr: hlo.Instr, operand_shapes):
  """(FLOPs, groups) of a grouped-matmul kernel (what ragged_dot lowers to on TPU), else None.

  Its float arrays are two matrices with a common row count M and one [G, K, N] stack of
  weights (an operand forward and for the input gradient, the result for the weight gradient):
  each row meets one group's K x N matrix, 2 M K N FLOPs (every row counted, as if every row
  belonged to a group here).
  """
  if instr.opcode != 'custom-call':
    return None
  match = re.search(r'operand_layout_constraints=\{(.*?)\}\s*(?:,\s*\w+=|$)', instr.attrs)
  operands = (hlo.arrays(match.group(1)) if match else
              [a for s in operand_shapes for a in hlo.arrays(s)])
  floats = [a for a in operands + hlo.arrays(instr.shape) if a.dtype in _FLOAT]
  mats = [a.dims for a in floats if len(a.dims) == 2]
  stacks = [a.dims for a in floats if len(a.dims) == 3]
  if len(mats) != 2 or len(stacks) != 1 or mats[0][0] != mats[1][0]:
    return None
  g, k, n = stacks[0]
  if sorted((k, n)) != sorted((mats[0][1], mats[1][1])):
    return None
  return 2 * mats[0][0] * k * n, g


_AREAS = (('/moe/', 'decoder moe'), ('vision/', 'vision'), ('/attn/', 'decoder attention'),
          ('/mlp/', 'decoder mlp'), ('projector/', 'projector'), ('decoder/', 'decoder lm_head'))


def _phase(op_name: str) -> str:
  if '/' not in op_name:  # no source path (kernels name themselves, e.g. 'ragged-dot-none')
    return ''
  if 'rematted_computation' in op_name:  # jax.checkpoint's forward, recomputed for the backward
    return 'remat'
  return 'backward' if 'transpose(' in op_name else 'forward'


def _area(op_name: str) -> str:
  return next((label for key, label in _AREAS if key in op_name), 'unlabelled')


def _loop_phase(m: Module, comp: str) -> str:
  """The phase most of a top-level computation's instructions come from (for those with no
  source path of their own: kernels, and fusions the compiler created without metadata)."""
  seen = set()
  while comp in m.inner and comp not in seen and m.callers.get(comp):
    seen.add(comp)
    comp = m.callers[comp][0][0]
  cache = m.__dict__.setdefault('_loop_phases', {})
  if comp not in cache:
    counts = collections.Counter(_phase(match.group(1)) for match in
                                 (_OP_NAME.search(i.attrs) for i in m.comps.get(comp, ())) if match)
    counts.pop('', None)
    cache[comp] = counts.most_common(1)[0][0] if counts else '?'
  return cache[comp]


def hlo_flops(program, grouped_row_fraction=None) -> dict:
  """Matmul FLOPs of one run of the compiled program (one device), loops times trip counts.

  program: the optimized HLO text (compiled.as_text()) or a Module. grouped_row_fraction(groups):
  the share of a grouped-matmul kernel's rows that belong to its groups (default 1: all rows).
  Returns FLOPs per kind (dot, convolution, grouped_matmul; grouped_matmul_all_rows), their
  total (and total_all_rows), a breakdown by (phase / area), the FLOPs as written, each loop
  body once (XLA's cost_analysis convention), and the kernels whose work is not known.
  """
  m = program if isinstance(program, Module) else Module(program)
  out = {'dot': 0, 'convolution': 0, 'grouped_matmul': 0, 'grouped_matmul_all_rows': 0,
         'dense_masked_weight_grad': 0, 'written_once': 0, 'unknown_runs': 0,
         'unknown_kernels': {}, 'by_area': {}}
  for comp, instrs in m.comps.items():
    runs = m.runs.get(comp, 0)
    for i in instrs:
      operand_shapes = [m.operand_shape(comp, o) for o in i.operands]
      kind, flops, groups = None, 0, 1
      if i.opcode == 'dot':
        kind = 'dot'
        flops = hlo.dot_flops(hlo.arrays(i.shape)[0].dims, hlo.arrays(operand_shapes[0])[0].dims,
                          i.attrs)
      elif i.opcode == 'convolution':
        kind = 'convolution'
        flops = conv_flops(hlo.arrays(i.shape)[0].dims, hlo.arrays(operand_shapes[0])[0].dims,
                           hlo.arrays(operand_shapes[1])[0].dims, i.attrs)
      elif i.opcode == 'custom-call':
        found = grouped_matmul(i, operand_shapes)
        if found:
          kind, (flops, groups) = 'grouped_matmul', found
        elif 'tpu_custom_call' in i.attrs and 'metadata' not in i.name:
          out['unknown_kernels'][i.name] = runs
      if kind is None:
        continue
      out['written_once'] += flops
      if runs is None:
        out['unknown_runs'] += 1
        continue
      if kind == 'grouped_matmul':
        out['grouped_matmul_all_rows'] += flops * runs
        if grouped_row_fraction is not None:
          flops *= grouped_row_fraction(groups)
      out[kind] += flops * runs
      op_name = m.op_name(comp, i)
      phase = _phase(op_name) or _loop_phase(m, comp)
      if kind == 'grouped_matmul':
        area = 'decoder moe (grouped-matmul kernel)'
      elif not op_name and 'lhs_dilate' in i.attrs:
        # No source metadata; a window dilated over the group dimension is how the ragged_dot
        # weight gradient compiles (every group dense, masked: see self_check).
        area = 'decoder moe (ragged_dot weight gradient, dense masked)'
        out['dense_masked_weight_grad'] += flops * runs
      else:
        area = _area(op_name)
      label = f'{phase} / {area}'
      out['by_area'][label] = out['by_area'].get(label, 0) + flops * runs
  out['total'] = out['dot'] + out['convolution'] + out['grouped_matmul']
  out['total_all_rows'] = out['dot'] + out['convolution'] + out['grouped_matmul_all_rows']
  out['by_area'] = dict(sorted(out['by_area'].items(), key=lambda kv: -kv[1]))
  return out


# --- HBM bytes -----------------------------------------------------------------------------------

# No data moves: tuple plumbing, aliases, control flow (whose bodies are counted themselves).
_NO_TRAFFIC = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'while', 'call',
               'conditional', 'after-all', 'add-dependency', 'opt-barrier', 'partition-id',
               'replica-id', 'async-start', 'async-update', 'async-done', 'domain'}


def _read_bytes(m: Module, comp: str, name: str, full: float):
  """Bytes a fused computation reads of its value `name` (at most `full`): the slices where it
  is only dynamic-sliced, nothing where it is the buffer a dynamic-update-slice updates in
  place, followed through bitcasts and nested fusions. None: the value only flows out as the
  computation's result (its reader is the caller's user)."""
  uses = m.users(comp).get(name, ())
  if not uses:
    root = m.root(comp)
    return None if root is not None and root.name == name else 0.0
  total = 0.0
  for user, pos in uses:
    if user.opcode == 'dynamic-slice' and pos == 0:
      part = hlo.nbytes(hlo.arrays(user.shape), hbm_only=False)
    elif user.opcode == 'dynamic-update-slice' and pos == 0:
      part = 0.0  # updated in place: the update is counted with the result
    elif user.opcode == 'bitcast':
      part = _read_bytes(m, comp, user.name, full)
    elif user.opcode == 'fusion':
      inner = m.called(user)
      param = m.parameter(inner, pos)
      part = _read_bytes(m, inner, param.name, full) if param else full
      if part is None:  # passed through the nested fusion: read as its result is read
        part = _read_bytes(m, comp, user.name, full)
    else:
      part = full
    if part is None:
      return None
    total += part
    if total >= full:
      return full
  return total


def _written_bytes(m: Module, comp: str, instr, full: float) -> float:
  """Bytes written for the value `instr` of a fused computation: a dynamic-update-slice
  writes its update only (the rest of the buffer stays where it is)."""
  while instr is not None and instr.opcode in ('bitcast', 'fusion'):
    if instr.opcode == 'bitcast':
      instr = m.instr(comp, instr.operands[0])
    else:
      comp = m.called(instr)
      instr = m.root(comp)
  if instr is not None and instr.opcode == 'dynamic-update-slice':
    return min(full, hlo.nbytes(hlo.arrays(m.operand_shape(comp, instr.operands[1])),
                                hbm_only=False))
  return full


def _fusion_bytes(m: Module, fusion) -> float:
  """HBM bytes a top-level fusion reads and writes (see _read_bytes, _written_bytes)."""
  fused = m.called(fusion)
  total = 0.0
  for i in m.comps.get(fused, ()):
    if i.opcode == 'parameter':
      full = hlo.nbytes(hlo.arrays(i.shape))  # 0 when the caller's operand sits in VMEM
      read = _read_bytes(m, fused, i.name, full) if full else 0.0
      total += full if read is None else read
  root = m.root(fused)
  elements = ([m.instr(fused, o) for o in root.operands] if root is not None
              and root.opcode == 'tuple' else [root])
  results = hlo.arrays(fusion.shape)
  if len(results) != len(elements):  # cannot pair them up: count the whole result
    return total + hlo.nbytes(results)
  for result, element in zip(results, elements):
    if result.space == 0:
      total += _written_bytes(m, fused, element, hlo.nbytes([result]))
  return total


def hlo_hbm_bytes(program) -> dict:
  """Estimated HBM bytes of one run of the program (one device): operands + results of each
  top-level instruction (fusions as a whole), times its computation's runs. Arrays in another
  memory space (S(1): VMEM, where the compiler prefetched them) are on chip and not counted;
  an async copy counts its HBM side once; a collective counts what it reads and writes."""
  m = program if isinstance(program, Module) else Module(program)
  total, unknown = 0.0, 0
  for comp, instrs in m.comps.items():
    if comp in m.inner:
      continue
    runs = m.runs.get(comp, 0)
    if runs == 0:
      continue
    for i in instrs:
      if i.opcode in _NO_TRAFFIC or 'AllocateBuffer' in i.attrs:
        continue
      operands = [a for o in i.operands for a in hlo.arrays(m.operand_shape(comp, o))]
      if i.opcode == 'fusion':
        size = _fusion_bytes(m, i)
      elif i.opcode.endswith('-start'):  # copy-start, all-gather-start, ...: what it reads
        size = hlo.nbytes(operands)
      elif i.opcode.endswith('-done'):  # ... and what the matching -done writes
        size = hlo.nbytes(hlo.arrays(i.shape))
      elif i.opcode == 'dynamic-slice':
        size = 2 * hlo.nbytes(hlo.arrays(i.shape))
      elif i.opcode == 'dynamic-update-slice':
        size = 2 * hlo.nbytes(hlo.arrays(m.operand_shape(comp, i.operands[1])))
      else:
        size = hlo.nbytes(operands) + hlo.nbytes(hlo.arrays(i.shape))
      if runs is None:
        unknown += 1
      else:
        total += size * runs
  return {'hbm_bytes': total, 'unknown_runs': unknown}


# --- ICI traffic ---------------------------------------------------------------------------------

# Bytes a device sends per byte of a collective's result, as a function of the group size n
# (ring / bidirectional-ring schedules): a reduce-scatter's input is n times its result.
_SEND_PER_RESULT_BYTE = {
    'all-gather': lambda n: (n - 1) / n,
    'all-reduce': lambda n: 2 * (n - 1) / n,
    'reduce-scatter': lambda n: n - 1,
    'all-to-all': lambda n: (n - 1) / n,
    'ragged-all-to-all': lambda n: (n - 1) / n,  # result buffer: an upper bound
    'collective-permute': lambda n: 1,
}


def _group_size(attrs: str, num_devices: int) -> int:
  """Devices in one replica group, in any of the three ways HLO prints them."""
  mesh = re.search(r"replica_groups=mesh\[([^\]]*)\]\s*\{([^}]*)\}", attrs)
  if mesh:  # mesh['axis_0'=8,'axis_1'=2] {'axis_0'}: the product of the named axes' sizes
    sizes = dict((a, int(n)) for a, n in re.findall(r"'(\w+)'=(\d+)", mesh.group(1)))
    return math.prod(sizes[a] for a in re.findall(r"'(\w+)'", mesh.group(2)))
  iota = re.search(r'replica_groups=\[(\d+),(\d+)\]', attrs)
  if iota:
    return int(iota.group(2))
  listed = re.search(r'replica_groups=\{\{([0-9,]*)\}', attrs)
  if listed:
    return len(_ints(listed.group(1)))
  return num_devices  # replica_groups={}: every device


def ici_traffic(program, num_devices: int) -> dict:
  """Bytes one device sends over ICI per step, by collective kind (loops times trip counts)."""
  m = program if isinstance(program, Module) else Module(program)
  starts = {}  # async collectives: the -start carries the groups, the -done the result
  for instrs in m.comps.values():
    for i in instrs:
      if i.opcode.endswith('-start'):
        starts[i.name] = i
  out = {k: 0.0 for k in _SEND_PER_RESULT_BYTE}
  for comp, instrs in m.comps.items():
    runs = m.runs.get(comp, 0)
    for i in instrs:
      kind, attrs = i.opcode, i.attrs
      if kind.endswith('-done'):
        kind = kind[:-len('-done')]
        attrs = starts[i.operands[0]].attrs if i.operands and i.operands[0] in starts else ''
      if kind not in out:
        continue
      if runs is None:
        return {k: None for k in out} | {'total': None}
      n = _group_size(attrs, num_devices)
      out[kind] += (hlo.nbytes(hlo.arrays(i.shape), hbm_only=False) *
                    _SEND_PER_RESULT_BYTE[kind](n) * runs)
  out['total'] = sum(out.values())
  return out


def analyze_hlo(hlo_text: str, num_devices: int, num_experts: int = 0,
                ep_strategy: str = '') -> dict:
  """FLOPs, HBM bytes and collective bytes of one device's step, from the optimized HLO.

  With ring expert parallelism every device's grouped-matmul kernels see all gathered rows,
  of which, for balanced routing, only local_experts / num_experts belong to its groups:
  `compiled_flops` counts those (`..._all_rows` counts every row).
  """
  m = Module(hlo_text)
  ring = num_experts and ep_strategy == 'ring'
  flops = hlo_flops(m, (lambda groups: groups / num_experts) if ring else None)
  coll = load_aot().collective_bytes(hlo_text)
  per_step = [v['bytes_per_step'] for v in coll.values()]
  return {
      'compiled_flops': flops['total'],
      'compiled_flops_all_rows': flops['total_all_rows'],
      'flops': flops,
      'hbm': hlo_hbm_bytes(m),
      'collective_result_bytes_per_step': None if None in per_step else sum(per_step),
      'collectives': coll,
      'ici_send_bytes': ici_traffic(m, num_devices),
      'hlo_lines': sum(len(v) for v in m.comps.values()),
  }


# --- Projection ----------------------------------------------------------------------------------

def project(report: dict, analysis: dict, peaks: dict = V5P) -> dict:
  """Roofline step time and projected MFU for one AOT report and the analysis of its HLO.

  Per chip (a v5p chip is one JAX device): compute time = compiled FLOPs / peak, memory time =
  HBM bytes / HBM bandwidth, collective time = ICI bytes sent / ICI send bandwidth. Roofline step
  = max(compute, memory), collectives assumed overlapped; no-overlap step = roofline + collective.
  """
  chips, devices = report['num_chips'], report['num_devices']
  per_chip = devices // chips
  model = report['model_flops']
  peak = peaks['peak_bf16_flops_per_s']
  mem = report['memory_per_device']
  per_step = [v.get('bytes_per_step') for v in report.get('collectives_per_device', {}).values()]
  out = {
      'topology': report['topology'], 'mesh': report['mesh'], 'chips': chips,
      'memory_per_chip_gib': round(mem['total_gib'] * per_chip, 2), 'fits_hbm': mem['fits_hbm'],
      'model_flops': model, 'model_flops_per_chip': model / chips,
      'xla_cost_analysis_flops_per_device': report['xla_flops_per_device'],
      'compiled_flops_per_device': None, 'model_over_compiled': None,
      'hbm_bytes_per_device': None,
      'collective_result_bytes_per_device': (sum(per_step) if per_step and None not in per_step
                                             else None),
      'ici_send_bytes_per_device': None,
      'maxtext_mixtral_mfu': list(MAXTEXT_MIXTRAL_MFU),
      'step_s_at_maxtext_mfu': [model / (chips * peak * f) for f in MAXTEXT_MIXTRAL_MFU],
  }
  if analysis is None:
    return out
  compiled = analysis['compiled_flops']
  hbm = analysis['hbm']['hbm_bytes']
  ici = analysis['ici_send_bytes']['total']
  t_compute = compiled * per_chip / peak
  t_memory = hbm * per_chip / peaks['hbm_bytes_per_s']
  t_ici = ici * per_chip / peaks['ici_send_bytes_per_s'] if ici is not None else None
  t_step = max(t_compute, t_memory)
  t_serial = t_step + (t_ici or 0.0)
  bound = 'compute' if t_compute >= t_memory else 'memory'
  if t_ici is not None and t_ici > t_step:
    bound = 'collectives (if not overlapped)'
  out.update({
      'compiled_flops_per_device': compiled,
      'compiled_flops_all_rows_per_device': analysis['compiled_flops_all_rows'],
      'compiled_over_xla_cost_analysis': compiled / report['xla_flops_per_device'],
      'model_over_compiled': model / (compiled * devices),
      'hbm_bytes_per_device': hbm,
      'collective_result_bytes_per_device': analysis['collective_result_bytes_per_step'],
      'ici_send_bytes_per_device': ici,
      'arithmetic_intensity_flops_per_byte': compiled / hbm if hbm else None,
      'compute_s': t_compute, 'memory_s': t_memory, 'collective_s': t_ici,
      'roofline_step_s': t_step, 'no_overlap_step_s': t_serial, 'bound': bound,
      'projected_mfu': model / (chips * peak * t_step),
      'projected_mfu_no_overlap': model / (chips * peak * t_serial),
      'compiled_flops_utilization': compiled * devices / (chips * peak * t_step),
  })
  moe = report.get('moe', {})
  dense = analysis['flops'].get('dense_masked_weight_grad', 0)
  if dense and moe.get('ep_strategy') == 'ring' and moe.get('num_experts'):
    # What-if: a grouped weight gradient (as megablox's tgmm kernel) multiplies each row by its
    # own expert only: 1 / num_experts of the dense masked work over every (local) expert.
    leaner = compiled - dense * (1 - 1 / moe['num_experts'])
    t_leaner = max(leaner * per_chip / peak, t_memory)
    out.update({
        'dense_masked_weight_grad_flops_per_device': dense,
        'compiled_flops_grouped_weight_grad_per_device': leaner,
        'model_over_compiled_grouped_weight_grad': model / (leaner * devices),
        'projected_mfu_grouped_weight_grad': model / (chips * peak * t_leaner),
    })
  return out


# --- Compiling, or reading back ------------------------------------------------------------------

def parse_case(case: str) -> tuple:
  """'v5p:4x4x4/1x8x2x4' -> ('v5p:4x4x4', {'data': 1, 'fsdp': 8, 'expert': 2, 'tensor': 4})."""
  topology, _, mesh = case.partition('/')
  sizes = [int(s) for s in mesh.split('x')] if mesh else []
  if len(sizes) != len(MESH_AXES):
    raise ValueError(f'case {case!r}: expected TOPOLOGY/DATAxFSDPxEXPERTxTENSOR, e.g. '
                     'v5p:4x4x4/1x8x2x4')
  return topology, dict(zip(MESH_AXES, sizes))


def case_tag(topology: str, mesh: dict) -> str:
  return topology.replace(':', '_') + '_' + 'x'.join(str(mesh[a]) for a in MESH_AXES)


def compile_case(config_path, topology, mesh, batch_size, seq_len, save_dir) -> tuple:
  """aot_compile for one case; returns (report, hlo text) and saves both under save_dir."""
  from skymoe_jax import config_defaults  # pylint: disable=g-import-not-at-top
  aot = load_aot()
  config = config_lib.load_config_file(config_path)
  config.mesh.update(mesh)
  report, hlo_text = aot.aot_compile(config, topology, batch_size, seq_len,
                                     name=pathlib.Path(config_path).name, with_hlo=True)
  tag = case_tag(topology, mesh)
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
  sibling FILE.hlo.txt.gz (an aot_compile.py JSON on its own has no HLO to count)."""
  path = pathlib.Path(path)
  with open(path) as f:
    text = f.read().strip()
  try:
    report = json.loads(text)
  except json.JSONDecodeError:  # aot_compile.py's stdout: the JSON is its last line
    report = json.loads(text.splitlines()[-1])
  candidates = [report.get('hlo_file'), str(path).replace('.aot.json', '') + '.hlo.txt.gz']
  for hlo_file in candidates:
    if hlo_file and pathlib.Path(hlo_file).exists() and hlo_file.endswith('.gz'):
      with gzip.open(hlo_file, 'rt') as f:
        return report, f.read()
  return report, None


def run_case(report: dict, hlo_text) -> dict:
  analysis = None
  if hlo_text is not None:
    moe = report.get('moe', {})
    analysis = analyze_hlo(hlo_text, report['num_devices'], moe.get('num_experts', 0),
                           moe.get('ep_strategy', ''))
  return {'projection': project(report, analysis), 'hlo_analysis': analysis, 'aot_report': report}


# --- Self check: the counters against hand counts and cost_analysis ------------------------------

def _compile(fn, *args, device=None):
  """(optimized HLO text, cost_analysis FLOPs) of jit(fn) for ((shape, dtype), ...) args."""
  import jax  # pylint: disable=g-import-not-at-top
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
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

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
    results.append((name, expected, hlo_flops(text)['total'], cost))
  return results


def bytes_check(device) -> tuple:
  """HBM bytes of (x @ w1) @ w2 in bf16 for a TPU device, against a hand count that assumes
  the [1024, 2048] intermediate goes through HBM: (expected, counted)."""
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  b = 2  # bf16
  shapes = [((1024, 512), jnp.bfloat16), ((512, 2048), jnp.bfloat16), ((2048, 512), jnp.bfloat16)]
  text, _ = _compile(lambda x, w1, w2: (x @ w1) @ w2, *shapes, device=device)
  expected = b * (1024 * 512 + 2 * 512 * 2048 + 2 * 1024 * 2048 + 1024 * 512)
  return expected, hlo_hbm_bytes(text)['hbm_bytes']


def _print_self_check():
  print(f'{"":9s}{"case":42s}{"expected":>12s}{"counted":>12s}{"cost_analysis":>15s}')
  platforms = [('cpu', None)]
  try:
    platforms.append(('tpu v5p', load_aot().topology_devices('v5p:2x2x1')[0]))
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
    ('memory per chip (GiB)', 'memory_per_chip_gib', '{:.1f}'),
    ('fits 95 GiB HBM', 'fits_hbm', None),
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
  width = max(12, *(len(h) for h in heads))
  lines = [f'{"":40s}' + ''.join(f'{h:>{width + 2}s}' for h in heads)]
  for label, key, fmt in _ROWS:
    lines.append(f'{label:40s}' + ''.join(f'{_cell(p.get(key), fmt):>{width + 2}s}'
                                          for p in projections))
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='tpu_projection.json')
  parser.add_argument('--cases', default=DEFAULT_CASES,
                      help='comma-separated TOPOLOGY/DATAxFSDPxEXPERTxTENSOR')
  parser.add_argument('--config', default=str(REPO / 'configs' / 'skymoe_7b.py'))
  parser.add_argument('--batch_size', type=int, default=144)
  parser.add_argument('--seq_len', type=int, default=2048)
  parser.add_argument('--save_dir', default='/tmp/tpu_proj')
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
      topology, mesh = parse_case(case)
      start = time.perf_counter()
      sources.append(compile_case(args.config, topology, mesh, args.batch_size, args.seq_len,
                                  args.save_dir))
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
    json.dump({'peaks': V5P, 'maxtext': {'mfu': list(MAXTEXT_MIXTRAL_MFU),
                                         'source': MAXTEXT_SOURCE},
               'overlap_assumption': ('roofline_step_s = max(compute, memory): collectives '
                                      'fully overlapped; no_overlap_step_s adds them'),
               'cases': results}, f, indent=1)


if __name__ == '__main__':
  main()
