"""benchmarks/ablation_report.py on hand-made run folders: seeds' mean +- std, mutual
information of expert choice and task worked out by hand, claims and verdicts, output files."""
import json
import math
import re
import statistics

import jax
import pytest
from scipy import stats

from benchmarks import ablation_report as report_lib
from configs import ablations
from conftest import REPO, load_config
from skymoe_jax import config as config_lib
from skymoe_jax import workdir as workdir_lib
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


def _metrics(counting, vqa, n=50, baseline=None):
  acc = lambda v: {'n': n, 'accuracy': v}
  count = {'overall': acc(counting), 'by_granularity': {'local': acc(counting)}}
  if baseline is not None:
    count['baseline'] = baseline
  return {'step': 10, 'tasks': {
      'counting': count,
      'vqa': {'overall': acc(vqa), 'by_granularity': {'local': acc(vqa), 'mixed': acc(vqa)}},
      'captioning': {'overall': {'n': n, 'cider': 1.5},
                     'by_granularity': {'global': {'n': n, 'cider': 1.5}}}}}


def _run(root, overrides, metrics, routing=ROUTING, answers=None, init_from='/tmp/stage1',
         config_arg='', name=None):
  name = name or re.sub(r'[^A-Za-z0-9.,=_-]', '_', ','.join(f'{k}={v}' for k, v in sorted(
      overrides.items())))
  workdir = root / name
  (workdir / 'eval' / '10').mkdir(parents=True)
  (workdir / 'provenance.json').write_text(json.dumps(
      {'overrides': overrides, 'written': '2026-01-01T00:00:00+00:00', 'swept': list(overrides),
       'config': f'{ABLATIONS}:{config_arg}' if config_arg else str(ABLATIONS)}))
  stage = 'stage1' if config_arg == 'stage1' else 'stage2'
  (workdir / 'config.json').write_text(json.dumps(
      {'train': {'init_from': '' if stage == 'stage1' else init_from, 'total_steps': 10,
                 'stage': stage}, 'eval': {'max_samples': 0, 'max_per_task': 100}}))
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
  # Both variants ran seeds 0 and 1: paired by seed, differences 0.2 and 0.3 (sd 0.0707, SE
  # 0.05, t = 0.25 / 0.05 with 1 degree of freedom); scipy's own paired test agrees.
  assert c3b['test'] == 'paired'
  assert c3b['spread'] == pytest.approx(math.sqrt(0.005) / math.sqrt(2))
  assert c3b['t'] == pytest.approx(0.25 / (math.sqrt(0.005) / math.sqrt(2)))
  assert c3b['df'] == 1
  assert c3b['p'] == pytest.approx(stats.ttest_rel([0.4, 0.6], [0.2, 0.3]).pvalue)
  # Without the pairing, Welch's test of the same numbers.
  welch = report_lib.welch(report_lib.mean_std([0.4, 0.6]), report_lib.mean_std([0.2, 0.3]))
  assert welch['df'] == pytest.approx(0.0125 ** 2 / (0.01 ** 2 + 0.0025 ** 2))
  assert welch['p'] == pytest.approx(
      stats.ttest_ind([0.4, 0.6], [0.2, 0.3], equal_var=False).pvalue)
  # Inconclusive with 2 seeds at its Holm level; the paired formula by hand: a difference of
  # 0.25 with an sd of 0.0707 is found with power 0.8 by 2 seeds already (the floor).
  z = statistics.NormalDist()
  need = ((z.inv_cdf(1 - c3b['alpha_holm'] / 2) + z.inv_cdf(0.8)) * math.sqrt(0.005) / 0.25) ** 2
  assert c3b['verdict'] == 'inconclusive' and c3b['seeds_needed'] == max(2, math.ceil(need))
  assert claims['3c.']['effect'] == pytest.approx(0.1)
  # Local questions: counting/local and vqa/local, (0.5 + 0.6) / 2 against (0.25 + 0.5) / 2.
  assert claims['3a.']['effect'] == pytest.approx(0.55 - 0.375)
  # One seed of the plain router: an MI effect, but no spread to judge it by.
  c2a = claims['2a.']
  assert c2a['effect'] == pytest.approx(MI_TASK)
  assert c2a['verdict'].startswith('inconclusive (no test') and c2a['p'] is None
  # Two seeds against one: the evaluation sample's binomial SE, shown, but no test.
  c1 = claims['1. ']
  assert c1['compare'].endswith('- dense (equal active)')
  assert c1['effect'] == pytest.approx(0.55 - 0.4)
  assert c1['spread_kind'].startswith('binomial') and c1['p'] is None
  c1b = claims['1b.']
  assert c1b['effect'] == pytest.approx(0.55 - 0.5) and c1b['verdict'].startswith('inconclusive')
  # Three claims have two seeds on both sides (3a, 3b, 3c): Holm's family.
  assert {c['claim'][:3] for c in result['claims'] if c['p'] is not None} == {'3a.', '3b.', '3c.'}
  assert all(c['holm_m'] == 3 for c in result['claims'])
  assert result['variants'][report_lib.DENSE_STAGE1]['mi']['task']['mean']['n'] == 0
  assert claims['3d.']['verdict'] == 'not measured'  # no MoE-1 run

  text = (out / 'ablations.md').read_text()
  assert '| full (MoE-8, adaptive, CDA both) | 2 | ' in text
  assert '0.500 ± 0.141' in text
  assert ('Not run: adaptive router, bias x8, predicted condition, predicted condition, bias x8, '
          'CDA re-rendered') in text
  assert '| dense (stage-I FFNs) | 1 |' in text
  assert '| CDA off | 2 | ' in text and '(Holm-Bonferroni)' in text
  assert 'n = 2 (z_(1-alpha_j/2) + z_power)^2 s^2 / d^2' in text
  assert (out / 'routing_mi.png').stat().st_size > 0
  assert (out / 'metrics_by_variant.png').stat().st_size > 0
  saved = json.loads((out / 'ablations.json').read_text())
  assert len(saved['runs']) == 7
  assert saved['meta']['stage1_layout'] == 'shared' and saved['claims'][0]['p_holm'] is None


def test_one_seed_binomial_spread():
  a = {'mean': 0.55, 'std': None, 'n': 1, 'binomial_se': math.sqrt(0.55 * 0.45 / 50)}
  b = {'mean': 0.45, 'std': None, 'n': 1, 'binomial_se': math.sqrt(0.45 * 0.55 / 50)}
  e = report_lib.effect(a, b)
  assert e['effect'] == pytest.approx(0.1)
  assert e['spread'] == pytest.approx(math.sqrt(2 * 0.2475 / 50))
  assert e['p'] is None  # one seed: no test of training noise
  assert report_lib.verdict(e['effect'], e, {'p_holm': None}).startswith('inconclusive (no test')


def _ms(mean, std, n):
  return {'mean': mean, 'std': std, 'n': n}


def test_welch_p_against_closed_forms():
  """Student's t CDF has closed forms for 1 and 2 degrees of freedom: two-sided
  p = 1 - (2 / pi) atan|t| (df 1) and p = 1 - |t| / sqrt(2 + t^2) (df 2)."""
  # Two seeds each, equal stds: Welch's df = 2; t = 1 / sqrt(1/2 + 1/2) = 1.
  w = report_lib.welch(_ms(1.0, 1.0, 2), _ms(0.0, 1.0, 2))
  assert (w['t'], w['df']) == (pytest.approx(1.0), pytest.approx(2.0))
  assert w['p'] == pytest.approx(1 - 1 / math.sqrt(3))  # 0.42265
  # No spread on one side: df = 1 (n - 1 of the other); t = 0.5 / sqrt(1/2).
  w = report_lib.welch(_ms(0.5, 1.0, 2), _ms(0.0, 0.0, 2))
  assert w['df'] == pytest.approx(1.0)
  assert w['p'] == pytest.approx(1 - 2 / math.pi * math.atan(0.5 / math.sqrt(0.5)))  # 0.6082
  assert w['p'] == pytest.approx(0.60817, abs=1e-5)
  # A general case against scipy's Welch test on the raw values.
  xs, ys = [0.41, 0.45, 0.44, 0.47], [0.38, 0.40, 0.36]
  ms = lambda v: report_lib.mean_std(v)
  assert report_lib.welch(ms(xs), ms(ys))['p'] == pytest.approx(
      stats.ttest_ind(xs, ys, equal_var=False).pvalue)
  assert report_lib.welch(_ms(1.0, 0.0, 2), _ms(0.0, 0.0, 2))['p'] is None  # no spread at all
  assert report_lib.welch(_ms(1.0, None, 1), _ms(0.0, 0.1, 3))['p'] is None


def test_holm_by_hand():
  # m = 4 tested; sorted 0.005, 0.01, 0.03, 0.04 -> 4 x 0.005 = 0.02, 3 x 0.01 = 0.03,
  # 2 x 0.03 = 0.06, 1 x 0.04 = 0.04 raised to the running maximum 0.06.
  got = report_lib.holm([0.01, 0.04, None, 0.03, 0.005])
  assert [g['p_holm'] for g in got] == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
  assert [g['alpha'] for g in got] == pytest.approx([0.05 / 3, 0.05, None, 0.05 / 2, 0.05 / 4])
  assert [g['rank'] for g in got] == [2, 4, None, 3, 1] and {g['m'] for g in got} == {4}
  assert report_lib.holm([0.9, 0.8])[0]['p_holm'] == 1.0  # capped: 2 x 0.8 -> max(1.6, 0.9)
  # Verdicts: significant after correction, in either direction; else inconclusive.
  tested = {'p': 0.01}
  assert report_lib.verdict(0.1, tested, {'p_holm': 0.03}) == 'holds'
  assert report_lib.verdict(-0.1, tested, {'p_holm': 0.03}) == 'does not hold'
  assert report_lib.verdict(0.1, tested, {'p_holm': 0.06}) == 'inconclusive'
  assert report_lib.verdict(None, tested, {'p_holm': 0.03}) == 'not measured'


def test_seeds_needed_formula():
  # d = one seed std, alpha 0.05, power 0.8: 2 (1.95996 + 0.84162)^2 = 15.70 -> 16 per variant,
  # the textbook figure for a standardised effect of 1.
  z = 1.959964 + 0.841621
  assert 2 * z ** 2 == pytest.approx(15.6978, abs=1e-3)
  assert report_lib.seeds_needed(0.1, _ms(0, 0.1, 4), _ms(0, 0.1, 4), 0.05) == 16
  # Pooled variance weighs by n - 1: (3 x 0.04 + 1 x 0.01) / 4 = 0.0325; alpha 0.05 / 3.
  pooled = (3 * 0.2 ** 2 + 1 * 0.1 ** 2) / 4
  z3 = stats.norm.ppf(1 - 0.05 / 6) + stats.norm.ppf(0.8)
  assert report_lib.seeds_needed(-0.05, _ms(0, 0.2, 4), _ms(0, 0.1, 2), 0.05 / 3) == math.ceil(
      2 * z3 ** 2 * pooled / 0.05 ** 2)
  assert report_lib.seeds_needed(0.0, _ms(0, 0.1, 4), _ms(0, 0.1, 4), 0.05) is None


def test_stage1_layouts():
  run = lambda seed, init, stage='stage2', name='x': dict(seed=seed, init_from=init,
                                                          stage=stage, run=name)
  layout = lambda runs: report_lib.stage1_layout(runs)['layout']
  own = [run(0, '', 'stage1', 's1_0'), run(1, '', 'stage1', 's1_1')]
  assert layout(own + [run(0, 's1_0'), run(1, 's1_1')]) == 'per seed'
  assert layout([run(0, '/a'), run(1, '/a')]) == 'shared'
  assert layout([run(0, '/a0'), run(1, '/a1'), run(1, '/a1')]) == 'per seed'
  mixed = report_lib.stage1_layout(own + [run(0, 's1_0'), run(0, '/a'), run(1, 's1_1')])
  assert mixed['layout'] == 'mixed' and mixed['note'].startswith('Mixed stage-I layout')
  assert layout(own + [run(0, 's1_1'), run(1, 's1_0')]) == 'per seed'  # distinct, one per seed
  assert layout(own + [run(0, 's1_1'), run(1, 's1_1')]) == 'shared'


def test_predicted_condition_rerender_claims_and_stage1_per_seed(tmp_path):
  """A stage I per seed under the root (listed, not compared); the predicted-condition and
  re-rendered CDA claims; a claim clear enough to hold after Holm's correction; the plot."""
  root = tmp_path / 'runs'
  flat = json.loads(json.dumps(ROUTING))
  for cell in flat['layers']['layer_0']['by_condition'].values():
    cell['load'] = [0.5, 0.5]
  half = json.loads(json.dumps(ROUTING))  # layer_0 only half as specialised: mix with flat
  for name, cell in half['layers']['layer_0']['by_condition'].items():
    cell['load'] = [(a + 0.5) / 2 for a in ROUTING['layers']['layer_0']['by_condition'][name][
        'load']]
  noise = (0.0, 0.01, -0.01)
  for s, e in enumerate(noise):
    init = ablations.STAGE1_RUN.format(seed=s)
    _run(root, {'seed': str(s)}, _metrics(0.30, 0.60), config_arg='stage1', routing=None,
         name=init)  # named as the sweep names it
    kw = dict(init_from=init)
    _run(root, {'seed': str(s)}, _metrics(0.40 + e, 0.60 + e, baseline=0.25), **kw)
    _run(root, {'model.moe.condition': 'predicted', 'seed': str(s)},
         _metrics(0.40 - e, 0.60 + e), routing=half, **kw)
    _run(root, {'model.moe.adaptive': 'False', 'seed': str(s)}, _metrics(0.40, 0.60 - e),
         routing=flat, **kw)
    _run(root, {'data.cda.enabled': 'False', 'seed': str(s)}, _metrics(0.30 + e, 0.60), **kw)
    _run(root, {'data.cda.counterfactual': 'rerender', 'seed': str(s)},
         _metrics(0.50 + e, 0.60 - e), **kw)
  result = report_lib.report(root, tmp_path / 'out', str(ABLATIONS))
  assert len(result['stage1_runs']) == 3 and all(
      r['variant'] == report_lib.STAGE1 for r in result['stage1_runs'])
  assert report_lib.STAGE1 not in result['variants']
  assert result['meta']['stage1_layout'] == 'per seed'
  claims = {c['claim'].split('.')[0]: c for c in result['claims']}
  # I(expert; task): the predicted condition's layer-0 routing against the flat plain router.
  mi_half = report_lib.routing_mi(half)
  assert claims["2a'"]['effect'] == pytest.approx(mi_half['task']['layer_0'])
  assert claims["2b'"]['effect'] == pytest.approx(mi_half['granularity']['layer_0'])
  assert claims["2a'"]['compare'] == 'predicted condition - plain router'
  # Mean accuracy equal on average: no difference detected, with its confidence interval.
  c2c = claims["2c'"]
  assert c2c['effect'] == pytest.approx(0.0, abs=1e-12)
  assert c2c['verdict'].startswith('inconclusive; 95% CI [')
  lo, hi = c2c['ci95']
  assert lo < 0 < hi
  # Re-rendered: counting +0.2 over CDA off, +0.1 over pixel edits, every seed.
  assert claims['3f']['effect'] == pytest.approx(0.2)
  assert claims['3e']['effect'] == pytest.approx((0.5 + 0.6) / 2 - (0.3 + 0.6) / 2)
  assert claims['3g']['compare'] == 'CDA re-rendered - full (MoE-8, adaptive, CDA both)'
  assert claims['3g']['effect'] == pytest.approx((0.5 + 0.6) / 2 - (0.4 + 0.6) / 2)
  tested = [c for c in result['claims'] if c['p'] is not None]
  m = len(tested)
  assert all(c['holm_m'] == m for c in result['claims'])
  # 3f: seeds (0.5, 0.51, 0.49) against (0.3, 0.31, 0.29): p tiny, significant after Holm.
  assert claims['3f']['p_holm'] <= 0.05 and claims['3f']['verdict'] == 'holds'
  assert claims['3f']['p_holm'] >= claims['3f']['p']
  # CDA (pixel) on counting, here +0.1 in every seed: holds too.
  assert claims['3b']['verdict'] == 'holds'
  assert result['meta']['baselines'] == {'counting': 0.25}
  text = (tmp_path / 'out' / 'ablations.md').read_text()
  assert '| constant-answer baseline | - | ' in text
  assert 'a stage I per seed, trained in this root (`config_arg=stage1,seed=0`, ' in text
  assert f'over the {m} tested claims' in text
  assert (tmp_path / 'out' / 'metrics_by_variant.png').stat().st_size > 0


def test_sweep_lists_a_stage1_per_seed_then_its_variants(tmp_path):
  runs = ablations.get_sweep('seeds=3')
  n = len(ablations.VARIANTS) + 1  # a seed's stage I, then its variants
  assert len(runs) == 3 * n
  assert runs[::n] == [ablations.stage1_run(s) for s in range(3)]
  assert [r['seed'] for r in runs] == [s for s in range(3) for _ in range(n)]
  assert runs[1] == {'seed': 0}
  assert ablations.variant_of({'model.moe.adaptive': 'False', 'seed': '2'}) == 'plain router'
  assert ablations.variant_of(
      {'optimizer.trainable': "('decoder/.*/mlp/.*',)", 'model.moe.num_experts': '0'}
  ) == 'dense (stage-I FFNs)'
  assert ablations.variant_of({'model.moe.condition': 'predicted'}) == 'predicted condition'
  assert ablations.variant_of({'data.cda.cutout_weight': '0.0', 'data.cda.move_weight': '0.0'}
                              ) == 'CDA recolour only'
  # The equal-active dense baseline: one expert of twice demo's FFN width.
  demo = load_config('demo')
  assert ablations.VARIANTS['dense (equal active)']['model.moe.mlp_dim'] == (
      2 * demo.model.llm.mlp_dim)
  for arg, names in ablations.SELECTIONS.items():
    listed = ablations.get_sweep(f'{arg},seeds=2')
    k = len(names) + 1
    assert len(listed) == 2 * k
    assert (listed[0], listed[k]) == (ablations.stage1_run(0), ablations.stage1_run(1))
    assert [ablations.variant_of(r) for r in listed[1:k]] == list(names)
    assert set(names) <= set(ablations.VARIANTS)
  with pytest.raises(config_lib.ConfigError, match='one of claims or experts, not both'):
    ablations.get_sweep('claims,experts')

  # As jobs/sweep.py expands it: every stage-II run starts from its seed's stage-I workdir, a
  # sibling under the same root, listed before it.
  expanded = sweep.link_dependencies(sweep.expand(
      f'{ABLATIONS}:claims,seeds=2', str(tmp_path), ablations.get_sweep('claims,seeds=2'), {}))
  k = len(ablations.CLAIM_VARIANTS) + 1
  for s in range(2):
    stage1, variants = expanded[s * k], expanded[s * k + 1:(s + 1) * k]
    assert stage1.name == ablations.STAGE1_RUN.format(seed=s) and stage1.after is None
    assert stage1.job.config == f'{ABLATIONS}:stage1' and stage1.job.overrides == {'seed': s}
    assert config_lib.load(stage1.job.config, stage1.job.overrides).train.stage == 'stage1'
    for run in variants:
      assert run.after == stage1.name and run.job.config == f'{ABLATIONS}:claims,seeds=2'
      config = config_lib.load(run.job.config, run.job.overrides)
      assert config.train.init_from == stage1.name and config.seed == s
      assert str(workdir_lib.init_workdir(config, run.job.workdir)) == stage1.job.workdir
  # Listed the wrong way round: refused, naming both runs.
  with pytest.raises(SystemExit, match='lists the run seed=0 before config_arg=stage1,seed=0'):
    sweep.link_dependencies(sweep.expand(str(ABLATIONS), str(tmp_path),
                                         [{'seed': 0}, ablations.stage1_run(0)], {}))

  # The old layout: one shared stage I, given; the sweep lists stage II only.
  shared = ablations.get_sweep('claims,seeds=2,init=/tmp/stage1')
  assert len(shared) == 2 * len(ablations.CLAIM_VARIANTS) and shared[0] == {'seed': 0}
  config = ablations.get_config('init=/tmp/stage1')
  assert config.train.init_from == '/tmp/stage1'

  config = ablations.get_config('steps=300,eval=250')
  assert (config.train.total_steps, config.train.eval_every) == (300, 300)
  assert (config.eval.max_per_task, config.eval.max_samples) == (250, 0)
  assert config.train.init_from == ablations.STAGE1_RUN.format(seed=config.seed)
  for arg, match in (('steps=0', "'steps=0'"), ('seeds=0', "'seeds=0'"),
                     ('claims,cda', 'claims or cda'), ('stage1,stage2', 'stage1 or stage2'),
                     ('init=runs/stage1', 'absolute path'), ('eval=x', 'eval must be int'),
                     ('sweep', 'expected one of')):
    with pytest.raises(ValueError, match=match):
      ablations.get_sweep(arg)


@pytest.mark.slow  # ~15 min: a stage I and the nine claim variants, a few steps each
def test_ablation_sweep_and_report_end_to_end(tmp_path, capfd, monkeypatch):
  """docs/results.md's commands at toy length: the claims sweep (its own stage I first), the
  report; every claim of the claims sweep gets a measured effect from real runs."""
  # The sweep's runs get one CPU device each, as on the command line; this process's backend is
  # made first, with conftest's 8 devices, so that later tests in it keep them.
  jax.devices()
  monkeypatch.setenv('XLA_FLAGS', '')
  given = [f'--config.data.synthetic.cache_dir={tmp_path / "data"}',
           '--config.data.synthetic.num_images=60',
           '--config.train.total_steps=2', '--config.train.checkpoint_every=2']  # both stages
  root = tmp_path / 'runs'
  assert sweep.main([f'--config={ABLATIONS}:claims,steps=2,eval=4', f'--workdir_root={root}',
                     '--local', *given]) == 0
  assert sweep.checkpoint_steps(root / ablations.STAGE1_RUN.format(seed=0)) == [2]
  result = report_lib.report(root, tmp_path / 'out', str(ABLATIONS))
  assert sorted(result['variants']) == sorted(ablations.CLAIM_VARIANTS)
  assert [r['run'] for r in result['stage1_runs']] == [ablations.STAGE1_RUN.format(seed=0)]
  assert result['meta']['stage1_layout'] == 'per seed'
  assert all(r['evaluated'] and r['total_steps'] == 2 for r in result['runs'])
  assert all(r['init_from'] == ablations.STAGE1_RUN.format(seed=0) for r in result['runs'])
  rows = {row['claim'].split('.')[0]: row for row in result['claims']}
  assert rows.keys() == {'1', '1b', '2a', '2b', '2d', "2a''", "2b''", "2d''", "2a'", "2b'",
                         "2c'", '2e', '2f', '2g', '3a', '3b', '3c', '3d', '3e', '3f', '3g',
                         '3h', '3i', '3j', '3k', '3l', '3m'}
  # Not claim runs: the stage-I dense variant, MoE-1 and the CDA study's variants (3h-3m)
  not_run = {'1b', '3d', '3h', '3i', '3j', '3k', '3l', '3m'}
  for key in not_run:
    assert rows[key]['verdict'] == 'not measured', rows[key]
  for key in rows.keys() - not_run:
    assert rows[key]['effect'] is not None, rows[key]
  assert (tmp_path / 'out' / 'ablations.md').exists()
  assert (tmp_path / 'out' / 'routing_mi.png').stat().st_size > 0
  assert (tmp_path / 'out' / 'metrics_by_variant.png').stat().st_size > 0


def test_results_claims_rows_come_from_the_reports():
  """docs/results.md's claims tables are copied from the generated reports, never typed in."""
  generated = set()
  for path in (REPO / 'benchmarks/results').glob('ablations*/ablations.md'):
    generated |= set(path.read_text().splitlines())
  rows = [line for line in (REPO / 'docs' / 'results.md').read_text().splitlines()
          if re.match(r"\| (1|1b|2[a-g]'{0,2}|3[a-m])\. ", line)]
  assert len(rows) >= 8
  for row in rows:
    assert row in generated, row
