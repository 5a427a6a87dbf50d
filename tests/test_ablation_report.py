"""benchmarks/ablation_report.py on hand-made run folders: seeds' mean +- std, mutual
information of expert choice and task worked out by hand, claims and verdicts, output files."""
import json
import math
import os
import re
import subprocess
import sys

import jax
import pytest

from benchmarks import ablation_report as report_lib
from configs import ablations
from conftest import REPO, load_config
from skymoe_jax.jobs import sweep

ABLATIONS = REPO / 'configs/ablations.py'

# Layer 0: vqa/local all on expert 0, vqa/mixed split evenly, counting/local all on expert 1.
ROUTING = {'num_experts': 2, 'token_drop_rate': 0.0, 'layers': {'layer_0': {
    'load': [0.5, 0.5], 'by_condition': {
        'vqa/local': {'load': [1.0, 0.0], 'routed': 60, 'entropy': 0.1},
        'vqa/mixed': {'load': [0.5, 0.5], 'routed': 40, 'entropy': 0.6},
        'counting/local': {'load': [0.0, 1.0], 'routed': 100, 'entropy': 0.1}}}}}


def _xlogy(p, q):
  return p * math.log2(p / q)


# p(task, expert) = [[80, 20], [0, 100]] / 200: p(task) = (.5, .5), p(expert) = (.4, .6).
MI_TASK = _xlogy(0.4, 0.5 * 0.4) + _xlogy(0.1, 0.5 * 0.6) + _xlogy(0.5, 0.5 * 0.6)
# p(granularity, expert) = [[60, 100], [20, 20]] / 200: p(gran) = (.8, .2), p(expert) = (.4, .6).
MI_GRAN = (_xlogy(0.3, 0.8 * 0.4) + _xlogy(0.5, 0.8 * 0.6) + _xlogy(0.1, 0.2 * 0.4) +
           _xlogy(0.1, 0.2 * 0.6))


def _metrics(counting, vqa, n=50):
  acc = lambda v: {'n': n, 'accuracy': v}
  return {'step': 10, 'tasks': {
      'counting': {'overall': acc(counting), 'by_granularity': {'local': acc(counting)}},
      'vqa': {'overall': acc(vqa), 'by_granularity': {'local': acc(vqa), 'mixed': acc(vqa)}},
      'captioning': {'overall': {'n': n, 'cider': 1.5},
                     'by_granularity': {'global': {'n': n, 'cider': 1.5}}}}}


def _run(root, overrides, metrics, routing=ROUTING, answers=None):
  name = re.sub(r'[^A-Za-z0-9.,=_-]', '_', ','.join(f'{k}={v}' for k, v in sorted(
      overrides.items())))
  workdir = root / name
  (workdir / 'eval' / '10').mkdir(parents=True)
  (workdir / 'provenance.json').write_text(json.dumps(
      {'overrides': overrides, 'written': '2026-01-01T00:00:00+00:00'}))
  (workdir / 'config.json').write_text(json.dumps(
      {'train': {'init_from': '/tmp/stage1', 'total_steps': 10}, 'eval': {'max_samples': 100}}))
  (workdir / 'eval' / '10' / 'metrics.json').write_text(json.dumps(metrics))
  if routing is not None:
    (workdir / 'eval' / '10' / 'routing.json').write_text(json.dumps(routing))
  if answers:
    (workdir / 'eval' / '10' / 'answers.jsonl').write_text(''.join(
        json.dumps({'question_id': q, 'answer': a}) + '\n' for q, a in answers.items()))
  return workdir


def test_mutual_information_by_hand():
  mi = report_lib.routing_mi(ROUTING)
  assert mi['task']['layer_0'] == pytest.approx(MI_TASK)
  assert mi['granularity']['layer_0'] == pytest.approx(MI_GRAN)
  assert report_lib.mutual_information([[5, 0], [0, 5]]) == pytest.approx(1.0)
  assert report_lib.mutual_information([[1, 3], [2, 6]]) == pytest.approx(0.0)


def test_mean_std_and_claims(tmp_path):
  root = tmp_path / 'runs'
  _run(root, {'seed': '0'}, _metrics(0.4, 0.5), answers={'q1': 'two', 'q2': 'red'})
  _run(root, {'seed': '1'}, _metrics(0.6, 0.7))
  _run(root, {'data.cda.enabled': 'False', 'seed': '0'}, _metrics(0.2, 0.5),
       answers={'q1': 'two ', 'q2': 'blue', 'q3': 'x'})
  _run(root, {'data.cda.enabled': 'False', 'seed': '1'}, _metrics(0.3, 0.5))
  # One seed of the plain router, spread evenly: no specialisation.
  flat = json.loads(json.dumps(ROUTING))
  for cell in flat['layers']['layer_0']['by_condition'].values():
    cell['load'] = [0.5, 0.5]
  _run(root, {'model.moe.adaptive': 'False', 'seed': '0'}, _metrics(0.5, 0.5), flat)
  _run(root, {'model.moe.num_experts': '0', 'optimizer.trainable': "('decoder/.*/mlp/.*',)",
              'seed': '0'},
       _metrics(0.5, 0.5), routing=None)
  _run(root, {'model.moe.num_experts': '1', 'model.moe.top_k': '1', 'model.moe.mlp_dim': '1024',
              'seed': '0'}, _metrics(0.3, 0.5))
  out = tmp_path / 'out'
  result = report_lib.report(root, out, str(ABLATIONS))

  full = result['variants'][report_lib.FULL]
  assert full['seeds'] == [0, 1]
  counting = full['scores']['counting']
  assert counting['mean'] == pytest.approx(0.5)
  assert counting['std'] == pytest.approx(math.sqrt(((0.4 - 0.5) ** 2 + (0.6 - 0.5) ** 2) / 1))
  assert full['scores']['vqa/mixed']['mean'] == pytest.approx(0.6)
  assert full['scores']['avg_acc']['mean'] == pytest.approx(0.55)  # counting and vqa only
  assert full['mi']['task']['mean']['mean'] == pytest.approx(MI_TASK)
  assert full['mi']['task']['mean']['std'] == pytest.approx(0.0)

  # One of the two shared questions answered differently (whitespace aside).
  assert result['variants'][report_lib.CDA_OFF]['changed_vs_full']['mean'] == pytest.approx(0.5)
  claims = {c['claim'][:3]: c for c in result['claims']}
  c3b = claims['3b.']
  assert c3b['effect'] == pytest.approx(0.5 - 0.25)
  spread = math.sqrt(0.02 / 2 + 0.005 / 2)  # seed variances 0.02 and 0.005
  assert c3b['spread'] == pytest.approx(spread)
  assert c3b['verdict'] == 'holds'  # 0.25 > 2 x 0.112
  assert claims['3c.']['effect'] == pytest.approx(0.1)
  # Local questions: counting/local and vqa/local, (0.5 + 0.6) / 2 against (0.25 + 0.5) / 2.
  assert claims['3a.']['effect'] == pytest.approx(0.55 - 0.375)
  # One seed of the plain router: an MI effect, but no spread to judge it by.
  c2a = claims['2a.']
  assert c2a['effect'] == pytest.approx(MI_TASK)
  assert c2a['verdict'] == 'inconclusive (no spread)'
  # Two seeds against one: the evaluation sample's binomial SE.
  c1 = claims['1. ']
  assert c1['compare'].endswith('- dense (equal active)')
  assert c1['effect'] == pytest.approx(0.55 - 0.4)
  assert c1['spread_kind'].startswith('binomial')
  c1b = claims['1b.']
  assert c1b['effect'] == pytest.approx(0.55 - 0.5) and c1b['verdict'] == 'inconclusive'
  assert result['variants'][report_lib.DENSE_STAGE1]['mi']['task']['mean']['n'] == 0
  assert claims['3d.']['verdict'] == 'not measured'  # no MoE-1 run

  text = (out / 'ablations.md').read_text()
  assert '| full (MoE-8, adaptive, CDA both) | 2 | ' in text
  assert '0.500 ± 0.141' in text
  assert 'Not run: MoE-1, MoE-2' in text and '| dense (stage-I FFNs) | 1 |' in text
  assert (out / 'routing_mi.png').stat().st_size > 0
  saved = json.loads((out / 'ablations.json').read_text())
  assert len(saved['runs']) == 7


def test_one_seed_binomial_spread():
  a = {'mean': 0.55, 'std': None, 'n': 1, 'binomial_se': math.sqrt(0.55 * 0.45 / 50)}
  b = {'mean': 0.45, 'std': None, 'n': 1, 'binomial_se': math.sqrt(0.45 * 0.55 / 50)}
  e = report_lib.effect(a, b)
  assert e['effect'] == pytest.approx(0.1)
  assert e['spread'] == pytest.approx(math.sqrt(2 * 0.2475 / 50))
  assert report_lib.verdict(e['effect'], e['spread']) == 'inconclusive'  # 0.1 < 2 x 0.0995
  assert report_lib.verdict(0.25, e['spread']) == 'holds'
  assert report_lib.verdict(-0.3, 0.1) == 'does not hold'


def test_sweep_lists_variants_seed_major():
  runs = ablations.get_sweep('seeds=3')
  n = len(ablations.VARIANTS)
  assert len(runs) == 3 * n and [r['seed'] for r in runs[::n]] == [0, 1, 2]
  assert runs[0] == {'seed': 0}
  assert ablations.variant_of({'model.moe.adaptive': 'False', 'seed': '2'}) == 'plain router'
  assert ablations.variant_of(
      {'optimizer.trainable': "('decoder/.*/mlp/.*',)", 'model.moe.num_experts': '0'}
  ) == 'dense (stage-I FFNs)'
  # The equal-active dense baseline: one expert of twice demo's FFN width.
  demo = load_config('demo')
  assert ablations.VARIANTS['dense (equal active)']['model.moe.mlp_dim'] == (
      2 * demo.model.llm.mlp_dim)
  claims = ablations.get_sweep('claims,seeds=2')
  assert len(claims) == 2 * len(ablations.CLAIM_VARIANTS)
  assert [ablations.variant_of(r) for r in claims[:len(ablations.CLAIM_VARIANTS)]] == list(
      ablations.CLAIM_VARIANTS)
  config = ablations.get_config('steps=300,eval=250')
  assert (config.train.total_steps, config.train.eval_every, config.eval.max_samples) == (
      300, 300, 250)
  with pytest.raises(ValueError, match="'steps=0'"):
    ablations.get_config('steps=0')


@pytest.mark.slow  # ~10 min: stage I and the seven claim variants, a few steps each
def test_ablation_sweep_and_report_end_to_end(tmp_path, capfd, monkeypatch):
  """docs/results.md's commands at toy length: stage I, the claims sweep, the report; every
  claim gets a measured effect from real runs."""
  # The sweep's runs get one CPU device each, as on the command line; this process's backend is
  # made first, with conftest's 8 devices, so that later tests in it keep them.
  jax.devices()
  monkeypatch.setenv('XLA_FLAGS', '')
  data = [f'--config.data.synthetic.cache_dir={tmp_path / "data"}',
          '--config.data.synthetic.num_images=60']
  stage1 = tmp_path / 'stage1'
  subprocess.run([sys.executable, '-m', 'skymoe_jax.train',
                  f'--config={ABLATIONS}:stage1', f'--workdir={stage1}', *data,
                  '--config.train.total_steps=2', '--config.train.checkpoint_every=2',
                  '--config.train.eval_every=0'], check=True, cwd=REPO,
                 env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  root = tmp_path / 'runs'
  assert sweep.main([f'--config={ABLATIONS}:claims,steps=2,eval=12,init={stage1}',
                     f'--workdir_root={root}', '--local', *data]) == 0
  result = report_lib.report(root, tmp_path / 'out', str(ABLATIONS))
  assert sorted(result['variants']) == sorted(ablations.CLAIM_VARIANTS)
  assert all(r['evaluated'] and r['total_steps'] == 2 for r in result['runs'])
  rows = {row['claim'][:3]: row for row in result['claims']}
  assert rows.keys() == {'1. ', '1b.', '2a.', '2b.', '3a.', '3b.', '3c.', '3d.'}
  assert rows['1b.']['verdict'] == 'not measured'  # the stage-I dense variant is not a claim run
  for key in rows.keys() - {'1b.'}:
    assert rows[key]['effect'] is not None, rows[key]
  assert (tmp_path / 'out' / 'ablations.md').exists()
  assert (tmp_path / 'out' / 'routing_mi.png').stat().st_size > 0


def test_results_claims_rows_come_from_the_reports():
  """docs/results.md's claims tables are copied from the generated reports, never typed in."""
  generated = set()
  for path in (REPO / 'benchmarks/results').glob('ablations*/ablations.md'):
    generated |= set(path.read_text().splitlines())
  rows = [line for line in (REPO / 'docs' / 'results.md').read_text().splitlines()
          if re.match(r'\| (1|1b|2a|2b|3a|3b|3c|3d)\. ', line)]
  assert len(rows) >= 8
  for row in rows:
    assert row in generated, row
