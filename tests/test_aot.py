"""profiling/aot.py: the sharded train step compiled ahead of time for a TPU topology.

The compile tests need libtpu (`pip install "jax[tpu]"`) and are skipped without it; the FLOP
formula and the HLO collective parser are checked everywhere.
"""
import pytest

from conftest import load_config
from skymoe_jax.model import flops
from skymoe_jax.profiling import aot, roofline

TOPOLOGY = 'v5p:2x2x1'  # 4 chips
BATCH, SEQ = 8, 32      # tiny: 16 image tokens + 16 text tokens


def _tiny():
  config = load_config('tiny')
  config.mesh.update(dict(data=1, fsdp=2, expert=2, tensor=1))  # 4 experts: 2 per device
  return config


@pytest.fixture(scope='module')
def devices():
  pytest.importorskip('libtpu', reason='libtpu not installed: pip install "jax[tpu]==0.10.2"')
  try:
    return aot.topology_devices(TOPOLOGY)
  except RuntimeError as e:
    pytest.skip(f'no TPU topology from libtpu here: {e}')


@pytest.fixture(scope='module')
def report(devices):
  return aot.aot_compile(_tiny(), TOPOLOGY, BATCH, SEQ, devices=devices, name='tiny')


def test_tiny_compiles_for_v5p(report):
  assert report['num_chips'] == report['num_devices'] == 4
  assert report['mesh'] == {'data': 1, 'fsdp': 2, 'expert': 2, 'tensor': 1}
  assert report['text_len'] == SEQ - 16
  mem = report['memory_per_device']
  for field in ('argument_bytes', 'output_bytes', 'temp_bytes', 'total_bytes'):
    assert mem[field] > 0, field
  assert mem['total_bytes'] == (mem['argument_bytes'] + mem['output_bytes'] + mem['temp_bytes']
                                - mem['alias_bytes'])
  assert mem['alias_bytes'] > 0  # the donated state is reused for the new one
  assert mem['hbm_bytes'] == 95 * 1024 ** 3 and mem['fits_hbm']
  assert report['xla_flops_per_device'] > 0
  assert report['scan'] == {'decoder_scanned_blocks': 2, 'decoder_layers_per_block': 2,
                            'vision_scanned_layers': 2}
  coll = report['collectives_per_device']
  # FSDP gathers weights and scatters gradients; expert parallelism (ring) gathers tokens.
  assert coll['all-gather']['bytes'] > 0 or coll['reduce-scatter']['bytes'] > 0
  # The per-step figure counts the scanned loop bodies once per iteration.
  assert coll['all-gather']['bytes_per_step'] >= coll['all-gather']['bytes']


def test_ragged_all_to_all_expert_parallelism_compiles_for_tpu(devices):
  """The dropless ragged_all_to_all exchange does not run on CPU; on TPU it lowers to the op."""
  config = _tiny()
  config.model.moe.ep_strategy = 'ragged_all_to_all'
  report = aot.aot_compile(config, TOPOLOGY, BATCH, SEQ, devices=devices, name='tiny')
  assert report['moe']['ragged_impl'] == 'ragged_dot'
  assert report['collectives_per_device']['ragged-all-to-all']['count'] >= 2  # there and back
  assert report['memory_per_device']['fits_hbm']


def test_batch_must_divide_batch_axes(devices):
  with pytest.raises(ValueError, match=r'--batch_size=6 does not divide .*4 ways'):
    aot.aot_compile(_tiny(), TOPOLOGY, 6, SEQ, devices=devices)


def test_model_flops_by_hand():
  """tiny: D=64, 4 layers (MoE in 0, 2: 4 experts top-2), 4 heads / 2 KV heads of 16, FFN 128,
  vocab 256, LoRA r=4 on q, v; ViT 32 px / 8 px patches, width 32, 2 of 3 layers used."""
  d, f, v = 64, 128, 256
  attn = (d * 4 * 16 + 2 * d * 2 * 16 + 4 * 16 * d  # q, k, v, out
          + (d * 4 + 4 * 4 * 16) + (d * 4 + 4 * 2 * 16)  # LoRA a, b on q and v
          + 2 * d)  # two RMSNorm scales
  ffn = 3 * d * f
  moe = d * 4 + 8 * 4 + 5 * 8 + 3 * 8 + 2 * ffn  # router, condition, task/gran. embeddings, top-2
  n_llm = 4 * attn + 2 * moe + 2 * ffn + d + d * v  # + final norm, lm_head (no input table)
  n_proj = 32 * 64 + 64 + 64 * 64 + 64
  n_patch = 8 * 8 * 3 * 32
  vit_layer = 3 * (32 * 32 + 32) + (32 * 32 + 32) + (32 * 64 + 64) + (64 * 32 + 32) + 4 * 32
  n_vit = 2 * vit_layer + 2 * 32  # + pre-norm
  nv = 16
  weights = 6 * BATCH * (SEQ * n_llm + nv * (n_proj + n_patch) + (nv + 1) * n_vit)
  attention = 12 * BATCH * (4 * SEQ ** 2 * 4 * 16 + 2 * (nv + 1) ** 2 * 32)
  got = flops.model_flops(load_config('tiny'), BATCH, SEQ)
  assert got['llm_active_params_no_embed'] == n_llm == 217856
  assert got['weight_flops'] == weights
  assert got['attention_flops'] == attention
  assert got['model_flops'] == weights + attention == 385099776


HLO = """HloModule m, entry_computation_layout={(f32[8]{0})->f32[8]{0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %s = f32[] add(%x, %y)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ag = bf16[32]{0:T(128)(2,1)} all-gather(%x), dimensions={0}, metadata={op_name="jit(f)/while"}
  %one = s32[] constant(1)
  %j = s32[] add(%i, %one)
  ROOT %t = (s32[], f32[8]{0}) tuple(%j, %x)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[]{:T(128)} constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  %ar = (f32[4]{0}, f32[2,2]{1,0}) all-reduce(%a, %a), to_apply=%add
  %rs = f32[2]{0} reduce-scatter(%a), dimensions={0}, to_apply=%add
  %cps = (f32[8]{0}, f32[8]{0}, u32[], u32[]) collective-permute-start(%a), source_target_pairs={{0,1}}
  %cp = f32[8]{0} collective-permute-done(%cps)
  %zero = s32[] constant(0)
  %t = (s32[], f32[8]{0}) tuple(%zero, %cp)
  %w = (s32[], f32[8]{0}) while(%t), condition=%cond, body=%body
  ROOT %r = f32[8]{0} get-tuple-element(%w), index=1
}
"""


def test_collective_bytes_from_hlo_text():
  """The AOT report's collectives_per_device (roofline.collective_bytes)."""
  got = roofline.collective_bytes(HLO)
  assert got['all-gather'] == {'count': 1, 'bytes': 64, 'bytes_per_step': 5 * 64}
  assert got['all-reduce'] == {'count': 1, 'bytes': 32, 'bytes_per_step': 32}
  assert got['reduce-scatter'] == {'count': 1, 'bytes': 8, 'bytes_per_step': 8}
  assert got['collective-permute'] == {'count': 1, 'bytes': 32, 'bytes_per_step': 32}
  assert got['all-to-all'] == {'count': 0, 'bytes': 0, 'bytes_per_step': 0}
