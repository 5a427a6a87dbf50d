"""Reading XLA's optimized HLO text (`compiled.as_text()`): computations, instructions, array
shapes, and how often each computation runs per call of the module.

Plain text, no jax: one reader for profiling/roofline.py (FLOPs, HBM and collective bytes of a
compiled step: the AOT report's collectives, benchmarks/tpu_projection.py's roofline),
benchmarks/train_step.py (which model part each profiled op belongs to) and the multislice
check (the device groups of each collective, `replica_groups`, mapped to slices and mesh axes:
which collectives cross the slow network between slices).
"""
import collections
import math
import re

import numpy as np

ITEMSIZE = {'pred': 1, 's4': 0.5, 'u4': 0.5, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 's32': 4,
            'u32': 4, 's64': 8, 'u64': 8, 'f16': 2, 'bf16': 2, 'f32': 4, 'f64': 8,
            'f8e4m3fn': 1, 'f8e5m2': 1, 'f8e4m3b11fnuz': 1, 'f8e4m3fnuz': 1, 'f8e5m2fnuz': 1,
            'c64': 8, 'c128': 16}

# `[ENTRY] %name (PARAMETERS) -> RESULT {`
_COMPUTATION = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s+\(.*->.*\{\s*$')
# `[ROOT] %name = SHAPE opcode(OPERANDS), ATTRIBUTES`; SHAPE may be a (nested) tuple of arrays.
_INSTRUCTION = re.compile(r'^\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s([a-z][a-z0-9\-]*)\((.*)$')
# One array type with its layout, whose S(n) names a memory space other than HBM (n > 0).
_ARRAY = re.compile(r'\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^}]*\})?')
_SPACE = re.compile(r'S\((\d+)\)')
_OPERAND = re.compile(r'%([\w.\-]+)')
_CALLED = re.compile(r'\b(calls|body|condition|to_apply|branch_computations|called_computations)='
                     r'\{?(%[\w.\-]+(?:,\s*%[\w.\-]+)*)\}?')
_SCALAR_CONSTANT = re.compile(r'=\s*s32\[\]\S*\s+constant\((\d+)\)')

Instr = collections.namedtuple('Instr', 'name shape opcode operands attrs root args')
Array = collections.namedtuple('Array', 'dtype dims space')


def computations(hlo_text: str):
  """({computation name: [its instruction lines]}, the ENTRY computation's name or None).

  An instruction whose attributes run over several lines (a kernel's multi-line
  kernel_metadata={...}) is joined into one line: it goes on until its braces balance.
  """
  comps, entry, current, pending = {}, None, None, ''
  for line in hlo_text.splitlines():
    if pending:
      pending += ' ' + line.strip()
      if pending.count('{') <= pending.count('}'):
        comps[current].append(pending)
        pending = ''
      continue
    header = _COMPUTATION.match(line)
    if header:
      current = header.group(2)
      comps[current] = []
      if header.group(1):
        entry = current
    elif line.startswith('}'):
      current = None
    elif current is not None:
      if line.count('{') > line.count('}'):
        pending = line
      else:
        comps[current].append(line)
  return comps, entry


def _split_call(rest: str):
  """'a, b), attrs' -> ('a, b', 'attrs'): the operand list ends at its matching parenthesis."""
  depth = 1
  for i, ch in enumerate(rest):
    if ch == '(':
      depth += 1
    elif ch == ')':
      depth -= 1
      if depth == 0:
        return rest[:i], rest[i + 1:]
  return rest, ''


def parse_instruction(line: str):
  """An Instr (operands: the %names among the operands; args: the operand text), or None for a
  line that is no instruction."""
  match = _INSTRUCTION.match(line)
  if not match:
    return None
  root, name, shape, opcode, rest = match.groups()
  operands, attrs = _split_call(rest)
  return Instr(name, shape, opcode, _OPERAND.findall(operands), attrs, bool(root), operands)


def called(attrs: str):
  """[(kind, computation)] an instruction's attributes call: kind is calls | body | condition |
  to_apply | branch_computations | called_computations."""
  return [(kind, t.strip().lstrip('%')) for kind, targets in _CALLED.findall(attrs)
          for t in targets.split(',')]


def arrays(shape_text: str):
  """The arrays of a (tuple) shape: dtype, dims, memory space (0 = HBM); tokens are left out."""
  out = []
  for dtype, dims, layout in _ARRAY.findall(shape_text):
    if dtype in ITEMSIZE:
      space = _SPACE.search(layout or '')
      out.append(Array(dtype, tuple(int(d) for d in dims.split(',') if d),
                       int(space.group(1)) if space else 0))
  return out


def nbytes(arrs, hbm_only: bool = True) -> float:
  """Bytes of the arrays; hbm_only: only those in HBM (memory space 0)."""
  return sum(ITEMSIZE[a.dtype] * math.prod(a.dims) for a in arrs if not hbm_only or a.space == 0)


def dot_flops(out_dims, lhs_dims, attrs: str) -> int:
  """A dot's FLOPs: 2 x output elements x the product of the lhs contracting dimensions."""
  match = re.search(r'lhs_contracting_dims=\{([0-9,]*)\}', attrs)
  contracting = [int(d) for d in match.group(1).split(',') if d] if match else []
  return 2 * math.prod(out_dims) * math.prod(lhs_dims[d] for d in contracting)


def trip_count(condition_lines):
  """N for a loop condition `i < N` with one s32 constant (how scan loops from 0 compile)."""
  constants = [int(c) for line in condition_lines for c in _SCALAR_CONSTANT.findall(line)]
  compares_lt = any(' compare(' in line and 'direction=LT' in line for line in condition_lines)
  return constants[0] if len(constants) == 1 and compares_lt else None


def condition_lines(comps, condition: str):
  """A loop condition's lines and those of the computations it calls: the CPU compiler wraps
  the `i < N` compare in a small fusion, TPU's leaves it in the condition itself."""
  lines = list(comps.get(condition, ()))
  inner = [t for line in lines for t in re.findall(r'calls=%?([\w.\-]+)', line)]
  return lines + [line for t in inner for line in comps.get(t, ())]


def executions(comps, entry: str):
  """How often each computation runs per call of ENTRY (while bodies x their trip counts).

  comps: computations()'s lines. None where a loop's trip count cannot be read from its
  condition; 0: never called from ENTRY. Loop conditions themselves are not counted.
  """
  callers = {}  # computation -> [(caller, times per run of the caller)]
  for name, lines in comps.items():
    for line in lines:
      for kind, target in called(line):
        if kind == 'condition':
          continue
        times = 1
        if kind == 'body':
          condition = re.search(r'condition=%?([\w.\-]+)', line).group(1)
          times = trip_count(condition_lines(comps, condition))
        callers.setdefault(target, []).append((name, times))

  runs = {}

  def count(name, stack=()):
    if name == entry:
      return 1
    if name not in runs:
      if name in stack:
        raise ValueError(f'HLO computation {name} calls itself')
      total = 0
      for caller, times in callers.get(name, ()):
        parent = count(caller, stack + (name,))
        if parent is None or times is None:
          total = None
          break
        total += parent * times
      runs[name] = total
    return runs[name]

  return {name: count(name) for name in comps}


# --- Collectives and their device groups ----------------------------------------------------------

COLLECTIVE_KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                    'ragged-all-to-all', 'collective-permute')
# replica_groups=[G,S]<=[d0,d1,...]T(p0,p1,...): iota(d0 x d1 x ...) reshaped to dims, transposed
# by the permutation, then read as G groups of S.
_IOTA_GROUPS = re.compile(r'replica_groups=\[(\d+),(\d+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?')
_LISTED_GROUPS = re.compile(r'replica_groups=\{((?:\{[0-9,]*\},?\s*)*)\}')
_PAIRS = re.compile(r'source_target_pairs=\{((?:\{\d+,\d+\},?\s*)*)\}')


def _int_lists(text: str):
  return [tuple(int(x) for x in g.split(',') if x) for g in re.findall(r'\{([0-9,]*)\}', text)]


def replica_groups(attrs: str, num_devices: int):
  """The device groups of a collective, as tuples of (logical) device ids, from each way HLO
  prints them: listed `{{0,1},{2,3}}`, iota `[2,2]<=[4]` or `[4,2]<=[2,2,2]T(2,1,0)`, `{}` (one
  group of all num_devices), and a collective-permute's source_target_pairs (each pair a group).
  None when the attributes name no groups."""
  iota = _IOTA_GROUPS.search(attrs)
  if iota:
    num, size = int(iota.group(1)), int(iota.group(2))
    dims = [int(d) for d in iota.group(3).split(',')]
    ids = np.arange(math.prod(dims)).reshape(dims)
    if iota.group(4):
      ids = ids.transpose([int(p) for p in iota.group(4).split(',')])
    return [tuple(int(i) for i in row) for row in ids.reshape(num, size)]
  pairs = _PAIRS.search(attrs)
  if pairs:
    return _int_lists(pairs.group(1))
  listed = _LISTED_GROUPS.search(attrs)
  if listed:
    groups = _int_lists(listed.group(1))
    return groups or [tuple(range(num_devices))]
  return None


def collective_ops(hlo_text: str):
  """[(computation, Instr, kind)] of every collective that carries its device groups: the op
  itself, or its `-start` (the `-done` has none); also those inside async wrappers."""
  comps, _ = computations(hlo_text)
  out = []
  for comp, lines in comps.items():
    for line in lines:
      instr = parse_instruction(line)
      if not instr:
        continue
      kind = instr.opcode[:-len('-start')] if instr.opcode.endswith('-start') else instr.opcode
      if kind in COLLECTIVE_KINDS:
        out.append((comp, instr, kind))
  return out


# A multislice TPU program is compiled per slice (num_partitions = one slice's devices): its
# collectives' groups stay inside the slice, and what crosses slices is a pair of host transfers
# (send / recv) handled by the megascale runtime, whose frontend attributes name the collective
# it implements (ALL_REDUCE, REDUCE_SCATTER, ALL_GATHER, ALL_TO_ALL, ONE_TO_ONE), its reduction
# and the op it came from (the rendezvous, e.g. all-reduce.348_0).
_MEGASCALE_KINDS = {'ALL_REDUCE': 'all-reduce', 'REDUCE_SCATTER': 'reduce-scatter',
                    'ALL_GATHER': 'all-gather', 'ALL_TO_ALL': 'all-to-all',
                    'ONE_TO_ONE': 'collective-permute'}
_NUM_PARTITIONS = re.compile(r'^HloModule\s.*\bnum_partitions=(\d+)', re.M)


def _attribute(attrs: str, name: str) -> str:
  match = re.search(name + r'="([^"]*)"', attrs)
  return match.group(1) if match else ''


def megascale_transfers(hlo_text: str) -> list:
  """The transfers between slices of a multislice TPU program: one entry per `send` to the
  megascale runtime (its `recv` is the other half): kind (as the collective's opcode), reduce
  (SUM, MIN, ...; '' for gathers), source (the op it implements), bytes of the sent buffer, runs
  (of its computation per step; None: a loop count unread)."""
  comps, entry = computations(hlo_text)
  runs = executions(comps, entry) if entry else {}
  out = []
  for comp, lines in comps.items():
    for line in lines:
      instr = parse_instruction(line)
      if not instr or instr.opcode != 'send':
        continue
      kind = _attribute(instr.attrs, '_xla_megascale_transfer_type')
      if not kind:
        continue
      out.append({'kind': _MEGASCALE_KINDS.get(kind, kind.lower()),
                  'reduce': _attribute(instr.attrs, '_xla_megascale_reduce_operation'),
                  'source': _attribute(instr.attrs, '_xla_host_transfer_rendezvous'),
                  'name': instr.name, 'computation': comp,
                  'bytes': nbytes(arrays(instr.shape)[:1], hbm_only=False),  # (data, u32, token)
                  'runs': runs.get(comp, 0)})
  return out


def cross_slice_collectives(hlo_text: str, device_slices, device_coordinates,
                            slice_axes=()) -> list:
  """The collectives that cross slices, read from the compiled program.

  device_slices[i]: the slice of logical device i (the i-th device of the mesh, flattened: the
  program's device assignment); device_coordinates[i]: its {mesh axis: index}; slice_axes: the
  mesh axes that span slices. A program over all devices (num_partitions = len(device_slices)):
  each collective one of whose replica groups holds devices of two or more slices, with the
  mesh axes its groups vary over. A program compiled per slice (TPU multislice): its
  megascale_transfers, along slice_axes. Each entry: kind, axes, bytes (one device's buffer),
  runs, and where it came from (name / source / op_name).
  """
  parts = _NUM_PARTITIONS.search(hlo_text)
  if parts and int(parts.group(1)) < len(device_slices):
    return [dict(t, axes=sorted(slice_axes)) for t in megascale_transfers(hlo_text)]
  comps, entry = computations(hlo_text)
  runs = executions(comps, entry) if entry else {}
  out = []
  for comp, instr, kind in collective_ops(hlo_text):
    groups = replica_groups(instr.attrs, len(device_slices)) or []
    crossing = [g for g in groups if len({device_slices[i] for i in g}) > 1]
    if not crossing:
      continue
    axes = sorted({a for g in crossing for a in device_coordinates[g[0]]
                   if len({device_coordinates[i][a] for i in g}) > 1})
    out.append({'kind': kind, 'reduce': '', 'name': instr.name, 'computation': comp,
                'group_size': max(len(g) for g in crossing), 'axes': axes,
                'bytes': nbytes(arrays(instr.shape), hbm_only=False),
                'runs': runs.get(comp, 0),
                'op_name': _attribute(instr.attrs, 'op_name')})
  return out


def not_gradient_reductions(cross: list, data_axes=('data',)) -> list:
  """The entries of cross_slice_collectives that are not a data-parallel reduction (an
  all-reduce or reduce-scatter that sums, along a data axis): what a multislice mesh must not
  send between slices (fsdp gathers, expert exchanges, tensor collectives, permutes)."""
  return [c for c in cross if c['kind'] not in ('all-reduce', 'reduce-scatter')
          or c.get('reduce') not in ('', 'SUM') or not set(c['axes']) & set(data_axes)]


def summarize_cross_slice(cross: list) -> dict:
  """{kind/reduce along axes: {count, bytes, bytes_per_step}} of cross_slice_collectives."""
  out = {}
  for c in cross:
    key = f"{c['kind']}{'/' + c['reduce'].lower() if c.get('reduce') else ''} over " \
          f"{'+'.join(c['axes']) or '?'}"
    row = out.setdefault(key, {'count': 0, 'bytes': 0, 'bytes_per_step': 0})
    row['count'] += 1
    row['bytes'] += c['bytes']
    if row['bytes_per_step'] is not None and c['runs'] is not None:
      row['bytes_per_step'] += c['bytes'] * c['runs']
    else:
      row['bytes_per_step'] = None
  return out
