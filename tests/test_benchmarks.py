"""The benchmarks' measuring code at tiny sizes: each against its own independent check (HF
Mixtral in torch, the recompute path, hand-counted FLOPs), so a benchmark can never report a fast
wrong answer. Speeds themselves are measured by hand (benchmarks/), never asserted here."""
import json

import pytest

from benchmarks import generation, moe_layer, summary, tpu_projection, train_step
from conftest import REPO, load_config

BACKENDS = REPO / 'skymoe_jax' / 'model' / 'moe' / 'backends.py'


def test_moe_layer_case_agrees_with_hf_mixtral_and_times_the_baseline(monkeypatch):
  monkeypatch.setitem(moe_layer.SHAPES, 'test', (64, 16, 24, 4, 2))
  baseline = moe_layer.load_backends(BACKENDS)
  for backend, impl in (('ragged', 'blocks'), ('ragged', 'batched'), ('capacity', 'auto')):
    r = moe_layer.bench_case('test', backend, 'float32', ['eager'], 'cpu', repeats=1,
                             ragged_impl=impl, baseline=baseline)
    assert r['torch_relative_diff']['eager'] < 1e-5  # the check bench_case itself enforces
    assert r['speedup_vs_torch'] > 0 and r['speedup_vs_baseline'] > 0
    assert r['overhead_vs_dense'] > 0


def test_moe_layer_refuses_a_layer_that_disagrees_with_hf_mixtral(monkeypatch):
  monkeypatch.setitem(moe_layer.SHAPES, 'test', (64, 16, 24, 4, 2))
  broken = moe_layer.load_backends(BACKENDS)
  real = broken.get_backend('ragged', ragged_impl='blocks')
  monkeypatch.setattr(moe_layer, 'backends', broken)
  monkeypatch.setattr(broken, 'get_backend', lambda *a, **k: (
      lambda x, *rest: (real(x, *rest)[0] * 1.01, real(x, *rest)[1])))
  with pytest.raises(AssertionError, match='differs from HF Mixtral'):  # a 1% error
    moe_layer.bench_case('test', 'ragged', 'float32', ['eager'], 'cpu', repeats=1)


def test_generation_kv_cache_matches_recompute():
  r = generation.bench(load_config('tiny'), batch=2, prompt_len=6, max_new_tokens=4, repeats=1)
  assert r['tokens_match'] and r['all_rows_full_length']
  assert r['kv_tokens_per_second'] > 0 and r['recompute_tokens_per_second'] > 0


def test_hlo_flop_counter_counts_loop_bodies_per_iteration():
  rows = {name: (expected, counted, cost) for name, expected, counted, cost in
          tpu_projection.self_check()}
  for name, (expected, counted, _) in rows.items():
    assert counted == expected, name
  expected, _, cost = rows['matmul in lax.scan x5']
  assert cost < expected  # XLA's cost_analysis counts the body once: why the counter exists


def test_train_step_profile_attributes_the_time():
  r = train_step.bench(load_config('tiny'), steps=1, warmup=1, profile_steps=1,
                       peak_flops=1e12)
  assert r['model_flops_per_second'] > 0 and r['fraction_of_peak'] > 0
  shares = r['profile']['shares']
  assert abs(sum(shares.values()) - 1) < 1e-6
  # The model's parts all show up in the profile of a MoE model's step.
  for part in ('vision', 'attention', 'moe', 'optimizer'):
    assert shares[part] > 0, part


def test_summary_traces_every_row_to_a_results_file(tmp_path):
  text = summary.table(REPO / 'benchmarks' / 'results')
  rows = [line for line in text.splitlines()[2:] if line.startswith('|')]
  assert rows
  for row in rows:
    assert (REPO / 'benchmarks' / 'results' / row.rstrip(' |').split('| ')[-1]).exists()
  # And a result is read, not typed: change a file, the table follows.
  source = json.loads((REPO / 'benchmarks' / 'results' / 'tpu_projection_v5p.json').read_text())
  source['cases'][0]['projection']['projected_mfu'] = 0.123
  (tmp_path / 'tpu_projection_v5p.json').write_text(json.dumps(source))
  assert '12.3%' in summary.table(tmp_path)
