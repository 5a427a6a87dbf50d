"""profiling/hlo.py on hand-written HLO text: computations, instructions, bytes, loop counts."""
import pytest

from skymoe_jax.profiling import hlo

# ENTRY runs a 5-step loop (its `i < 5` compare wrapped in a fusion, as the CPU compiler does);
# the loop body holds a dot and a call to a reducer; `%unused` is never called.
TEXT = """HloModule jit_step, entry_computation_layout={(f32[4,8]{1,0})->f32[4,16]{1,0}}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %a, f32[] %b)
}

%fused_compare (p: s32[]) -> pred[] {
  %p = s32[] parameter(0)
  %limit = s32[] constant(5)
  ROOT %lt = pred[] compare(s32[] %p, s32[] %limit), direction=LT
}

%cond (state: (s32[], f32[4,8])) -> pred[] {
  %state = (s32[], f32[4,8]{1,0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[4,8]{1,0}) %state), index=0
  ROOT %go = pred[] fusion(s32[] %i), kind=kLoop, calls=%fused_compare
}

%body (state.1: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %state.1 = (s32[], f32[4,8]{1,0}) parameter(0)
  %w = f32[8,8]{1,0:S(1)} constant({...})
  %x = f32[4,8]{1,0} get-tuple-element((s32[], f32[4,8]{1,0}) %state.1), index=1
  %y = f32[4,8]{1,0} dot(f32[4,8]{1,0} %x, f32[8,8]{1,0:S(1)} %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %zero = f32[] constant(0)
  %r = f32[4]{0} reduce(f32[4,8]{1,0} %y, f32[] %zero), dimensions={1}, to_apply=%add
  %j = s32[] get-tuple-element((s32[], f32[4,8]{1,0}) %state.1), index=0
  ROOT %next = (s32[], f32[4,8]{1,0}) tuple(s32[] %j, f32[4,8]{1,0} %y)
}

%unused (u: f32[]) -> f32[] {
  ROOT %u = f32[] parameter(0)
}

ENTRY %main (arg: f32[4,8]) -> f32[4,16] {
  %arg = f32[4,8]{1,0} parameter(0)
  %start = s32[] constant(0)
  %init = (s32[], f32[4,8]{1,0}) tuple(s32[] %start, f32[4,8]{1,0} %arg)
  %loop = (s32[], f32[4,8]{1,0}) while((s32[], f32[4,8]{1,0}) %init), condition=%cond, body=%body
  %out = f32[4,8]{1,0} get-tuple-element((s32[], f32[4,8]{1,0}) %loop), index=1
  ROOT %ag = f32[4,16]{1,0} all-gather(f32[4,8]{1,0} %out), replica_groups={{0,1}}, dimensions={1}
}
"""


def test_computations_and_entry():
  comps, entry = hlo.computations(TEXT)
  assert entry == 'main'
  assert set(comps) == {'add', 'fused_compare', 'cond', 'body', 'unused', 'main'}
  assert len(comps['body']) == 8 and comps['body'][-1].strip().startswith('ROOT %next')


def test_parse_instruction_with_tuple_shape_and_attributes():
  comps, _ = hlo.computations(TEXT)
  loop = hlo.parse_instruction(comps['main'][3])
  assert (loop.name, loop.opcode, loop.operands) == ('loop', 'while', ['init'])
  assert loop.shape == '(s32[], f32[4,8]{1,0})' and not loop.root
  assert loop.attrs.strip() == ', condition=%cond, body=%body'
  assert hlo.called(loop.attrs) == [('condition', 'cond'), ('body', 'body')]
  root = hlo.parse_instruction(comps['main'][-1])
  assert root.root and root.opcode == 'all-gather' and root.operands == ['out']
  assert hlo.parse_instruction('HloModule jit_step') is None


def test_arrays_bytes_and_memory_space():
  arrs = hlo.arrays('(s32[], f32[4,8]{1,0}, bf16[2,3]{1,0:S(1)}, token[])')
  assert [(a.dtype, a.dims, a.space) for a in arrs] == [
      ('s32', (), 0), ('f32', (4, 8), 0), ('bf16', (2, 3), 1)]
  assert hlo.nbytes(arrs) == 4 + 4 * 32            # HBM only: the S(1) array is left out
  assert hlo.nbytes(arrs, hbm_only=False) == 4 + 4 * 32 + 2 * 6


def test_dot_flops_by_hand():
  comps, _ = hlo.computations(TEXT)
  dot = hlo.parse_instruction(comps['body'][3])
  assert dot.opcode == 'dot'
  # [4,8] x [8,8] contracting 8: 2 x 32 outputs x 8.
  assert hlo.dot_flops((4, 8), (4, 8), dot.attrs) == 2 * 32 * 8


def test_executions_follow_the_loop_trip_count():
  comps, entry = hlo.computations(TEXT)
  runs = hlo.executions(comps, entry)
  assert runs['main'] == 1 and runs['body'] == 5 and runs['add'] == 5
  assert runs['unused'] == 0
  assert hlo.trip_count(hlo.condition_lines(comps, 'cond')) == 5
  # A condition whose bound cannot be read leaves the loop's count unknown.
  unreadable = TEXT.replace('%limit = s32[] constant(5)', '%limit = s32[] parameter(1)')
  comps, entry = hlo.computations(unreadable)
  assert hlo.executions(comps, entry)['body'] is None


def test_self_calling_computation_is_refused():
  text = """%a (x: f32[]) -> f32[] {
  ROOT %c = f32[] call(f32[] %x), to_apply=%a
}

ENTRY %main (x: f32[]) -> f32[] {
  ROOT %r = f32[] call(f32[] %x), to_apply=%a
}
"""
  comps, entry = hlo.computations(text)
  with pytest.raises(ValueError, match='calls itself'):
    hlo.executions(comps, entry)


def test_instruction_over_several_lines_is_one_instruction():
  """A TPU kernel's custom call prints its kernel_metadata over several lines, some starting
  with '}': they belong to the instruction, and the computation goes on after it."""
  text = """%body (p: f32[8]) -> f32[8] {
  %p = f32[8]{0} parameter(0)
  %kernel = f32[8]{0} custom-call(%p), custom_call_target="tpu_custom_call", frontend_attributes={kernel_metadata={
  "name": "splash"
}}, metadata={op_name="jit(f)/splash"}
  ROOT %out = f32[8]{0} add(%kernel, %p)
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %r = f32[8]{0} call(%a), to_apply=%body
}
"""
  comps, entry = hlo.computations(text)
  assert entry == 'main' and len(comps['body']) == 3
  kernel = hlo.parse_instruction(comps['body'][1])
  assert (kernel.name, kernel.opcode) == ('kernel', 'custom-call')
  assert 'op_name="jit(f)/splash"' in kernel.attrs
  assert hlo.parse_instruction(comps['body'][2]).root
