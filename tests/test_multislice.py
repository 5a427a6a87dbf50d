"""Several slices (parallel/mesh.py's dcn_* axes): only data parallelism crosses the slow network
between slices by default, one slice is the mesh it always was, bad layouts fail naming their
field, and the compiled step of a small model with skymoe_7b's structure for two slices of
v5p:2x2x4 sends nothing between slices but data-parallel gradient reductions (read from the
compiled HLO; a mesh with fsdp across slices is caught by the same check).

The compile tests need libtpu (`pip install "jax[tpu]"`) and are skipped without it.
"""
import dataclasses

from jax.experimental import mesh_utils
import numpy as np
import pytest

from conftest import load_config
from skymoe_jax.config import ConfigError
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.profiling import aot, hlo

@dataclasses.dataclass(frozen=True)
class FakeDevice:
  """What the mesh reads of a device (a plain object, as jax's devices are: no sequence)."""
  id: int
  slice_index: int
  process_index: int
  platform: str = 'cpu'
  device_kind: str = 'fake'


def _fake_devices(slices: int, per_slice: int, hosts_per_slice: int = 2):
  """Devices as a multislice job lists them: ids slice-major, each host's devices together."""
  per_host = per_slice // hosts_per_slice
  return [FakeDevice(s * 1000 + i, s, s * hosts_per_slice + i // per_host)
          for s in range(slices) for i in range(per_slice)]


def _ids(devices):
  return np.vectorize(lambda d: d.id, otypes=[int])(devices)


def test_two_slices_put_only_data_across_slices():
  devices = _fake_devices(2, 8)
  config = load_config('tiny')
  config.mesh.update(data=1, fsdp=-1, expert=2, tensor=1)   # in one slice: 1 x 4 x 2 x 1
  dcn = mesh_lib.dcn_shape(config.mesh, 2)
  assert dict(zip(mesh_lib.MESH_AXES, dcn)) == dict(data=2, fsdp=1, expert=1, tensor=1)
  slices = mesh_lib.group_by_slice(devices)
  ici = mesh_lib.mesh_shape(config.mesh, len(slices[0]))
  got = mesh_lib.hybrid_devices(slices, ici, dcn)
  assert got.shape == (2, 4, 2, 1)
  # Slice s holds data row s; fsdp, expert and tensor each stay inside one slice.
  slice_ids = np.vectorize(lambda d: d.slice_index)(got)
  assert (slice_ids == np.arange(2).reshape(2, 1, 1, 1)).all()
  # jax's hybrid mesh lays the slices the same way (for devices without an ICI torus it keeps
  # each slice's order, which is the order used here).
  reference = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
  assert (_ids(got) == _ids(reference)).all()
  # Each host's devices hold one contiguous block of the batch (data, fsdp, expert leading).
  hosts = np.vectorize(lambda d: d.process_index)(got).reshape(-1)
  assert list(hosts) == sorted(hosts)


@pytest.mark.parametrize('batch, in_slice', [(144, (1, 4, 2, 2)), (288, (1, 8, 2, 1))])
def test_7b_on_two_slices_of_16_chips(batch, in_slice):
  """skymoe_7b keeps the base slice layout: the slices split the batch, each slice's axes are
  resolved for its share (at 288 each slice is exactly the mesh of one v5p:2x2x4 slice)."""
  config = load_config('skymoe_7b')
  assert mesh_lib.dcn_shape(config.mesh, 2, batch) == (2, 1, 1, 1)
  assert mesh_lib.mesh_shape(config.mesh, 16, batch // 2) == in_slice


def test_fsdp_across_slices_when_asked():
  devices = _fake_devices(4, 4)
  config = load_config('tiny')
  config.mesh.update(data=1, fsdp=-1, expert=1, tensor=1, dcn_data=2, dcn_fsdp=-1)
  dcn = mesh_lib.dcn_shape(config.mesh, 4)
  assert dcn == (2, 2, 1, 1)
  got = mesh_lib.hybrid_devices(mesh_lib.group_by_slice(devices), (1, 4, 1, 1), dcn)
  slice_ids = np.vectorize(lambda d: d.slice_index)(got)[:, :, 0, 0]
  # fsdp index = slice position along fsdp x 4 + in-slice index, as jax lays it.
  assert (slice_ids == np.array([[0] * 4 + [1] * 4, [2] * 4 + [3] * 4])).all()


def test_one_slice_is_the_mesh_it_always_was():
  """The 8 CPU devices: same shape, same device order as a plain reshape (the code before
  slices existed), whatever the dcn fields say about the one slice."""
  config = load_config('tiny')
  config.mesh.update(data=2, fsdp=2, expert=2, tensor=1)
  mesh = mesh_lib.create_mesh(config)
  before = np.array(mesh_lib.process_major_devices()[:8]).reshape(2, 2, 2, 1)
  assert dict(mesh.shape) == dict(data=2, fsdp=2, expert=2, tensor=1)
  assert (_ids(mesh.devices) == _ids(before)).all()
  assert mesh_lib.slice_axes(mesh) == dict(data=1, fsdp=1, expert=1, tensor=1)
  config.mesh.update(dcn_data=1, dcn_fsdp=-1)
  assert (_ids(mesh_lib.create_mesh(config).devices) == _ids(before)).all()


@pytest.mark.parametrize('fields, slices, batch, match', [
    (dict(dcn_data=3), 2, None, r'config\.mesh\.dcn_data=3, config\.mesh\.dcn_fsdp=1: their '
     r'product must be the 2 slice'),
    (dict(dcn_data=-1, dcn_fsdp=-1), 2, None, r'config\.mesh\.dcn_fsdp=-1: -1 goes on one'),
    (dict(dcn_fsdp=3), 4, None, r'config\.mesh\.dcn_data=-1: the other dcn axes'),
    (dict(dcn_data=0), 2, None, r'config\.mesh\.dcn_data=0: sizes must be positive'),
    (dict(dcn_expert=2), 2, None, r'config\.mesh\.dcn_expert: only dcn_data, dcn_fsdp exist'),
    (dict(num_slices=4), 2, None, r'config\.mesh\.num_slices=4: the devices are in 2 slice'),
    (dict(), 4, 6, r'config\.mesh\.dcn_data=4, config\.mesh\.dcn_fsdp=1: the batch of 6 '
     r'\(config\.data\.batch_size\) does not divide over the 4 slice-wise batch shards'),
])
def test_bad_slice_layouts_name_the_field(fields, slices, batch, match):
  config = load_config('tiny')
  config.mesh.update(**{k: v for k, v in fields.items() if k != 'dcn_expert'})
  if 'dcn_expert' in fields:
    config.mesh.dcn_expert = fields['dcn_expert']
  with pytest.raises(ConfigError, match=match):
    mesh_lib.dcn_shape(config.mesh, slices, batch)


def test_in_slice_errors_say_the_batch_is_split_over_slices():
  config = load_config('tiny')
  config.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
  # 2 slices of 8: the batch of 8 gives each slice 4 rows, 8 in-slice data shards cannot work.
  with pytest.raises(ConfigError, match=r'config\.mesh\.data=8, .*: the batch of 4 '
                     r'\(config\.data\.batch_size=8 / 2 slices\)'):
    mesh_lib.create_mesh(config, devices=_fake_devices(2, 8), batch_size=8)


def test_replica_groups_in_every_form_and_by_slice():
  """Listed, iota (with a transpose), all devices, and a permute's pairs; then the groups
  mapped to slices and mesh axes for a program over all devices (2 slices x 4 on data x fsdp)."""
  assert hlo.replica_groups('replica_groups={{0,1},{2,3}}, to_apply=%add', 4) == [(0, 1), (2, 3)]
  assert hlo.replica_groups('replica_groups=[2,4]<=[8], dimensions={0}', 8) == [
      (0, 1, 2, 3), (4, 5, 6, 7)]
  # iota(8).reshape(2,2,2).transpose(2,1,0).reshape(4,2)
  assert hlo.replica_groups('replica_groups=[4,2]<=[2,2,2]T(2,1,0), dimensions={0}', 8) == [
      (0, 4), (2, 6), (1, 5), (3, 7)]
  assert hlo.replica_groups('replica_groups={}, to_apply=%add', 3) == [(0, 1, 2)]
  assert hlo.replica_groups('source_target_pairs={{0,1},{1,0}}', 2) == [(0, 1), (1, 0)]
  assert hlo.replica_groups('dimensions={0}', 2) is None

  text = '\n'.join([
      'HloModule m, num_partitions=8',
      'ENTRY %main (p: f32[8]) -> f32[8] {',
      '  %p = f32[8]{0} parameter(0)',
      # over fsdp (inside each slice): groups {0,1,2,3}, {4,5,6,7}
      '  %ag = f32[32]{0} all-gather(%p), channel_id=1, replica_groups=[2,4]<=[8], '
      'dimensions={0}',
      # over data (across slices): {0,4}, {1,5}, ...
      '  %ar = f32[8]{0} all-reduce(%p), channel_id=2, replica_groups=[4,2]<=[2,4]T(1,0), '
      'to_apply=%add, metadata={op_name="jit(step)/transpose(jvp(dot))"}',
      '  %cp = f32[8]{0} collective-permute(%p), channel_id=3, '
      'source_target_pairs={{0,4},{4,0}}',
      '  ROOT %rs = f32[2]{0} reduce-scatter(%ar), channel_id=4, replica_groups={{0,1,2,3},'
      '{4,5,6,7}}, dimensions={0}, to_apply=%add',
      '}'])
  slices = [0] * 4 + [1] * 4
  coords = [dict(data=k // 4, fsdp=k % 4) for k in range(8)]
  cross = hlo.cross_slice_collectives(text, slices, coords)
  assert [(c['kind'], c['axes'], c['group_size']) for c in cross] == [
      ('all-reduce', ['data'], 2), ('collective-permute', ['data'], 2)]
  assert cross[0]['op_name'] == 'jit(step)/transpose(jvp(dot))' and cross[0]['bytes'] == 32
  assert [c['kind'] for c in hlo.not_gradient_reductions(cross)] == ['collective-permute']


# --- The compiled step for two slices of v5p:2x2x4 -----------------------------------------------

SMALL_7B = {   # as tests/test_aot.py: skymoe_7b's structure at a size that compiles in seconds
    'model.llm.num_layers': 2, 'model.llm.embed_dim': 256, 'model.llm.num_heads': 2,
    'model.llm.num_kv_heads': 2, 'model.llm.mlp_dim': 512, 'model.llm.vocab_size': 512,
    'model.llm.max_seq_len': 256, 'model.moe.layers': (0,),
    'model.vision.image_size': 112, 'model.vision.depth': 2, 'model.vision.width': 128,
    'model.vision.num_heads': 1, 'model.vision.mlp_dim': 256, 'data.text_len': 192,
}
TOPOLOGY, SLICES, BATCH, SEQ = 'v5p:2x2x4', 2, 32, 256


@pytest.fixture(scope='module')
def two_slices():
  pytest.importorskip('libtpu', reason='libtpu not installed: pip install "jax[tpu]==0.10.2"')
  try:
    return aot.topology_devices(TOPOLOGY, SLICES)
  except RuntimeError as e:
    pytest.skip(f'no TPU topology from libtpu here: {e}')


def _small_7b(**mesh):
  config = load_config('skymoe_7b')
  config.update_from_flattened_dict(SMALL_7B)
  config.mesh.update(mesh)
  return config


def test_topology_devices_of_two_slices(two_slices):
  assert len(two_slices) == 32
  assert sorted({d.slice_index for d in two_slices}) == [0, 1]
  mesh = mesh_lib.create_mesh(_small_7b(), devices=two_slices, batch_size=BATCH)
  assert dict(mesh.shape) == dict(data=2, fsdp=8, expert=2, tensor=1)
  assert mesh_lib.slice_axes(mesh) == dict(data=2, fsdp=1, expert=1, tensor=1)
  # Each slice is laid out exactly as one slice alone is (the mesh of tests/test_aot.py).
  alone = mesh_lib.create_mesh(_small_7b(), devices=aot.topology_devices(TOPOLOGY),
                               batch_size=BATCH // 2)
  assert (_ids(mesh.devices[1]) % 100000 == _ids(alone.devices[0]) % 100000).all()


def test_only_gradient_reductions_cross_slices(two_slices):
  report = aot.aot_compile(_small_7b(), TOPOLOGY, BATCH, SEQ, devices=two_slices,
                           num_slices=SLICES)
  assert report['num_slices'] == 2 and report['slice_axes'] == ['data']
  assert report['num_chips'] == 32 and report['memory_per_device']['hbm_gib'] == 95.0
  assert report['memory_per_device']['fits_hbm']
  cross = report['cross_slice_collectives']
  assert cross, 'the gradients must be summed over the slices'
  assert report['cross_slice_not_gradient_reductions'] == []
  assert set(report['cross_slice_summary']) == {'all-reduce/sum over data'}


def test_fsdp_across_slices_is_caught(two_slices):
  """The planted wrong mesh: the same check fails, and says why (the fsdp weight gathers and
  gradient reduce-scatters then run between slices)."""
  report = aot.aot_compile(_small_7b(dcn_data=1, dcn_fsdp=2), TOPOLOGY, BATCH, SEQ,
                           devices=two_slices, num_slices=SLICES)
  assert report['slice_axes'] == ['fsdp']
  bad = report['cross_slice_not_gradient_reductions']
  assert bad
  kinds = {c['kind'] for c in bad}
  assert {'all-gather', 'reduce-scatter'} <= kinds, kinds
  assert all('fsdp' in c['axes'] for c in bad), bad


def test_vocab_over_tensor_keeps_the_embedding_inside_a_slice(two_slices):
  config = _small_7b()
  config.model.vision.num_heads = 2   # a batch of 16 leaves tensor=2 in each slice
  report = aot.aot_compile(config, TOPOLOGY, 16, SEQ, devices=two_slices, num_slices=SLICES)
  assert report['mesh'] == dict(data=2, fsdp=4, expert=2, tensor=2)
  assert report['cross_slice_not_gradient_reductions'] == []
