"""The compiled-step cost model: what one device's step does, read from XLA's optimized HLO
(`compiled.as_text()`, e.g. of profiling/aot.py's TPU compile), and the roofline step time and
MFU it projects onto a chip of parallel/hardware.py's table.

Per device and per step (loop bodies times their trip counts, profiling/hlo.py):
  - compiled FLOPs (hlo_flops): 2 x output elements x contracted size of every dot /
    convolution (on TPU the dots are printed as convolutions; holes of dilated / padded windows
    are not counted), plus the Mosaic grouped-matmul kernels ragged_dot lowers to
    (2 x rows x K x N; with ring expert parallelism only the rows of local experts, local / all
    experts of them for balanced routing), and the fused attention kernels (splash: every block
    pair of S x T, recomputation in its backward included). XLA's cost_analysis counts a
    while-loop body once, so it undercounts scanned layers. A breakdown by phase (forward / remat / backward) and model
    area shows where the compiled work beyond model_flops comes from.
  - HBM bytes (hlo_hbm_bytes): operands + results of every top-level instruction / fusion (what
    is in VMEM, memory space S(1), is not HBM traffic; dynamic slices and in-place updates count
    the slice).
  - ICI bytes: collective results (collective_bytes) and the traffic a ring schedule sends per
    device for them (ici_traffic: a reduce-scatter sends (n-1) x its result, ...).
Then per chip (project): compute time = FLOPs / peak, memory time = bytes / HBM bandwidth,
collective time = traffic / ICI send bandwidth; roofline step = max(compute, memory),
collectives assumed hidden under it (the no-overlap sum is given too); projected MFU = model
FLOPs / (chips x peak x step).

Plain text in, numbers out: no jax, nothing compiled here.
"""
import collections
import math
import re

from skymoe_jax.profiling import hlo

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


# Splash attention's TPU kernels (model/attention_kernels.py) by name, and the S x T x head_dim
# matmuls each runs: forward QK^T and PV; dq recomputes QK^T, then dO V^T and dS K; dkv recomputes
# QK^T, then dO V^T, P^T dO and dS^T Q.
_ATTENTION_KERNEL_MATMULS = (('splash_mha_fwd', 2), ('splash_mha_dq', 3), ('splash_mha_dkv', 4))


def attention_kernel(instr: hlo.Instr, operand_shapes):
  """FLOPs of a fused attention kernel (splash on TPU), else None: its q, k, v operands
  [..., heads, T, head_dim] and [..., heads, S, head_dim], 2 T S head_dim per head and matmul,
  every block pair counted (those a causal mask lets the kernel skip too: an upper bound, as
  model_flops counts attention in full)."""
  if instr.opcode != 'custom-call':
    return None
  matmuls = next((n for prefix, n in _ATTENTION_KERNEL_MATMULS if instr.name.startswith(prefix)),
                 None)
  if matmuls is None:
    return None
  match = re.search(r'operand_layout_constraints=\{(.*?)\}\s*(?:,\s*\w+=|$)', instr.attrs)
  operands = (hlo.arrays(match.group(1)) if match else
              [a for s in operand_shapes for a in hlo.arrays(s)])
  qkv = [a.dims for a in operands if a.dtype in _FLOAT and len(a.dims) >= 3][:3]
  if len(qkv) < 3:
    return None
  q, k = qkv[0], qkv[1]
  return matmuls * 2 * math.prod(q) * k[-2]


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
  Returns FLOPs per kind (dot, convolution, grouped_matmul, attention_kernel;
  grouped_matmul_all_rows), their
  total (and total_all_rows), a breakdown by (phase / area), the FLOPs as written, each loop
  body once (XLA's cost_analysis convention), and the kernels whose work is not known.
  """
  m = program if isinstance(program, Module) else Module(program)
  out = {'dot': 0, 'convolution': 0, 'grouped_matmul': 0, 'grouped_matmul_all_rows': 0,
         'attention_kernel': 0,
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
        attention = attention_kernel(i, operand_shapes)
        if found:
          kind, (flops, groups) = 'grouped_matmul', found
        elif attention:
          kind, flops = 'attention_kernel', attention
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
        area = _area(op_name) + (' (attention kernel)' if kind == 'attention_kernel' else '')
      label = f'{phase} / {area}'
      out['by_area'][label] = out['by_area'].get(label, 0) + flops * runs
  dense = out['dot'] + out['convolution'] + out['attention_kernel']
  out['total'] = dense + out['grouped_matmul']
  out['total_all_rows'] = dense + out['grouped_matmul_all_rows']
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

COLLECTIVES = ('all-gather', 'all-reduce', 'reduce-scatter', 'all-to-all', 'ragged-all-to-all',
               'collective-permute')


def collective_bytes(hlo_text: str) -> dict:
  """Per collective kind: the ops in the compiled HLO, and the bytes of their results.

  An async pair (`all-gather-start` / `all-gather-done`) counts once, at its `-done` (whose
  result is the collective's output); a synchronous op counts at itself. Bytes are one device's
  result buffers. `count` and `bytes`: each op once, as written (an op in a loop body once);
  `bytes_per_step`: each op times the runs of its computation, loop bodies x the trip count
  read from the loop's `i < N` condition (None if some loop's count could not be read).
  """
  comps, entry = hlo.computations(hlo_text)
  runs = hlo.executions(comps, entry) if entry else {}
  out = {k: {'count': 0, 'bytes': 0, 'bytes_per_step': 0} for k in COLLECTIVES}
  for name, lines in comps.items():
    for line in lines:
      instr = hlo.parse_instruction(line)
      if not instr:
        continue
      opcode = instr.opcode
      kind = opcode[:-len('-done')] if opcode.endswith('-done') else opcode
      if kind not in out:
        continue
      size = hlo.nbytes(hlo.arrays(instr.shape), hbm_only=False)
      out[kind]['count'] += 1
      out[kind]['bytes'] += size
      times = runs.get(name, 0)  # 0: never called from ENTRY
      if times is None or out[kind]['bytes_per_step'] is None:
        out[kind]['bytes_per_step'] = None
      else:
        out[kind]['bytes_per_step'] += size * times
  return out


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
  coll = collective_bytes(hlo_text)
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

def project(report: dict, analysis, chip) -> dict:
  """Roofline step time and projected MFU for one AOT report and the analysis of its HLO.

  chip: a parallel/hardware.py Chip (its peak, HBM bandwidth and ICI send bandwidth).
  analysis: analyze_hlo's result, or None (then only the report's own figures are filled in).
  Per chip (its devices run side by side: a v5p chip is one JAX device): compute time =
  compiled FLOPs / peak, memory time = HBM bytes / HBM bandwidth, collective time = ICI bytes
  sent / ICI send bandwidth. Roofline step = max(compute, memory), collectives assumed
  overlapped; no-overlap step = roofline + collective.
  """
  for field in ('peak_bf16_flops_per_s', 'hbm_bytes_per_s', 'ici_send_bytes_per_s'):
    if getattr(chip, field) is None:
      raise ValueError(f'{chip.name}: no {field} in parallel/hardware.py CHIPS, which the '
                       'roofline needs')
  chips, devices = report['num_chips'], report['num_devices']
  per_chip = devices // chips
  model = report['model_flops']
  peak = chip.peak_bf16_flops_per_s
  mem = report['memory_per_device']
  per_step = [v.get('bytes_per_step') for v in report.get('collectives_per_device', {}).values()]
  out = {
      'topology': report['topology'], 'mesh': report['mesh'], 'chips': chips,
      'remat_policy': report.get('remat_policy'),
      'memory_per_chip_gib': round(mem['total_gib'] * per_chip, 2), 'fits_hbm': mem['fits_hbm'],
      'model_flops': model, 'model_flops_per_chip': model / chips,
      'xla_cost_analysis_flops_per_device': report['xla_flops_per_device'],
      'compiled_flops_per_device': None, 'model_over_compiled': None,
      'hbm_bytes_per_device': None,
      'collective_result_bytes_per_device': (sum(per_step) if per_step and None not in per_step
                                             else None),
      'ici_send_bytes_per_device': None,
  }
  if analysis is None:
    return out
  compiled = analysis['compiled_flops']
  hbm = analysis['hbm']['hbm_bytes']
  ici = analysis['ici_send_bytes']['total']
  t_compute = compiled * per_chip / peak
  t_memory = hbm * per_chip / chip.hbm_bytes_per_s
  t_ici = ici * per_chip / chip.ici_send_bytes_per_s if ici is not None else None
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
