"""Configs check themselves; the summary counts parameters as a hand calculation does."""
import json
import subprocess
import sys

import pytest

from conftest import REPO, load_config
from skymoe_jax import config as config_lib
from skymoe_jax.model import factory
from skymoe_jax.model.flops import count_params


def test_skymoe_7b_summary_matches_hand_count():
  s = count_params(load_config('skymoe_7b'))
  # CLIP ViT-L/14 at 504 px, blocks up to the penultimate (23 of 24) built.
  w, mlp = 1024, 4096
  vit_block = 2 * 2 * w + 4 * (w * w + w) + (w * mlp + mlp) + (mlp * w + w)
  vision = 14 * 14 * 3 * w + w + (1 + 36 * 36) * w + 2 * w + 23 * vit_block
  projector = (w * 4096 + 4096) + (4096 * 4096 + 4096)
  # Vicuna-7B: d=4096, 32 layers, FFN 11008, vocab 32000, untied head; 16 MoE layers of 8 experts.
  d, f, v = 4096, 11008, 32000
  attention = 4 * d * d + 2 * d
  ffn = 3 * d * f
  router = d * 8 + (5 + 3) * 64 + 64 * 8  # W, task and granularity embeddings, U
  llm = 2 * v * d + d + 32 * attention + 16 * ffn + 16 * (8 * ffn + router)
  assert s['vision_params'] == vision == 291_646_464
  assert s['projector_params'] == projector
  assert s['llm_params'] == llm
  assert s['total_params'] == vision + projector + llm
  assert s['active_params_per_token'] == vision + projector + llm - 16 * 6 * ffn
  assert 22.0e9 < s['total_params'] < 22.5e9  # docs/design.md: about 22B in all
  assert 9.2e9 < s['active_params_per_token'] < 9.4e9  # docs/design.md: 9.2-9.4B active
  assert s['vision_tokens'] == 1296
  assert s['moe_layers'] == list(range(0, 32, 2))
  assert (s['llm_layers'], s['num_experts'], s['top_k']) == (32, 8, 2)


def test_summary_command_line_with_override():
  out = subprocess.run(
      [sys.executable, '-m', 'skymoe_jax.summary', f'--config={REPO}/configs/tiny.py',
       '--config.model.moe.num_experts=2', '--config.model.moe.top_k=1'],
      capture_output=True, text=True, check=True, cwd=REPO)
  s = json.loads(out.stdout.strip().splitlines()[-1])
  assert (s['num_experts'], s['top_k'], s['moe_layers']) == (2, 1, [0, 2])
  assert s['active_params_per_token'] == s['total_params'] - s['expert_params'] // 2


@pytest.mark.parametrize('field, value, message', [
    ('model.llm.num_kv_heads', 3, 'config.model.llm.num_kv_heads=3'),
    ('model.moe.top_k', 5, 'config.model.moe.top_k=5'),
    ('model.moe.layers', (0, 9), 'config.model.moe.layers=(0, 9)'),
    ('model.moe.backend', 'magic', "config.model.moe.backend='magic'"),
    ('model.vision.image_size', 30, 'config.model.vision.image_size=30'),
    ('model.llm.max_seq_len', 16, 'config.model.llm.max_seq_len=16'),
    ('model.lora.targets', ('query', 'gate'), 'config.model.lora.targets'),
    ('model.remat_policy', 'sometimes', "config.model.remat_policy='sometimes'"),
    ('model.dtype', 'float7', "config.model.dtype='float7'"),
    ('model.vision.feature_layer', -5, 'feature_layer=-5'),
])
def test_bad_field_is_named(field, value, message):
  config = load_config('tiny')
  parent = config
  *path, leaf = field.split('.')
  for name in path:
    parent = parent[name]
  parent[leaf] = value
  with pytest.raises(config_lib.ConfigError, match=message.replace('(', r'\(').replace(
      ')', r'\)')):
    factory.validate(config)


@pytest.mark.parametrize('name', ['tiny', 'demo', 'skymoe_7b'])
def test_shipped_configs_are_valid(name):
  factory.validate(load_config(name))


def test_parse_arg_types_items_like_their_defaults():
  a = config_lib.parse_arg('claims,seeds=4,init=/abs/s1', claims=False, seeds=1, init='',
                           stage2=False)
  assert (a.claims, a.seeds, a.init, a.stage2) == (True, 4, '/abs/s1', False)
  with pytest.raises(config_lib.ConfigError, match="'seed=4'.*expected one of"):
    config_lib.parse_arg('seed=4', seeds=1)
  with pytest.raises(config_lib.ConfigError, match="'seeds=x': seeds must be int"):
    config_lib.parse_arg('seeds=x', seeds=1)
  with pytest.raises(config_lib.ConfigError, match='must be true or false'):
    config_lib.parse_arg('claims=maybe', claims=False)


def test_load_reads_overrides_as_the_command_line_does():
  config = load_config('tiny')
  loaded = config_lib.load(f'{REPO}/configs/tiny.py', {
      'model.moe.num_experts': '2', 'model.moe.layers': (0,), 'data.template': 'geochat'})
  assert (loaded.model.moe.num_experts, tuple(loaded.model.moe.layers)) == (2, (0,))
  assert loaded.data.template == 'geochat' and config.data.template == 'llava_v1'
  config.model.moe.update(num_experts=2, layers=(0,))
  config.data.template = 'geochat'
  assert loaded.to_json() == config.to_json()


@pytest.mark.parametrize('field', ['learning_rate', 'weight_decay'])
def test_optimizer_value_not_finite_in_the_param_dtype_is_refused(field):
  config = load_config('tiny')
  config.optimizer[field] = 1e39  # finite as a Python float, inf in float32
  with pytest.raises(config_lib.ConfigError, match=f'config.optimizer.{field}=1e\\+39: is not finite'):
    config_lib.validate(config)
