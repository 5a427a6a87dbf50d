"""profiling/aot.py: the sharded train step compiled ahead of time for a TPU topology.

The compile tests need libtpu (`pip install "jax[tpu]"`) and are skipped without it; the FLOP
formula and the HLO collective parser are checked everywhere.
"""
import pytest

from conftest import load_config
from skymoe_jax.model import flops
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.profiling import aot, hlo, roofline

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
  assert report['moe']['ragged_impl'] == 'megablox'  # what 'auto' picks on TPU
  assert report['collectives_per_device']['ragged-all-to-all']['count'] >= 2  # there and back
  assert report['memory_per_device']['fits_hbm']


def test_batch_must_divide_batch_axes(devices):
  """Before anything is built or compiled, naming the mesh fields and the flag."""
  with pytest.raises(ValueError, match=r'config\.mesh\.fsdp=2, config\.mesh\.expert=2: the '
                     r'batch of 6 \(--batch_size=6\) does not divide over the 4 batch shards'):
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


# skymoe_7b's structure (ViT, 8 experts top-2 every other layer, its own mesh and remat rule,
# the kernels 'auto' picks on TPU) at a size that compiles in seconds.
SMALL_7B = {
    'model.llm.num_layers': 2, 'model.llm.embed_dim': 256, 'model.llm.num_heads': 2,
    'model.llm.num_kv_heads': 2, 'model.llm.mlp_dim': 512, 'model.llm.vocab_size': 512,
    'model.llm.max_seq_len': 256, 'model.moe.layers': (0,),
    'model.vision.image_size': 112, 'model.vision.depth': 2, 'model.vision.width': 128,
    'model.vision.num_heads': 1, 'model.vision.mlp_dim': 256, 'data.text_len': 192,
}
SMALL_TOPOLOGY = 'v5p:2x2x4'  # 16 chips, as v5p-32


@pytest.fixture(scope='module')
def small_7b():
  pytest.importorskip('libtpu', reason='libtpu not installed: pip install "jax[tpu]==0.10.2"')
  try:
    devices = aot.topology_devices(SMALL_TOPOLOGY)
  except RuntimeError as e:
    pytest.skip(f'no TPU topology from libtpu here: {e}')
  config = load_config('skymoe_7b')
  config.update_from_flattened_dict(SMALL_7B)
  return aot.aot_compile(config, SMALL_TOPOLOGY, 16, 256, devices=devices, with_hlo=True)


def _kernels(module):
  """[(kernel name, phase)] of the compiled program's TPU custom calls that run."""
  out = []
  for comp, instrs in module.comps.items():
    for i in instrs:
      if i.opcode == 'custom-call' and 'tpu_custom_call' in i.attrs and module.runs.get(comp):
        op_name = module.op_name(comp, i)
        phase = 'backward' if 'transpose(' in op_name else 'forward'
        out.append((i.name.split('.')[0], phase))
  return out


def test_7b_structure_compiles_with_the_kernels_auto_picks_on_tpu(small_7b):
  """The default mesh fills the 16 chips, the attention kernel (splash) and the grouped-matmul
  kernels (megablox gmm forward and for the input gradient, tgmm for the weight gradient) are
  in the compiled step, and no dense weight gradient over all experts is."""
  report, hlo_text = small_7b
  assert report['mesh'] == {'data': 1, 'fsdp': 8, 'expert': 2, 'tensor': 1}
  assert report['attention_impl'] == 'splash' and report['moe']['ragged_impl'] == 'megablox'
  assert report['remat_policy'] == mesh_lib.remat_policy(
      load_config('skymoe_7b'), report['mesh'], 16, 256)
  module = roofline.Module(hlo_text)
  kernels = set(_kernels(module))
  assert {('splash_mha_fwd_segmented_residuals', 'forward'),
          ('splash_mha_dq_segmented_no_residuals', 'backward'),
          ('splash_mha_dkv_segmented_no_residuals', 'backward')} <= kernels
  assert {('gmm', 'forward'), ('gmm', 'backward'), ('tgmm', 'backward')} <= kernels
  flops = roofline.hlo_flops(module)
  assert flops['grouped_matmul'] > 0 and flops['attention_kernel'] > 0
  assert flops['dense_masked_weight_grad'] == 0 and not flops['unknown_kernels']
  # No dot or convolution makes an [experts, d, f] weight gradient (of the 8 or the 4 local).
  expert_dims = {(256, 512), (512, 256), (32, 512), (512, 32), (256, 64), (64, 256)}
  for comp, instrs in module.comps.items():
    for i in instrs:
      if i.opcode in ('dot', 'convolution'):
        for a in hlo.arrays(i.shape):
          assert not (len(a.dims) == 3 and a.dims[0] in (4, 8) and a.dims[1:] in expert_dims), (
              f'{i.name} {i.shape}: a dense expert weight gradient')


@pytest.mark.slow
@pytest.mark.parametrize('policy', ['offload_proj', 'save_proj_offload_experts'])
def test_host_offload_policies_compile_for_tpu(devices, policy):
  """The offloading remat policies need a device with host memory beside it (CPU has none):
  on TPU their saved values go to the host (the compiled step moves data there and back)."""
  config = _tiny()
  config.model.remat_policy = policy
  report, hlo_text = aot.aot_compile(config, TOPOLOGY, BATCH, SEQ, devices=devices,
                                     with_hlo=True)
  assert report['remat_policy'] == policy and report['memory_per_device']['fits_hbm']
  assert 'S(5)' in hlo_text  # memory space 5: pinned host


def test_attention_kernel_flops_by_hand():
  """Splash's kernels: q, k, v [heads, T, head_dim] after the block-mask operands; forward 2,
  dq 3, dkv 4 matmuls of 2 T S head_dim FLOPs per head."""
  shapes = ('s8[1,4,4]{2,1,0}, s8[1,4,4]{2,1,0}, bf16[8,2048,128]{2,1,0}, bf16[8,2048,128]{2,1,0}, '
            'bf16[8,2048,128]{2,1,0}, s32[2048,128]{1,0}')
  for name, matmuls in (('splash_mha_fwd_segmented_residuals.3', 2),
                        ('splash_mha_dq_segmented_no_residuals', 3),
                        ('splash_mha_dkv_segmented_no_residuals.1', 4)):
    line = (f'  %{name} = bf16[8,2048,128]{{2,1,0}} custom-call(%q, %k, %v), '
            f'custom_call_target="tpu_custom_call", operand_layout_constraints={{{shapes}}}')
    instr = hlo.parse_instruction(line)
    assert roofline.attention_kernel(instr, []) == matmuls * 2 * 8 * 2048 * 2048 * 128
  other = hlo.parse_instruction('  %gmm.1 = bf16[64,64]{1,0} custom-call(%a), '
                                'custom_call_target="tpu_custom_call"')
  assert roofline.attention_kernel(other, []) is None


def test_gpu_1b_parameter_count_by_hand():
  """configs/gpu_1b.py: ViT-L/14 at 336 px (23 of 24 layers used) and a 2048-wide 16-layer
  decoder with 8 experts top-2 in every other layer: 3.19B parameters, 1.53B active."""
  config = load_config('gpu_1b')
  got = flops.count_params(config)
  w = 1024
  vit_layer = 4 * (w * w + w) + (w * 4096 + 4096 + 4096 * w + w) + 4 * w  # attn, mlp, norms
  vision = 14 * 14 * 3 * w + (1 + 24 * 24) * w + w + 2 * w + 23 * vit_layer
  d, f, e = 2048, 5632, 8
  moe = config.model.moe
  attn = 4 * d * d + 2 * d  # q, k, v, out (16 heads of 128) + the two norms
  ffn = 3 * d * f
  router = d * e + (moe.num_tasks + moe.num_granularities) * moe.condition_dim + \
      moe.condition_dim * e
  llm = 2 * 32000 * d + d + 16 * attn + 8 * ffn + 8 * (router + e * ffn)
  projector = 1024 * d + d + d * d + d
  assert got['vision_params'] == vision and got['projector_params'] == projector
  assert got['total_params'] == vision + projector + llm == 3188335616
  assert got['active_params_per_token'] == got['total_params'] - 8 * (e - 2) * ffn == 1527391232
  assert got['vision_tokens'] == 576 and config.model.dtype == 'bfloat16'
