"""Mesh resolution (parallel/mesh.py): -1 axes, the batch-driven fsdp / tensor split of
configs/skymoe_7b.py, errors naming the field before anything compiles, and the remat policy
chosen by the mesh."""
import pytest

from conftest import load_config
from skymoe_jax.config import ConfigError
from skymoe_jax.parallel import mesh as mesh_lib

AXES = mesh_lib.MESH_AXES


def _shape(mesh, devices, batch=None):
  return dict(zip(AXES, mesh_lib.mesh_shape(mesh, devices, batch)))


@pytest.mark.parametrize('devices, expected', [
    (16, (1, 8, 2, 1)),    # v5p:2x2x4
    (32, (1, 8, 2, 2)),    # v5p:2x4x4
    (64, (1, 8, 2, 4)),    # v5p:4x4x4
    (128, (1, 8, 2, 8)),   # v5p:4x4x8
    (36, (1, 18, 2, 1)),   # 144 = 2^4 x 3^2: 36 batch shards
    (2, (1, 1, 2, 1)),
    (96, (1, 24, 2, 2)),   # 48 batch shards divide 144, 96 would not
])
def test_7b_defaults_fill_the_devices_and_divide_the_batch(devices, expected):
  config = load_config('skymoe_7b')
  shape = _shape(config.mesh, devices, config.data.batch_size)
  assert tuple(shape.values()) == expected
  # All devices used; the batch of 144 splits evenly over data x fsdp x expert.
  assert shape['data'] * shape['fsdp'] * shape['expert'] * shape['tensor'] == devices
  assert 144 % (shape['data'] * shape['fsdp'] * shape['expert']) == 0


def test_one_minus_one_takes_the_rest():
  assert _shape(dict(data=-1, fsdp=1, expert=2, tensor=1), 8) == dict(
      data=4, fsdp=1, expert=2, tensor=1)
  assert _shape(dict(data=1, fsdp=2, expert=1, tensor=-1), 8) == dict(
      data=1, fsdp=2, expert=1, tensor=4)
  # Fewer devices than exist is allowed when every size is given.
  assert _shape(dict(data=2, fsdp=1, expert=1, tensor=1), 8) == dict(
      data=2, fsdp=1, expert=1, tensor=1)


@pytest.mark.parametrize('mesh, devices, batch, field', [
    (dict(data=-1, fsdp=-1, expert=1, tensor=1), 8, 8, r'config\.mesh\.fsdp=-1'),
    (dict(data=1, fsdp=1, expert=-1, tensor=0), 8, 8, r'config\.mesh\.tensor=0'),
    (dict(data=3, fsdp=-1, expert=1, tensor=1), 8, 8, r'config\.mesh\.data=-1|3 devices'),
    (dict(data=4, fsdp=1, expert=4, tensor=1), 8, None, 'needs 16 devices'),
    (dict(data=1, fsdp=-1, expert=2, tensor=-1), 16, 7, r'config\.mesh\.data=1, '
     r'config\.mesh\.expert=2: the batch of 7'),
    (dict(data=-1, fsdp=1, expert=1, tensor=1), 16, 12, r'config\.mesh\.data=16.*batch of 12'),
])
def test_meshes_that_cannot_work_name_the_field(mesh, devices, batch, field):
  with pytest.raises(ConfigError, match=field):
    mesh_lib.mesh_shape(mesh, devices, batch)


def test_create_mesh_checks_before_anything_is_built():
  config = load_config('tiny')
  config.mesh.update(data=1, fsdp=-1, expert=2, tensor=-1)
  mesh = mesh_lib.create_mesh(config)  # 8 CPU devices, batch 8
  assert dict(mesh.shape) == dict(data=1, fsdp=4, expert=2, tensor=1)
  # A batch of 6 splits 2 ways at most: the other 4 devices go to tensor.
  assert dict(mesh_lib.create_mesh(config, batch_size=6).shape) == dict(
      data=1, fsdp=1, expert=2, tensor=4)
  with pytest.raises(ConfigError, match=r'config\.mesh\.expert=2: the batch of 5'):
    mesh_lib.create_mesh(config, batch_size=5)


@pytest.mark.parametrize('devices, policy', [
    (64, 'save_proj_experts'),  # 144 x 2048 / (16 x 4) = 4608 tokens per device
    (16, 'save_attention'),     # 18432
    (2, 'full'),                # past the table
])
def test_7b_remat_policy_follows_the_mesh(devices, policy):
  config = load_config('skymoe_7b')
  shape = _shape(config.mesh, devices, config.data.batch_size)
  assert mesh_lib.remat_policy(config, shape, 144, 2048) == policy


def test_remat_auto_names_its_field():
  config = load_config('skymoe_7b')
  config.model.remat_auto = ((4608, 'keep_it_all'),)
  shape = _shape(config.mesh, 64, 144)
  with pytest.raises(ConfigError, match='config.model.remat_auto'):
    mesh_lib.remat_policy(config, shape, 144, 2048)
  # Unresolved (counting parameters, evaluation: no gradient) 'auto' runs as 'full'.
  from skymoe_jax.model import layers  # pylint: disable=g-import-not-at-top
  assert layers.REMAT_POLICIES['auto'] is layers.REMAT_POLICIES['full']


def test_remat_auto_must_be_a_table():
  from skymoe_jax import config as config_lib  # pylint: disable=g-import-not-at-top
  config = load_config('skymoe_7b')
  config.model.remat_auto = ((0, 'full'),)
  with pytest.raises(ConfigError, match=r'config\.model\.remat_auto=.*max tokens per device'):
    config_lib.validate(config)
