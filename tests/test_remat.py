"""Remat policies (model/layers.py REMAT_POLICIES): every policy gives the loss and gradients of
no rematerialisation, and each keeps what it says it keeps."""
import flax.linen as nn
import jax
from jax import ad_checkpoint
import numpy as np
import pytest

from conftest import load_config
from test_sharding import _batch as sharding_batch
from skymoe_jax.model import factory, layers
from skymoe_jax.training import loss as loss_lib

BATCH = 4


def _batch(config):
  return sharding_batch(config, batch=BATCH)


def _config(policy, scan_layers=True):
  config = load_config('tiny')
  config.model.update(remat_policy=policy, scan_layers=scan_layers)
  config.model.moe.ep_strategy = 'none'
  return config


def _loss_fn(config):
  model = factory.create_model(config)
  return lambda p, b: loss_lib.model_loss(p, model, b, config)[0]


@pytest.fixture(scope='module')
def reference():
  config = _config('none')
  model = factory.create_model(config)
  params = nn.unbox(model.init(jax.random.key(0), *factory.example_inputs(config)))['params']
  batch = _batch(config)
  loss, grads = jax.jit(jax.value_and_grad(_loss_fn(config)))(params, batch)
  return params, batch, loss, grads


# Host offload needs a device with a separate host memory space; CPU's only memory is the host.
ON_DEVICE = [p for p in layers.REMAT_POLICIES if p not in ('none', 'auto') and 'offload' not in p]
FAST = ('full', 'save_proj', 'save_proj_experts')  # the rest (~20 s each) in the slow suite


@pytest.mark.parametrize('policy', [p if p in FAST else pytest.param(p, marks=pytest.mark.slow)
                                    for p in ON_DEVICE])
def test_policy_gives_the_loss_and_grads_of_no_remat(reference, policy):
  params, batch, ref_loss, ref_grads = reference
  loss, grads = jax.jit(jax.value_and_grad(_loss_fn(_config(policy))))(params, batch)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-6)
  for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(grads)[0],
                          jax.tree.leaves(ref_grads)):
    # Recomputing in another order moves float32 sums by a few ulps of the leaf's largest entry
    # (seen: 1.6e-7 on a leaf whose largest is 4e-3); 1e-7 covers leaves that are zero but for
    # rounding (the key bias). A wrong rematerialisation moves a gradient by its own size.
    atol = max(1e-7, 1e-4 * float(np.abs(r).max()))
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=atol, err_msg=jax.tree_util.keystr(path))


def _residuals(policy, capsys, reference):
  """jax's printed list of what the backward pass keeps, for the unscanned model."""
  config = _config(policy, scan_layers=False)
  params = jax.eval_shape(lambda: nn.unbox(factory.create_model(config).init(
      jax.random.key(0), *factory.example_inputs(config)))['params'])
  loss = _loss_fn(config)
  batch = reference[1]
  capsys.readouterr()
  ad_checkpoint.print_saved_residuals(loss, params, batch)
  return capsys.readouterr().out


def test_policies_keep_what_they_name(reference, capsys):
  """The MLP's gate and up outputs are named values (no number changes: see above); the MoE's
  expert matmuls are kept by primitive. `full` keeps neither, `save_proj` the names only,
  `save_proj_experts` both."""
  full = _residuals('full', capsys, reference)
  proj = _residuals('save_proj', capsys, reference)
  experts = _residuals('save_proj_experts', capsys, reference)
  for name in layers.MLP_SAVED:
    assert f"named '{name}'" not in full
    assert f"named '{name}'" in proj and f"named '{name}'" in experts
  assert 'custom_vjp_call' not in full and 'custom_vjp_call' not in proj
  assert 'custom_vjp_call' in experts  # the CPU block loop of the ragged backend
  assert len(experts.splitlines()) > len(proj.splitlines()) > len(full.splitlines())


def test_unknown_policy_names_the_field():
  with pytest.raises(ValueError, match='config.model.remat_policy'):
    factory.create_model(_config('save_everything'))
