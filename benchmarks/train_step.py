"""The full training step (loss, gradients, optimizer update) on one CPU device in fp32: speed
against the machine's matmul peak, and where the time goes, from a profile.

  python benchmarks/train_step.py --out=train_step.json [--configs=demo,large] [--steps=5]
      [--warmup=1] [--profile_steps=2]

The step is the project's own: training/step.py's make_train_step with the trainer's optimizer
(optimizer.for_run), compiled once ahead of time from its jitted function and fed as the
trainer feeds it (each step puts a host batch on the device with the step's batch shardings).
Batches are random arrays of the trainer's shapes and dtypes; every text position is a real token,
so tokens/s = batch x (image tokens + text tokens) / step time is exact. The weights are fresh
random ones, not upcycled stage-I weights: the speed does not depend on their values, except
through how evenly the routers spread tokens over the experts.

Configs: `demo` is configs/demo.py:stage2 (the MoE stage of the README's main job); `large` is the
same stage with the overrides in LARGE (why that size: see there).

Per config the JSON holds the median step time after compilation and warm-up, tokens/s, model
FLOP/s (model/flops.py's model_flops, the project's one FLOP count) and `fraction_of_peak` (model
FLOP/s / an fp32 square matmul's FLOP/s, measured in the same run by parallel/hardware.py's
matmul_flops_per_second, as benchmarks/moe_layer.py measures its peak). `profile` holds the time
shares of the step's components: a few steps run under jax.profiler.trace; XLA's CPU runtime
records one event per executed HLO instruction (thunk) with its name, and the compiled module's
text gives each instruction's metadata (the Flax module path in op_name, and the Python source
line) and, for dots, the FLOPs. See component_shares.
"""
import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import subprocess
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from skymoe_jax import config as config_lib
from skymoe_jax.data import batch as batch_lib
from skymoe_jax.model import factory
from skymoe_jax.model import flops as flops_lib
from skymoe_jax.parallel import hardware
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.parallel import sharding
from skymoe_jax.profiling import hlo
from skymoe_jax.training import optimizer as optimizer_lib
from skymoe_jax.training import state as state_lib
from skymoe_jax.training import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

# The demo's layout (4 decoder layers, MoE in 0 and 2, 64 image + 64 text tokens) at 2.7x its
# width: the decoder's matmuls become [1024 tokens x 512] @ [512 x 1376] and the ViT's
# [520 x 256] @ [256 x 1024], big enough for the CPU's matmul kernels to run near their best
# (the question is whether the rest of the step keeps up), with ~110 GFLOP a step: 3x the demo,
# a few seconds here. More layers would only repeat the same scanned block at proportionally
# more time; batch 8 keeps the MoE at the demo's 256 rows per block (8 x 128 tokens x top-2 /
# 8 experts = 256 rows per expert).
LARGE = {
    'model.vision.width': 256, 'model.vision.num_heads': 4, 'model.vision.mlp_dim': 1024,
    'model.llm.embed_dim': 512, 'model.llm.num_heads': 8, 'model.llm.num_kv_heads': 4,
    'model.llm.head_dim': 64, 'model.llm.mlp_dim': 1376,
    'data.batch_size': 8,
}
CONFIGS = {'demo': ('configs/demo.py', 'stage2', {}),
           'large': ('configs/demo.py', 'stage2', LARGE),
           # One accelerator's realistic model (1.5B active; an H100 / H200, not this CPU).
           'gpu_1b': ('configs/gpu_1b.py', '', {})}

COMPONENTS = ('vision', 'attention', 'moe', 'dense_ffn', 'optimizer', 'other', 'unattributed')


def make_config(name: str):
  """One of CONFIGS, with its overrides applied and checked like a command-line config."""
  path, arg, overrides = CONFIGS[name]
  config = config_lib.load(f'{REPO / path}:{arg}' if arg else str(REPO / path), overrides)
  config_lib.validate(config)
  return config


PEAK_SIZE = 4096  # benchmarks/moe_layer.py's peak on CPU: an fp32 [4096 x 4096] @ [4096 x 4096]


def matmul_rates(sizes=(1024, 2048, PEAK_SIZE), dtype=jnp.float32) -> dict:
  """FLOP/s of a square matmul per size (hardware.matmul_flops_per_second, moe_layer's peak).

  PEAK_SIZE gives `fraction_of_peak`; the smaller sizes show how far that ceiling is from the
  best this machine's matmul kernels do (smaller operands stay in cache).
  """
  return {n: hardware.matmul_flops_per_second(dtype, n=n) for n in sizes}


def random_batch(config, seed: int = 0) -> dict:
  """Host arrays of one training batch (every field the step takes, trainer dtypes)."""
  m, d = config.model, config.data
  b, t, size = d.batch_size, d.text_len, m.vision.image_size
  rng = np.random.default_rng(seed)
  image = lambda: rng.standard_normal((b, size, size, 3), dtype=np.float32)
  fields = {
      'images': image,
      'tokens': lambda: rng.integers(0, m.llm.vocab_size, (b, t), dtype=np.int32),
      'token_mask': lambda: np.ones((b, t), bool),
      'loss_mask': lambda: np.arange(t)[None, :].repeat(b, 0) >= t // 2,  # the answer half
      'task_id': lambda: rng.integers(0, m.moe.num_tasks, (b,), dtype=np.int32),
      'granularity_id': lambda: rng.integers(0, m.moe.num_granularities, (b,), dtype=np.int32),
      'local_images': image,
      'pair_index': lambda: np.full((b,), -1, np.int32),
  }
  return {name: fields[name]() for name in batch_lib.train_fields(config)}


# --- The compiled module: what each instruction is -----------------------------------------------

_TABLE_ROW = re.compile(r'^(\d+)\s+(.*)$')
_METADATA_TABLES = ('FileNames', 'FunctionNames', 'FileLocations', 'StackFrames')


def _metadata_tables(hlo_text: str) -> dict:
  """The source-location tables compiled.as_text() appends: {table: {id: row text}}."""
  tables, table = {name: {} for name in _METADATA_TABLES}, None
  for line in hlo_text.splitlines():
    if line in tables:
      table = line
      continue
    row = _TABLE_ROW.match(line) if table else None
    if row:
      tables[table][int(row.group(1))] = row.group(2)
    else:
      table = None
  return tables


def parse_hlo(hlo_text: str) -> dict:
  """Instruction name -> its facts, from compiled.as_text().

  op_name: the jax name stack (Flax module path); source: the innermost Python frame
  ('skymoe_jax/model/mlp.py:swiglu'); opcodes: what it runs, through the computations a fusion
  calls; flops: FLOPs of the dots among them, per execution; and the data flow: operands,
  computation, root (is its computation's result), index (of a get-tuple-element), body (of a
  while).
  """
  tables = _metadata_tables(hlo_text)
  lines, _ = hlo.computations(hlo_text)
  computations = {c: [i for i in map(hlo.parse_instruction, ls) if i] for c, ls in lines.items()}

  def frame_source(frame_id):
    loc = tables['StackFrames'].get(frame_id, '')
    loc = re.search(r'file_location_id=(\d+)', loc)
    loc = tables['FileLocations'].get(int(loc.group(1)), '') if loc else ''
    file_id = re.search(r'file_name_id=(\d+)', loc)
    fn_id = re.search(r'function_name_id=(\d+)', loc)
    if not file_id:
      return ''
    path = tables['FileNames'].get(int(file_id.group(1)), '').strip('"')
    fn = tables['FunctionNames'].get(int(fn_id.group(1)), '').strip('"') if fn_id else ''
    # Keep the package part of the path: 'skymoe_jax/model/moe/backends.py',
    # 'optax/_src/transform.py'.
    short = re.sub(r'^.*?/(skymoe_jax|optax|flax|jax)/', r'\1/', path)
    return f'{short}:{fn}'

  instructions, own = {}, {}
  for comp, rows in computations.items():
    shapes = {i.name: i.shape for i in rows}
    opcodes, flops = set(), 0
    for i in rows:
      opcodes.add(i.opcode)
      dot = 0
      if i.opcode == 'dot':
        lhs = hlo.arrays(shapes.get(i.operands[0], ''))
        dot = hlo.dot_flops(hlo.arrays(i.shape)[0].dims, lhs[0].dims if lhs else (), i.attrs)
        flops += dot
      op_name = re.search(r'op_name="((?:[^"\\]|\\.)*)"', i.attrs)
      frame = re.search(r'stack_frame_id=(\d+)', i.attrs)
      index = re.search(r'\bindex=(\d+)', i.attrs)
      body = re.search(r'\bbody=%?([\w.\-]+)', i.attrs)
      instructions[i.name] = {
          'opcode': i.opcode, 'op_name': op_name.group(1) if op_name else '',
          'source': frame_source(int(frame.group(1))) if frame else '',
          'calls': [t for _, t in hlo.called(i.attrs)], 'flops': dot, 'computation': comp,
          'operands': i.operands,
          'index': int(index.group(1)) if i.opcode == 'get-tuple-element' and index else None,
          'body': body.group(1) if body else None, 'root': i.root}
    own[comp] = (opcodes, flops)

  def closure(comp, seen):
    """Opcodes and dot FLOPs of a fused computation and the fusions nested in it."""
    ops, flops = own.get(comp, (set(), 0))
    ops = set(ops)
    for i in computations.get(comp, ()):
      for c in instructions[i.name]['calls']:
        if c not in seen and i.opcode == 'fusion':
          seen.add(c)
          sub_ops, sub_flops = closure(c, seen)
          ops |= sub_ops
          flops += sub_flops
    return ops, flops

  for name, info in instructions.items():
    info['opcodes'] = {info['opcode']}
    if info['opcode'] == 'fusion':
      for c in info['calls']:
        sub_ops, sub_flops = closure(c, {c})
        info['opcodes'] |= sub_ops
        info['flops'] += sub_flops
  return instructions


def component(info: dict) -> str:
  """The model part an instruction belongs to, from its Flax module path, else its source file.

  The module path decides when it names one (vision tower, decoder attention, MoE layer, dense
  FFN); ops without one (optax's update, the step's gradient norm and non-finite guard, some
  backward-pass reductions) go by the Python file they were traced from.
  """
  if info is None:
    return 'unattributed'
  parts = set(re.split(r'[/;]', info['op_name']))
  source = info['source']
  if 'vision' in parts or source.startswith('skymoe_jax/model/vit.py'):
    return 'vision'
  if 'moe' in parts or source.startswith('skymoe_jax/model/moe/'):
    return 'moe'
  if 'attn' in parts or source.startswith(('skymoe_jax/model/attention.py',
                                            'skymoe_jax/model/rope.py')):
    return 'attention'
  if 'mlp' in parts or source.startswith('skymoe_jax/model/mlp.py'):
    return 'dense_ffn'
  # Everything the step does after the gradients: optax, its gradient norm, the finite guard
  # (the step's own lines, outside the differentiated loss).
  if source.startswith(('optax/', 'skymoe_jax/training/optimizer.py')) or (
      source.startswith('skymoe_jax/training/step.py') and 'jvp(' not in info['op_name']):
    return 'optimizer'
  if info['op_name'] or source:
    return 'other'
  return 'unattributed'


# Precedence: a fusion is named after the most expensive kind of work in it.
KINDS = (('matmul', {'dot', 'convolution'}), ('sort', {'sort'}), ('scatter', {'scatter'}),
         ('gather', {'gather'}), ('reduce', {'reduce', 'reduce-window'}),
         ('dynamic-update-slice', {'dynamic-update-slice'}), ('dynamic-slice', {'dynamic-slice'}),
         ('collective', {'all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all',
                         'collective-permute'}),
         ('control-flow', {'while', 'conditional', 'call'}),
         ('copy/transpose', {'copy', 'transpose'}), ('broadcast', {'broadcast'}))


def kind(info: dict) -> str:
  """What kind of work an instruction does (matmul, sort, scatter, ..., elementwise)."""
  if info is None:
    return 'unknown'
  for name, opcodes in KINDS:
    if info['opcodes'] & opcodes:
      return name
  return 'elementwise'


# Work that only moves data: zero-filled buffers of a scan's stacked outputs, their copies, a
# layer's slice of the stacked weights. XLA gives such ops no module path (or only the scan's).
MOVES = {'broadcast', 'copy/transpose', 'dynamic-slice', 'dynamic-update-slice'}


def attribute(instructions: dict, max_depth: int = 12) -> dict:
  """Instruction name -> (component, via) for every instruction.

  An op that `component` leaves unattributed, or calls `other` while it only moves data (kind
  in MOVES), takes the component of the nearest ops that consume its result, followed through
  tuples into and out of while loops (a scan's buffers are consumed in its body); `via` names
  one of those consumers (None: the op's own metadata decided). Where no consumer names a
  component the op keeps its own.
  """
  users = collections.defaultdict(list)
  param_gtes = collections.defaultdict(list)  # (computation, index) -> GTEs of its parameter
  loops = collections.defaultdict(list)       # body computation -> while ops that run it
  for name, info in instructions.items():
    for operand in info['operands']:
      users[operand].append(name)
    if info['opcode'] == 'while' and info['body']:
      loops[info['body']].append(name)
    if info['opcode'] == 'get-tuple-element' and info['operands']:
      source = instructions.get(info['operands'][0])
      if source and source['opcode'] == 'parameter':
        param_gtes[(info['computation'], info['index'])].append(name)

  def consumers(name):
    for u in users[name]:
      user = instructions[u]
      if user['opcode'] != 'tuple':
        yield u
        continue
      slots = [i for i, o in enumerate(user['operands']) if o == name]
      for t in users[u]:
        target = instructions[t]
        if target['opcode'] == 'while':
          for i in slots:
            yield from param_gtes[(target['body'], i)]
        elif target['opcode'] == 'get-tuple-element' and target['index'] in slots:
          yield t
      if user['root']:  # a loop body's result: the next iteration and the loop's outputs
        for loop in loops[user['computation']]:
          for i in slots:
            yield from param_gtes[(user['computation'], i)]
          yield from (g for g in users[loop] if instructions[g]['index'] in slots)

  def infer(name):
    frontier, seen = [name], {name}
    for _ in range(max_depth):
      found, nxt, first = collections.Counter(), [], {}
      for n in frontier:
        for c in consumers(n):
          if c in seen:
            continue
          seen.add(c)
          comp = component(instructions[c])
          if comp in ('other', 'unattributed'):
            nxt.append(c)
          else:
            found[comp] += 1
            first.setdefault(comp, c)
      if found:
        comp = found.most_common(1)[0][0]
        return comp, first[comp]
      frontier = nxt
      if not frontier:
        break
    return None, None

  result = {}
  for name, info in instructions.items():
    comp = component(info)
    if comp == 'unattributed' or (comp == 'other' and kind(info) in MOVES):
      inferred, via = infer(name)
      if inferred:
        result[name] = (inferred, via)
        continue
    result[name] = (comp, None)
  return result


# --- The profile -------------------------------------------------------------------------------

def load_trace(log_dir) -> dict:
  """The newest *.trace.json.gz jax.profiler.trace wrote under log_dir."""
  files = sorted(pathlib.Path(log_dir).rglob('*.trace.json.gz'), key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f'no *.trace.json.gz under {log_dir}')
  with gzip.open(files[-1]) as f:
    return json.load(f)


def op_events(trace, module: str) -> list:
  """The module's executed instructions: [{'op', 'run', 'tid', 'ts', 'dur', 'self'}] (us).

  A while loop's event encloses its body's events on the same thread; `self` is the time not
  spent in enclosed events, so summing `self` counts every microsecond once per thread.
  """
  raw = trace['traceEvents'] if isinstance(trace, dict) else trace
  events = [{'op': e['args']['hlo_op'], 'run': e['args'].get('run_id'), 'tid': e['tid'],
             'ts': float(e['ts']), 'dur': float(e['dur'])}
            for e in raw if e.get('ph') == 'X' and e.get('args', {}).get('hlo_module') == module
            and 'hlo_op' in e.get('args', {})]
  by_thread = collections.defaultdict(list)
  for e in events:
    by_thread[e['tid']].append(e)
  for thread in by_thread.values():
    thread.sort(key=lambda e: (e['ts'], -e['dur']))
    stack = []
    for e in thread:
      while stack and stack[-1]['ts'] + stack[-1]['dur'] <= e['ts']:
        stack.pop()
      e['self'] = e['dur']
      if stack:
        stack[-1]['self'] -= e['dur']
      stack.append(e)
  return events


def component_shares(trace, hlo_text: str, top: int = 10) -> dict:
  """Time per component, per kind of work and per instruction, from a profile of the module.

  trace: the parsed .trace.json.gz of jax.profiler.trace around some executions of the module
  whose compiled text is hlo_text. Times are per execution (step), in seconds of op self time
  summed over the runtime's threads; `op_seconds / wall_seconds` > 1 means independent ops ran
  side by side. Shares are fractions of op_seconds: `shares` after attribute()'s inference
  through the data flow (`inferred` is the share it moved), `direct_shares` from each op's own
  metadata only. `unattributed` is time of ops that neither names.
  """
  module = re.match(r'HloModule\s+([\w.\-]+)', hlo_text).group(1)
  instructions = parse_hlo(hlo_text)
  attribution = attribute(instructions)
  events = op_events(trace, module)
  runs = collections.defaultdict(lambda: [float('inf'), 0.0])
  for e in events:
    span = runs[e['run']]
    span[0], span[1] = min(span[0], e['ts']), max(span[1], e['ts'] + e['dur'])
  steps = max(len(runs), 1)
  per_op = collections.defaultdict(lambda: [0.0, 0])
  for e in events:
    per_op[e['op']][0] += e['self']
    per_op[e['op']][1] += 1
  total = sum(t for t, _ in per_op.values()) or 1.0
  by_component, direct = collections.Counter(), collections.Counter()
  inferred_time = 0.0
  by_kind = collections.Counter()
  by_component_kind = collections.defaultdict(collections.Counter)
  other_sources = collections.Counter()
  matmul_flops, matmul_time = 0.0, 0.0
  rows = []
  for op, (us, count) in per_op.items():
    info = instructions.get(op)
    (comp, via), knd = attribution.get(op, ('unattributed', None)), kind(info)
    by_component[comp] += us
    direct[component(info)] += us
    inferred_time += us if via else 0.0
    by_kind[knd] += us
    by_component_kind[comp][knd] += us
    if comp == 'other':
      other_sources[info['source'] or info['op_name']] += us
    flops = info['flops'] * count if info else 0
    if flops:
      matmul_flops += flops
      matmul_time += us
    rows.append({'op': op, 'component': comp, 'inferred_from': via, 'kind': knd,
                 'opcode': info['opcode'] if info else '', 'seconds': us / steps / 1e6,
                 'share': us / total, 'calls_per_step': count / steps,
                 'flops_per_second': flops / (us / 1e6) if flops and us > 0 else None,
                 'op_name': info['op_name'] if info else '',
                 'source': info['source'] if info else ''})
  rows.sort(key=lambda r: -r['seconds'])
  share = lambda counter: {k: v / total for k, v in counter.most_common()}
  return {
      'steps': len(runs),
      'wall_seconds': float(np.mean([b - a for a, b in runs.values()])) / 1e6 if runs else 0.0,
      'op_seconds': total / steps / 1e6,
      'shares': {c: by_component.get(c, 0.0) / total for c in COMPONENTS},
      'unattributed': by_component.get('unattributed', 0.0) / total,
      'inferred': inferred_time / total,
      'direct_shares': {c: direct.get(c, 0.0) / total for c in COMPONENTS},
      'kind_shares': share(by_kind),
      'component_kind_shares': {c: share(k) for c, k in by_component_kind.items()},
      'other_by_source': dict(list(share(other_sources).items())[:8]),
      # Dots the compiled module executes (frozen weights get no weight gradient; padding rows
      # are computed): the hardware's FLOPs, against which model FLOPs can be compared.
      'executed_matmul_flops': matmul_flops / steps,
      'matmul_seconds': matmul_time / steps / 1e6,
      'matmul_flops_per_second': matmul_flops / (matmul_time / 1e6) if matmul_time else 0.0,
      'top_ops': rows[:top],
  }


# --- The benchmark -----------------------------------------------------------------------------

def _git_state() -> str:
  try:
    return subprocess.run(['git', 'describe', '--always', '--dirty'], cwd=REPO, text=True,
                          capture_output=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ''


def bench(config, steps: int = 5, warmup: int = 1, profile_steps: int = 2,
          peak_flops=None, top: int = 10) -> dict:
  """Times the project's train step for `config` on one device; profiles `profile_steps` more.

  peak_flops: the machine's matmul FLOP/s (measured here, after the steps, when None).
  profile_steps=0 skips the profile.
  """
  mesh = mesh_lib.create_mesh(config, jax.devices()[:1])
  config.model.remat_policy = mesh_lib.remat_policy(config, mesh.shape)
  model = factory.create_model(config)
  tx = optimizer_lib.for_run(config)  # the trainer's; importing the trainer would need tensorflow
  state = state_lib.create_train_state(config, model, tx, mesh, jax.random.key(config.seed))
  step_fn = step_lib.make_train_step(config, model, tx, mesh)
  batch_sh = sharding.batch_shardings(mesh, config)
  host_batch = random_batch(config)

  def put(batch):  # what step_fn does before calling its jitted function
    return {k: jax.device_put(batch[k], batch_sh[k]) for k in batch_sh}

  # One compilation, kept: its text names the ops the profile reports.
  start = time.perf_counter()
  with mesh_lib.activate(mesh, config):
    compiled = step_fn.jitted.lower(state, put(host_batch)).compile()
  compile_seconds = time.perf_counter() - start

  def run(state):
    state, metrics = compiled(state, put(host_batch))
    jax.block_until_ready((state, metrics))
    return state, metrics

  for _ in range(warmup):
    state, metrics = run(state)
  times = []
  for _ in range(steps):
    t = time.perf_counter()
    state, metrics = run(state)
    times.append(time.perf_counter() - t)
  if not bool(metrics['finite']):
    raise FloatingPointError('the step produced a non-finite loss or gradient')
  step_seconds = float(np.median(times))

  m, d = config.model, config.data
  vision_tokens = config_lib.vision_tokens(m)
  seq = vision_tokens + d.text_len
  flops = flops_lib.model_flops(config, d.batch_size, seq)
  # An accelerator needs a bigger matmul to come near its peak: add 8192 there.
  sizes = (1024, 2048, PEAK_SIZE) + ((8192,) if jax.default_backend() != 'cpu' else ())
  rates = (matmul_rates(sizes, dtype=jnp.dtype(m.dtype)) if peak_flops is None
           else {PEAK_SIZE: float(peak_flops)})
  peak, best = rates[PEAK_SIZE], max(rates.values())
  result = {
      'batch_size': d.batch_size, 'image_tokens': vision_tokens, 'text_tokens': d.text_len,
      'd_model': m.llm.embed_dim, 'layers': m.llm.num_layers, 'mlp_dim': m.llm.mlp_dim,
      'moe_layers': list(m.moe.layers) if m.moe.num_experts else [],
      'experts': m.moe.num_experts, 'top_k': m.moe.top_k, 'moe_backend': m.moe.backend,
      'vit_width': m.vision.width, 'vit_depth': m.vision.depth, 'dtype': m.dtype,
      'trainable': list(config.optimizer.trainable),
      'total_params': flops['total_params'],
      'active_params_per_token': flops['active_params_per_token'],
      'compile_seconds': compile_seconds, 'step_seconds': step_seconds,
      'step_seconds_all': times, 'tokens_per_second': d.batch_size * seq / step_seconds,
      'model_flops_per_step': flops['model_flops'],
      'model_flops_per_second': flops['model_flops'] / step_seconds,
      'matmul_peak_flops_per_second': peak,
      'fraction_of_peak': flops['model_flops'] / step_seconds / peak,
      'matmul_flops_per_second_by_size': rates,
      'fraction_of_best_matmul': flops['model_flops'] / step_seconds / best,
      'remat_policy': m.remat_policy, 'attention_impl': m.attention_impl,
      'ragged_impl': m.moe.ragged_impl,
  }
  chip = hardware.chip_of_device_kind(jax.devices()[0].device_kind)
  if chip is not None:  # MFU against the data sheet's bf16 peak (an accelerator)
    result['datasheet_peak_flops_per_second'] = chip.peak_bf16_flops_per_s
    result['mfu'] = flops['model_flops'] / step_seconds / chip.peak_bf16_flops_per_s
  if profile_steps:
    # No Python tracer: the per-op events come from XLA's runtime; Python tracing would only
    # take CPU from the step on a 2-core machine.
    options = jax.profiler.ProfileOptions()
    options.python_tracer_level = 0
    with tempfile.TemporaryDirectory() as log_dir:
      with jax.profiler.trace(log_dir, create_perfetto_trace=True, profiler_options=options):
        for _ in range(profile_steps):
          state, metrics = run(state)
      trace = load_trace(log_dir)
    profile = component_shares(trace, compiled.as_text(), top)
    profile['executed_matmul_fraction_of_peak'] = (
        profile['executed_matmul_flops'] / step_seconds / peak)
    # Profiled step time / timed step time: far from 1 means the machine's load changed between
    # the two (other jobs), so read the shares with care.
    profile['slowdown'] = profile['wall_seconds'] / step_seconds
    result['profile'] = profile
  return result


def format_table(results) -> str:
  """The per-config table (speed, then component shares of op time), each config's top ops."""
  pct = lambda x: f'{100 * x:5.1f}'
  head = (f"{'config':7s} {'step ms':>8s} {'tok/s':>6s} {'GFLOP/s':>7s} {'peak':>6s} "
          f"{'%peak':>6s} {'%best':>6s} |" + ''.join(f' {c[:9]:>9s}' for c in COMPONENTS)
          + ' | op/wall prof/step')
  lines = [head, '-' * len(head)]
  for r in results:
    p = r.get('profile', {})
    shares = p.get('shares', {})
    lines.append(
        f"{r['config']:7s} {r['step_seconds'] * 1e3:8.0f} {r['tokens_per_second']:6.0f} "
        f"{r['model_flops_per_second'] / 1e9:7.2f} {r['matmul_peak_flops_per_second'] / 1e9:6.1f} "
        f"{pct(r['fraction_of_peak']):>6s} {pct(r['fraction_of_best_matmul']):>6s} |"
        + ''.join(f' {pct(shares.get(c, 0.0)):>9s}' for c in COMPONENTS)
        + (f" | {p['op_seconds'] / p['wall_seconds']:7.2f} {p['slowdown']:9.2f}"
           if p.get('wall_seconds') else ''))
  lines.append('peak: GFLOP/s of a 4096^2 matmul in the model dtype; %best: against the fastest '
               'matmul size measured; shares: % of op time (summed over threads; op/wall > 1 '
               'when ops ran side by side), after data-flow inference; prof/step: profiled / '
               'timed step time')
  for r in results:
    p = r.get('profile')
    if not p:
      continue
    lines.append(f"\n{r['config']}: direct shares (own metadata only): " + ', '.join(
        f"{c} {100 * v:.1f}%" for c, v in p['direct_shares'].items()))
    kinds = ', '.join(f'{k} {100 * v:.1f}%' for k, v in p['kind_shares'].items() if v >= 0.005)
    lines.append(f'  by kind of work: {kinds}')
    lines.append(f"  dots: {p['executed_matmul_flops'] / 1e9:.1f} GFLOP executed a step (model "
                 f"FLOPs {r['model_flops_per_step'] / 1e9:.1f}), at "
                 f"{p['matmul_flops_per_second'] / 1e9:.1f} GFLOP/s while they run")
    lines.append('  top ops (ms/step, % of op time, calls/step, GFLOP/s of dots; '
                 '* = component inferred from the data flow):')
    for o in p['top_ops']:
      rate = f"{o['flops_per_second'] / 1e9:6.1f}" if o['flops_per_second'] else '      '
      comp = o['component'] + ('*' if o['inferred_from'] else '')
      lines.append(f"  {o['seconds'] * 1e3:8.2f} {pct(o['share'])}% {o['calls_per_step']:5.0f} "
                   f"{rate}  {comp:11s} {o['kind']:14s} {o['op'][:30]:30s} "
                   f"{o['op_name'][-60:]}")
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='train_step.json')
  parser.add_argument('--configs', default='demo,large')
  parser.add_argument('--steps', type=int, default=5)
  parser.add_argument('--warmup', type=int, default=1)
  parser.add_argument('--profile_steps', type=int, default=2)
  parser.add_argument('--dtype', default='', help='model.dtype override (e.g. bfloat16 on a GPU); '
                      'the peak is then measured in that dtype')
  args = parser.parse_args()
  results = []
  for name in args.configs.split(','):
    # The peak is measured right after each config's steps: other jobs on the machine change
    # both alike only while they run at the same time.
    config = make_config(name)
    if args.dtype:
      config.model.dtype = args.dtype
    r = bench(config, args.steps, args.warmup, args.profile_steps)
    results.append({'config': name, **r})
    print(f"{name}: compile {r['compile_seconds']:.0f} s, step {r['step_seconds'] * 1e3:.0f} ms, "
          f"matmul peak {r['matmul_peak_flops_per_second'] / 1e9:.1f} GFLOP/s"
          + (f", MFU {100 * r['mfu']:.1f}% of the data sheet's bf16 peak" if 'mfu' in r else ''),
          flush=True)
  print(format_table(results))
  with open(args.out, 'w') as f:
    json.dump({'device': str(jax.devices()[0].device_kind), 'cpu_count': os.cpu_count(),
               'load_average': os.getloadavg(), 'git': _git_state(), 'jax': jax.__version__,
               'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
