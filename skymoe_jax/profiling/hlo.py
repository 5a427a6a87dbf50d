"""Reading XLA's optimized HLO text (`compiled.as_text()`): computations, instructions, array
shapes, and how often each computation runs per call of the module.

Plain text, no jax: one reader for profiling/roofline.py (FLOPs, HBM and collective bytes of a
compiled step: the AOT report's collectives, benchmarks/tpu_projection.py's roofline) and
benchmarks/train_step.py (which model part each profiled op belongs to).
"""
import collections
import math
import re

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
