"""The ablation report: a table of every run's evaluation, routing specialisation, the claims.

  python benchmarks/ablation_report.py --workdir_root=/tmp/skymoe_ablations/claims \
      [--out=benchmarks/results/ablations] [--config=configs/ablations.py]

Reads each run folder under the root (provenance.json: overrides and seed; eval/<step>/
metrics.json and routing.json, the last step evaluated; a seed's stage-I run, by its config
argument or config.json's train.stage, is listed but not compared) and writes to --out:

  ablations.md            per variant, mean +- std over seeds: each task's headline metric, then
                          every task overall and per granularity, their mean over the accuracy
                          tasks, the mutual information of expert choice with task and
                          granularity; then the claims: effect, spread, Welch's test,
                          Holm-corrected verdict and the seeds an undecided claim would need
  routing_mi.png          I(expert; task) and I(expert; granularity) per MoE layer and variant
  metrics_by_variant.png  each task's headline metric by variant (mean +- std over seeds), the
                          constant-answer baseline where metrics.json gives one
  ablations.json          all of it, per run and per variant

Both sweep layouts read: a stage I per seed under the root (configs/ablations.py's default) or
one shared stage-I workdir ('init=/abs'); runs of one seed from different stage-I workdirs are
flagged. Mutual information (bits) of one MoE layer: p(task, expert) is proportional to the
routed assignments of that cell, routed * load summed over granularities (routing.json's per-cell
counts), so tasks weigh by their prompt tokens. Claims: effect = difference of two variants'
means over seeds, spread its standard error sqrt(s_a^2/n_a + s_b^2/n_b); Welch's two-sided
t-test (needs >= 2 seeds on both sides); verdicts at family-wise alpha FAMILY_ALPHA over all the
table's tested claims (Holm-Bonferroni): 'holds' (significant, effect > 0), 'does not hold'
(significant, effect < 0), else 'inconclusive', with the seeds per variant a test at the claim's
Holm level would need for power POWER (NOTES gives the formula).
"""
import argparse
import datetime
import importlib.util
import json
import math
import os
import pathlib
import statistics
from typing import Dict, List, Optional

import numpy as np
from scipy import stats   # installed with jax (jax requires scipy)

from skymoe_jax.evaluation import evaluators  # the task registry alone: no jax

REPO = pathlib.Path(__file__).resolve().parents[1]
# Headline metric per task, as each evaluator declares it; the report's columns in this order.
TASK_COLUMNS = ('scene_classification', 'vqa', 'counting', 'grounding', 'captioning')
HEADLINE = {task: evaluators.get_evaluator(task).headline for task in TASK_COLUMNS}
ACCURACY_TASKS = ('scene_classification', 'vqa', 'counting', 'grounding')
SHORT = {'scene_classification': 'scene', 'vqa': 'vqa', 'counting': 'count',
         'grounding': 'ground', 'captioning': 'caption'}
FULL, DENSE, PLAIN, CDA_OFF = ('full (MoE-8, adaptive, CDA both)', 'dense (equal active)',
                               'plain router', 'CDA off')
DENSE_STAGE1 = 'dense (stage-I FFNs)'
STAGE1 = 'stage I'   # the variant name of a sweep's stage-I runs (not compared)
EXPERT_VARIANTS = ((1, 'MoE-1'), (2, 'MoE-2'), (4, 'MoE-4'), (8, FULL))
PREDICTED, RERENDER = 'predicted condition', 'CDA re-rendered'
SCALED_BIAS = 'adaptive router, bias x8'
PREDICTED_SCALED = 'predicted condition, bias x8'
COPIES, CUTOUT = 'CDA copies (no edit)', 'CDA cutout only'
RECOLOUR, MOVE = 'CDA recolour only', 'CDA move only'
SHARE_HALF = 'CDA share 0.5'
CONTRASTIVE, CONTRASTIVE_CONTROL = 'contrastive', 'contrastive control (w=0)'
FAMILY_ALPHA = 0.05   # family-wise error rate of the claims table (Holm-Bonferroni)
POWER = 0.8           # of the seeds-needed estimate
BAND = (0.15, 0.85)   # issue 19's target range of each accuracy (the plot's shaded band)


# -- maths --------------------------------------------------------------------------------------

def mean_std(values, seeds=None) -> Dict:
  """{'mean', 'std' (sample, ddof=1; None for one value), 'n'} of the non-None values, and with
  `seeds` (one per value) 'by_seed' {seed: value}, which the paired test matches on."""
  values = list(values)
  seeds = list(seeds) if seeds is not None else [None] * len(values)
  kept = [(s, float(x)) for s, x in zip(seeds, values) if x is not None]
  v = [x for _, x in kept]
  if not v:
    return {'mean': None, 'std': None, 'n': 0}
  out = {'mean': float(np.mean(v)), 'std': float(np.std(v, ddof=1)) if len(v) > 1 else None,
         'n': len(v)}
  if all(s is not None for s, _ in kept):
    out['by_seed'] = {int(s): x for s, x in kept}
  return out


def paired(a: Dict, b: Dict) -> Optional[Dict]:
  """The paired t-test of a - b over the seeds both have (>= 2): every variant of a seed starts
  from that seed's stage I, so the seed's own luck cancels in its difference. {'effect', 'std'
  (of the differences), 'n', 't', 'df', 'p'}; None without two shared seeds or any spread."""
  sa, sb = a.get('by_seed') or {}, b.get('by_seed') or {}
  common = sorted(set(sa) & set(sb))
  if len(common) < 2:
    return None
  d = np.asarray([sa[k] - sb[k] for k in common])
  sd = float(np.std(d, ddof=1))
  if sd <= 1e-12 * max(float(np.abs(d).max()), 1e-300):
    return None
  t = float(d.mean()) / (sd / math.sqrt(len(d)))
  df = len(d) - 1
  return {'effect': float(d.mean()), 'std': sd, 'n': len(d), 't': t, 'df': df,
          'p': float(2 * stats.t.sf(abs(t), df))}


def mutual_information(joint) -> float:
  """I(X; Y) in bits of a joint count (or probability) table [x, y]."""
  p = np.asarray(joint, np.float64)
  total = p.sum()
  if total <= 0:
    return 0.0
  p = p / total
  px, py = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
  nz = p > 0
  return float(np.sum(p[nz] * np.log2(p[nz] / (px @ py)[nz])))


def routing_tables(layer: Dict) -> Dict[str, Dict[str, np.ndarray]]:
  """{'task': {task: counts[E]}, 'granularity': {...}} of one routing.json layer; a cell's
  counts are routed * load."""
  out = {'task': {}, 'granularity': {}}
  for cell, cell_stats in layer['by_condition'].items():
    task, _, gran = cell.partition('/')
    counts = cell_stats['routed'] * np.asarray(cell_stats['load'], np.float64)
    for axis, key in (('task', task), ('granularity', gran)):
      out[axis][key] = out[axis].get(key, 0) + counts
  return out


def routing_mi(routing: Optional[Dict]) -> Dict[str, Dict[str, float]]:
  """{'task': {layer: bits}, 'granularity': {layer: bits}}; empty without routing."""
  out = {'task': {}, 'granularity': {}}
  for name, layer in ((routing or {}).get('layers') or {}).items():
    for axis, table in routing_tables(layer).items():
      out[axis][name] = mutual_information(np.stack([table[k] for k in sorted(table)]))
  return out


def binomial_se(p: Optional[float], n: int) -> Optional[float]:
  if p is None or not n:
    return None
  return math.sqrt(max(p * (1 - p), 0.0) / n)


def welch(a: Dict, b: Dict) -> Dict:
  """Welch's two-sample t-test of the seeds' means a - b (mean_std dicts, >= 2 seeds each):
  {'t', 'df' (Welch-Satterthwaite), 'p' (two-sided)}; all None without a test (fewer than two
  seeds on a side, or no spread at all)."""
  none = {'t': None, 'df': None, 'p': None}
  if not a or not b or a.get('n', 0) < 2 or b.get('n', 0) < 2:
    return none
  va, vb = a['std'] ** 2 / a['n'], b['std'] ** 2 / b['n']
  # Equal seeds (std 0 up to rounding: MoE-1's MI, say) leave nothing to test.
  if math.sqrt(va + vb) <= 1e-12 * max(abs(a['mean']), abs(b['mean']), 1e-300):
    return none
  t = (a['mean'] - b['mean']) / math.sqrt(va + vb)
  df = (va + vb) ** 2 / (va ** 2 / (a['n'] - 1) + vb ** 2 / (b['n'] - 1))
  return {'t': t, 'df': df, 'p': float(2 * stats.t.sf(abs(t), df))}


def holm(pvalues: List[Optional[float]], alpha: float = FAMILY_ALPHA) -> List[Dict]:
  """Holm-Bonferroni over the tested claims (p not None): per claim {'p_holm' (adjusted p,
  max over j <= rank of (m - j + 1) p_(j), capped at 1), 'alpha' (the level its rank is compared
  with, alpha / (m - rank + 1)), 'rank', 'm'}; untested claims get Nones. A claim is
  significant when p_holm <= alpha (the step-down procedure, family-wise error <= alpha)."""
  tested = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
  m = len(tested)
  out = [{'p_holm': None, 'alpha': None, 'rank': None, 'm': m} for _ in pvalues]
  running = 0.0
  for rank, (p, i) in enumerate(tested, 1):
    running = max(running, min(1.0, (m - rank + 1) * p))
    out[i] = {'p_holm': running, 'alpha': alpha / (m - rank + 1), 'rank': rank, 'm': m}
  return out


def seeds_needed(effect_: Optional[float], a: Dict, b: Dict, alpha: Optional[float],
                 power: float = POWER) -> Optional[int]:
  """Seeds per variant for a two-sided test at level alpha to find the observed effect with the
  given power (two-sample normal approximation): n = 2 (z_(1-alpha/2) + z_power)^2 s^2 / d^2,
  s^2 the pooled seed variance ((n_a-1) s_a^2 + (n_b-1) s_b^2) / (n_a + n_b - 2)."""
  if not effect_ or alpha is None or a.get('n', 0) < 2 or b.get('n', 0) < 2:
    return None
  pooled = (((a['n'] - 1) * a['std'] ** 2 + (b['n'] - 1) * b['std'] ** 2) /
            (a['n'] + b['n'] - 2))
  z = statistics.NormalDist()
  n = 2 * (z.inv_cdf(1 - alpha / 2) + z.inv_cdf(power)) ** 2 * pooled / effect_ ** 2
  return max(2, math.ceil(n))


def verdict(effect_: Optional[float], test: Dict, correction: Dict) -> str:
  """'holds' / 'does not hold' (significant the other way) / 'inconclusive', at the claim's
  Holm-corrected level."""
  if effect_ is None:
    return 'not measured'
  if test.get('p') is None:
    return 'inconclusive (no test: < 2 seeds or no spread)'
  if correction['p_holm'] <= FAMILY_ALPHA:
    return 'holds' if effect_ > 0 else 'does not hold'
  return 'inconclusive'


# -- reading runs -------------------------------------------------------------------------------

def _json(path: pathlib.Path) -> Optional[Dict]:
  return json.loads(path.read_text()) if path.exists() else None


def last_eval(workdir: pathlib.Path) -> Optional[pathlib.Path]:
  folder = workdir / 'eval'
  steps = sorted((int(p.name), p) for p in folder.iterdir()
                 if p.name.isdigit() and (p / 'metrics.json').exists()) if folder.is_dir() else []
  return steps[-1][1] if steps else None


def load_variants(config: Optional[str]):
  """variant_of(overrides) of the ablation config file, or None."""
  if not config or not pathlib.Path(config).exists():
    return None
  spec = importlib.util.spec_from_file_location('skymoe_ablation_variants', config)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def run_scores(metrics: Dict) -> Dict[str, Dict]:
  """{column: {'value', 'n'}}: each task's headline metric overall ('vqa') and, for tasks with
  several granularities, per granularity ('vqa/local')."""
  out = {}
  for task, result in metrics['tasks'].items():
    key = HEADLINE.get(task, 'accuracy')
    overall = result.get('overall', {})
    out[task] = {'value': overall.get(key), 'n': overall.get('n', 0)}
    by = result.get('by_granularity', {})
    if len(by) > 1:
      for gran, m in sorted(by.items()):
        out[f'{task}/{gran}'] = {'value': m.get(key), 'n': m.get('n', 0)}
  for col, cell in out.items():
    if HEADLINE.get(col.split('/')[0]) != 'cider':
      cell['se'] = binomial_se(cell['value'], cell['n'])
  # Means over the accuracy tasks: all of them, and their local-granularity questions only.
  local = {t: metrics['tasks'][t].get('by_granularity', {}).get('local')
           for t in ACCURACY_TASKS if t in metrics['tasks']}
  local = {t: {'value': m.get(HEADLINE[t]), 'n': m.get('n', 0)} for t, m in local.items() if m}
  for col, cells in (('avg_acc', {t: out[t] for t in ACCURACY_TASKS if t in out}),
                     ('local_acc', local)):
    cells = [c for c in cells.values() if c['value'] is not None]
    if cells:
      ses = [binomial_se(c['value'], c['n']) or 0.0 for c in cells]
      out[col] = {'value': float(np.mean([c['value'] for c in cells])), 'n': None,
                  'se': math.sqrt(sum(x ** 2 for x in ses)) / len(cells)}
  return out


def baselines(metrics: Dict) -> Dict[str, float]:
  """{task: its constant-answer baseline} where metrics.json gives one: tasks.<task>.baseline
  or tasks.<task>.overall.baseline, a number or {metric: number} (the headline's is taken)."""
  out = {}
  for task, result in metrics.get('tasks', {}).items():
    value = result.get('baseline', (result.get('overall') or {}).get('baseline'))
    if isinstance(value, dict):
      value = value.get(HEADLINE.get(task, 'accuracy'), value.get('value'))
    if isinstance(value, (int, float)):
      out[task] = float(value)
  return out


def load_run(workdir: pathlib.Path, variants=None) -> Optional[Dict]:
  prov = _json(workdir / 'provenance.json')
  if prov is None:
    return None
  overrides = dict(prov.get('overrides', {}))
  seed = int(overrides.get('seed', 0))
  # The sweep's own fields name the variant; command-line overrides apply to every run.
  swept = prov.get('swept')
  own = {k: v for k, v in overrides.items() if swept is None or k in swept}
  name = variants.variant_of(own) if variants else None
  if name is None:
    name = ','.join(f'{k}={v}' for k, v in sorted(own.items()) if k != 'seed') or 'base'
  run = {'run': workdir.name, 'variant': name, 'seed': seed, 'overrides': overrides,
         'evaluated': False, 'stage': 'stage2'}
  config = _json(workdir / 'config.json')
  arg = str(prov.get('config') or '').rpartition(':')[2]
  if 'stage1' in arg.split(',') or (config and config['train'].get('stage') == 'stage1'):
    run.update(stage='stage1', variant=STAGE1)  # a seed's stage I: the runs start from it
  if config:
    run['init_from'] = config['train'].get('init_from')
    run['total_steps'] = config['train'].get('total_steps')
    # Questions per task (eval.max_per_task), or per source in older runs (eval.max_samples).
    per_task = config['eval'].get('max_per_task')
    run['eval_samples'] = (f'{per_task} per task' if per_task else
                           f'{config["eval"].get("max_samples")} per source')
  lines = ((workdir / 'metrics.jsonl').read_text().splitlines()
           if (workdir / 'metrics.jsonl').exists() else [])
  if lines:
    last = json.loads(lines[-1])
    run['step'], run['steps_per_s'] = last.get('step'), last.get('steps_per_s')
  folder = last_eval(workdir)
  if folder is None:
    return run
  metrics = _json(folder / 'metrics.json')
  run.update(evaluated=True, eval_step=metrics.get('step'), scores=run_scores(metrics),
             mi=routing_mi(_json(folder / 'routing.json')), baselines=baselines(metrics))
  answers = folder / 'answers.jsonl'
  if answers.exists():  # kept in memory only: for changed_answers()
    rows = [json.loads(line) for line in answers.read_text().splitlines() if line.strip()]
    run['_answers'] = {row['question_id']: row['answer'].strip() for row in rows}
  written = prov.get('written')
  if written:  # prepare wrote provenance just before training: start to evaluation written
    start = datetime.datetime.fromisoformat(written).timestamp()
    run['runtime_s'] = round(os.path.getmtime(folder / 'metrics.json') - start, 1)
  return run


def load_runs(root: pathlib.Path, variants=None) -> List[Dict]:
  runs = [load_run(p, variants) for p in sorted(root.iterdir()) if p.is_dir()]
  return [r for r in runs if r is not None]


def changed_answers(runs: List[Dict], reference: str = None) -> None:
  """Sets run['changed_vs_full']: the share of questions whose answer differs from the
  reference variant's (default the full model) run of the same seed."""
  reference = reference or FULL
  refs = {r['seed']: r.get('_answers') for r in runs if r['variant'] == reference}
  for r in runs:
    ref, own = refs.get(r['seed']), r.get('_answers')
    if ref and own:
      common = set(ref) & set(own)
      r['changed_vs_full'] = sum(ref[q] != own[q] for q in common) / max(len(common), 1)


# -- aggregation and claims ---------------------------------------------------------------------

def aggregate(runs: List[Dict]) -> Dict[str, Dict]:
  """Per variant: mean/std over seeds of every score and every layer's MI, plus runtimes."""
  by_variant = {}
  for r in runs:
    by_variant.setdefault(r['variant'], []).append(r)
  out = {}
  for name, group in by_variant.items():
    done = [r for r in group if r['evaluated']]
    cols = sorted({c for r in done for c in r['scores']})
    agg = {'seeds': sorted(r['seed'] for r in done),
           'unevaluated': sorted(r['run'] for r in group if not r['evaluated']),
           'scores': {c: mean_std([r['scores'].get(c, {}).get('value') for r in done],
                                  [r['seed'] for r in done])
                      for c in cols},
           'mi': {}, 'runtime_s': mean_std(r.get('runtime_s') for r in done),
           'changed_vs_full': mean_std(r.get('changed_vs_full') for r in done)}
    for c in cols:  # the evaluation sample's binomial SE of the mean (claims without seeds)
      ses = [r['scores'].get(c, {}).get('se') for r in done]
      if ses and all(x is not None for x in ses):
        agg['scores'][c]['binomial_se'] = math.sqrt(sum(x ** 2 for x in ses)) / len(ses)
    for axis in ('task', 'granularity'):
      layers = sorted({l for r in done for l in r['mi'][axis]})
      per_layer = {l: mean_std(r['mi'][axis].get(l) for r in done) for l in layers}
      with_mi = [r for r in done if r['mi'][axis]]
      mean_over_layers = mean_std([np.mean(list(r['mi'][axis].values())) for r in with_mi],
                                  [r['seed'] for r in with_mi])
      agg['mi'][axis] = {'layers': per_layer, 'mean': mean_over_layers}
    out[name] = agg
  return out


def effect(a: Dict, b: Dict) -> Dict:
  """Difference of means a - b of two mean_std dicts, its spread (standard error; see the module
  doc), Welch's test (t, df, p) and the 95% confidence interval of the difference."""
  if not a or not b or a.get('mean') is None or b.get('mean') is None:
    return {'effect': None, 'spread': None, 'spread_kind': None, 'n': (0, 0), 'std': (None, None),
            't': None, 'df': None, 'p': None, 'ci95': None}
  d = a['mean'] - b['mean']
  out = {'effect': d, 'n': (a['n'], b['n']), 'std': (a.get('std'), b.get('std')),
         **welch(a, b), 'ci95': None, 'test': 'welch'}
  pair = paired(a, b)
  if pair is not None and pair['n'] == a['n'] == b['n']:
    # Same seeds on both sides: the paired test (the seeds' stage Is are shared by variants).
    half = float(stats.t.ppf(0.975, pair['df'])) * pair['std'] / math.sqrt(pair['n'])
    out.update(effect=pair['effect'], t=pair['t'], df=pair['df'], p=pair['p'], test='paired',
               spread=pair['std'] / math.sqrt(pair['n']), spread_kind='paired seeds',
               paired_std=pair['std'], ci95=(pair['effect'] - half, pair['effect'] + half))
    return out
  if a['n'] >= 2 and b['n'] >= 2:
    out['spread'] = math.sqrt(a['std'] ** 2 / a['n'] + b['std'] ** 2 / b['n'])
    out['spread_kind'] = 'seeds'
    if out['df'] is not None:
      half = float(stats.t.ppf(0.975, out['df'])) * out['spread']
      out['ci95'] = (d - half, d + half)
  elif a.get('binomial_se') is not None and b.get('binomial_se') is not None:
    out['spread'] = math.sqrt(a['binomial_se'] ** 2 + b['binomial_se'] ** 2)
    out['spread_kind'] = 'binomial SE (eval sample only)'
  else:
    out['spread'], out['spread_kind'] = None, 'none (1 seed)'
  return out


def _score(agg, variant, col):
  return ((agg.get(variant) or {}).get('scores') or {}).get(col)


def _mi(agg, variant, axis):
  return (((agg.get(variant) or {}).get('mi') or {}).get(axis) or {}).get('mean')


def claims(agg: Dict[str, Dict], alpha: float = FAMILY_ALPHA) -> List[Dict]:
  """Every claim's effect and Welch test; verdicts at Holm-Bonferroni over the tested claims."""
  rows, extras = [], []

  def add(claim, measure, a, b, e, paper=None, extra=None):
    rows.append(dict(claim=claim, measure=measure, compare=f'{a} - {b}', paper=paper, **e))
    extras.append(extra)

  def acc(col, a, b):
    return effect(_score(agg, a, col), _score(agg, b, col))

  def mi(axis, a, b):
    return effect(_mi(agg, a, axis), _mi(agg, b, axis))

  mean_acc, local = 'mean accuracy (scene, vqa, count, ground)', (
      'mean accuracy of local questions (vqa, count, ground)')
  add('1. routed experts beat a dense model (equal active parameters)', mean_acc,
      FULL, DENSE, acc('avg_acc', FULL, DENSE))
  add('1b. ... and the stage-I dense model trained further (half the active FFN)', mean_acc,
      FULL, DENSE_STAGE1, acc('avg_acc', FULL, DENSE_STAGE1))
  add('2a. adaptive router specialises experts by task', 'I(expert; task), bits, mean of layers',
      FULL, PLAIN, mi('task', FULL, PLAIN))
  add('2b. ... and by granularity', 'I(expert; granularity), bits, mean of layers',
      FULL, PLAIN, mi('granularity', FULL, PLAIN))
  add('2d. adaptive router beats the plain one', mean_acc, FULL, PLAIN,
      acc('avg_acc', FULL, PLAIN))
  # The same three with the adaptive bias scaled x8, so that it moves from zero in 100 steps.
  add("2a''. adaptive router (bias x8) specialises experts by task",
      'I(expert; task), bits, mean of layers', SCALED_BIAS, PLAIN,
      mi('task', SCALED_BIAS, PLAIN))
  add("2b''. ... and by granularity", 'I(expert; granularity), bits, mean of layers',
      SCALED_BIAS, PLAIN, mi('granularity', SCALED_BIAS, PLAIN))
  add("2d''. adaptive router (bias x8) beats the plain one", mean_acc, SCALED_BIAS, PLAIN,
      acc('avg_acc', SCALED_BIAS, PLAIN))
  add("2a'. predicted condition specialises experts by task",
      'I(expert; task), bits, mean of layers', PREDICTED, PLAIN, mi('task', PREDICTED, PLAIN))
  add("2b'. ... and by granularity", 'I(expert; granularity), bits, mean of layers',
      PREDICTED, PLAIN, mi('granularity', PREDICTED, PLAIN))

  def interval(row):  # a two-sided test cannot show equality: the interval says how close
    if row['ci95'] is None:
      return ''
    lo, hi = row['ci95']
    return f'; 95% CI [{lo:+.3f}, {hi:+.3f}]'
  add("2c'. predicted condition is no worse than the tag-given one", mean_acc,
      PREDICTED, FULL, acc('avg_acc', PREDICTED, FULL), extra=interval)
  add("2e. predicted condition (bias x8) specialises experts by task",
      'I(expert; task), bits, mean of layers', PREDICTED_SCALED, PLAIN,
      mi('task', PREDICTED_SCALED, PLAIN))
  add('2f. ... and by granularity', 'I(expert; granularity), bits, mean of layers',
      PREDICTED_SCALED, PLAIN, mi('granularity', PREDICTED_SCALED, PLAIN))
  add("2g. predicted condition (bias x8) is no worse than the tag-given one (bias x8)", mean_acc,
      PREDICTED_SCALED, SCALED_BIAS, acc('avg_acc', PREDICTED_SCALED, SCALED_BIAS),
      extra=interval)
  add('3a. CDA improves local tasks', local, FULL, CDA_OFF, acc('local_acc', FULL, CDA_OFF))
  add('3b. CDA improves counting', 'counting accuracy', FULL, CDA_OFF,
      acc('counting', FULL, CDA_OFF), paper='+0.0947')
  add('3c. CDA improves VQA', 'VQA accuracy', FULL, CDA_OFF, acc('vqa', FULL, CDA_OFF),
      paper='+0.0656')
  means = [(e, (_score(agg, v, 'avg_acc') or {}).get('mean')) for e, v in EXPERT_VARIANTS]
  means = [(e, m) for e, m in means if m is not None]
  order = ', '.join(f'{e} experts {m:.3f}' for e, m in means)

  def ordering(row):
    if len(means) < 2 or row['effect'] is None:
      return ''
    monotone = all(m1 <= m2 for (_, m1), (_, m2) in zip(means, means[1:]))
    return f'; means by experts {"monotone" if monotone else "not monotone"} ({order})'
  add('3d. more experts are better (8 > 4 > 2 > 1)', 'mean accuracy', 'MoE-8 (full)', 'MoE-1',
      acc('avg_acc', FULL, 'MoE-1'), paper='8 > 6 > 4 > 1', extra=ordering)
  add('3e. re-rendered CDA improves local tasks', local, RERENDER, CDA_OFF,
      acc('local_acc', RERENDER, CDA_OFF))
  add('3f. re-rendered CDA improves counting', 'counting accuracy', RERENDER, CDA_OFF,
      acc('counting', RERENDER, CDA_OFF))
  add('3g. re-rendered counterfactuals beat pixel edits (local tasks)', local, RERENDER, FULL,
      acc('local_acc', RERENDER, FULL))
  # The CDA study: each edit kind against the control whose edit rows are unedited copies, so
  # an edit's content is told apart from what any edit row costs (an original of the batch).
  add('3h. an edit row costs the accuracy of the original it displaces', mean_acc, COPIES,
      CDA_OFF, acc('avg_acc', COPIES, CDA_OFF))
  add('3i. cutouts teach counting', 'counting accuracy', CUTOUT, COPIES,
      acc('counting', CUTOUT, COPIES))
  add('3j. recolouring teaches colour VQA', 'VQA accuracy', RECOLOUR, COPIES,
      acc('vqa', RECOLOUR, COPIES))
  add('3k. moves teach grounding', 'grounding Acc@0.5', MOVE, COPIES,
      acc('grounding', MOVE, COPIES))
  add('3l. more edit rows help local tasks (share 0.5 vs 0.25)', local, SHARE_HALF, FULL,
      acc('local_acc', SHARE_HALF, FULL))
  # Both train the projector on local crops as well; only the contrastive term's weight differs.
  add('3m. the local/global contrastive term helps local tasks', local, CONTRASTIVE,
      CONTRASTIVE_CONTROL, acc('local_acc', CONTRASTIVE, CONTRASTIVE_CONTROL))

  corrections = holm([r['p'] for r in rows], alpha)
  for row, extra, corr in zip(rows, extras, corrections):
    row.update(p_holm=corr['p_holm'], alpha_holm=corr['alpha'], holm_m=corr['m'])
    row['verdict'] = verdict(row['effect'], row, corr)
    row['seeds_needed'] = None
    if row['verdict'].startswith('inconclusive') and row['p'] is not None:
      a_ms = {'n': row['n'][0], 'std': row['std'][0]}
      b_ms = {'n': row['n'][1], 'std': row['std'][1]}
      if row.get('test') == 'paired':   # one sample of per-seed differences
        z = statistics.NormalDist()
        n = ((z.inv_cdf(1 - corr['alpha'] / 2) + z.inv_cdf(POWER)) * row['paired_std']
             / row['effect']) ** 2 if row['effect'] else None
        row['seeds_needed'] = max(2, math.ceil(n)) if n else None
      else:
        row['seeds_needed'] = seeds_needed(row['effect'], a_ms, b_ms, corr['alpha'])
    if extra:
      row['verdict'] += extra(row)
  return rows


# -- output -------------------------------------------------------------------------------------

def fmt(ms: Optional[Dict], digits: int = 3) -> str:
  if not ms or ms.get('mean') is None:
    return '-'
  text = f'{ms["mean"]:.{digits}f}'
  return text + (f' ± {ms["std"]:.{digits}f}' if ms.get('std') is not None else '')


def _signed(x: Optional[float], digits: int = 3) -> str:
  return '-' if x is None else f'{x:+.{digits}f}'


def score_columns(agg: Dict) -> List[str]:
  cols = {c for a in agg.values() for c in a['scores']}
  order = [t for t in TASK_COLUMNS if t in cols]
  out = []
  for t in order:
    out.append(t)
    out += sorted(c for c in cols if c.startswith(t + '/'))
  return out + [c for c in ('avg_acc', 'local_acc') if c in cols]


def _col_name(col: str) -> str:
  if col in ('avg_acc', 'local_acc'):
    return {'avg_acc': 'mean acc', 'local_acc': 'local mean acc'}[col]
  task, _, gran = col.partition('/')
  name = f'{SHORT.get(task, task)} {HEADLINE.get(task, "accuracy")}'
  return f'{SHORT.get(task, task)} {gran}' if gran else name


def ordered_variants(agg: Dict, order: List[str]) -> List[str]:
  return [v for v in order if v in agg] + sorted(v for v in agg if v not in order)


NOTES = (
    "effect: difference of the two variants' means over seeds; with the same seeds on both "
    'sides the paired test: the mean of the per-seed differences, spread their standard error '
    'sd_d / sqrt(n), p from t with n - 1 degrees of freedom, seeds needed n = ((z_(1-alpha_j/2) '
    '+ z_power) sd_d / d)^2; otherwise spread sqrt(s_a^2/n_a + s_b^2/n_b) and Welch\'s t-test '
    '(Welch-Satterthwaite degrees of freedom; with one seed on a side, the binomial SE of the '
    'evaluation sample, which ignores training noise: no test). Holm p: the Holm-adjusted p (the m tested claims '
    'sorted by p, p_(j) times m - j + 1, running maximum, at most 1); holds: Holm p <= {alpha} '
    'and effect > 0; does not hold: the same with effect < 0 (significant the other way); else '
    'inconclusive. seeds needed (inconclusive claims): seeds per variant for power {power} at '
    "the claim's Holm level alpha_j = {alpha} / (m - j + 1) (j its rank by p), from the "
    'two-sample normal approximation with the observed effect d and the pooled seed variance '
    's^2 = ((n_a-1) s_a^2 + (n_b-1) s_b^2) / (n_a + n_b - 2): '
    'n = 2 (z_(1-alpha_j/2) + z_power)^2 s^2 / d^2, rounded up. The "no worse" claim (2c\') is '
    'tested two-sided like the others; its 95% confidence interval says how close the two are. '
    'I(e;task): mutual information of expert choice and task from routing.json counts (routed '
    'x load). answers ≠ full: share of evaluation questions whose answer differs from the full '
    "model's run of the same seed.")


def _p(x: Optional[float]) -> str:
  return '-' if x is None else f'{x:.2g}'


def headline_columns(agg: Dict) -> List[str]:
  """Each task's headline metric (overall), then the means over the accuracy tasks."""
  return [c for c in score_columns(agg) if '/' not in c]


def markdown(agg: Dict, rows: List[Dict], runs: List[Dict], order: List[str], meta: Dict) -> str:
  names = ordered_variants(agg, order)
  cols = score_columns(agg)
  heads = headline_columns(agg)
  base = meta.get('baselines') or {}
  m = next((r['holm_m'] for r in rows), 0)
  lines = [
      '# SkyMoE ablations at demo scale',
      '',
      f'{meta["runs"]} runs under `{meta["root"]}` (stage II: {meta["steps"]} steps each, '
      f'upcycled from {meta["stage1"]}); evaluation on the held-out synthetic scenes, '
      f'questions asked: {meta["eval"]} (answered per task: ' + (', '.join(
          f'{SHORT.get(t, t)} {"/".join(map(str, n))}'
          for t, n in meta.get('questions', {}).items()) or '-') + '). Cells: mean ± std over '
      'seeds (n = seeds; no ± with one seed). Generated by `benchmarks/ablation_report.py`.',
      '',
  ]
  if meta.get('layout_note'):
    lines += [f'**{meta["layout_note"]}**', '']
  lines += [
      "## Each task's headline metric per variant",
      '',
      '| variant | n seeds | ' + ' | '.join(_col_name(c) for c in heads) + ' |',
      '|---|---|' + '---|' * len(heads),
  ]
  for v in names:
    lines.append(f'| {v} | {len(agg[v]["seeds"])} | ' +
                 ' | '.join(fmt(agg[v]['scores'].get(c)) for c in heads) + ' |')
  if base:
    lines.append('| constant-answer baseline | - | ' + ' | '.join(
        f'{base[c]:.3f}' if c in base else '-' for c in heads) + ' |')
  lines += [
      '',
      '## Per variant and granularity',
      '',
      '| variant | n | ' + ' | '.join(_col_name(c) for c in cols) +
      ' | I(e;task) | I(e;gran) | answers ≠ full | run (s) |',
      '|---|---|' + '---|' * (len(cols) + 4),
  ]
  for v in names:
    a = agg[v]
    lines.append(f'| {v} | {len(a["seeds"])} | ' +
                 ' | '.join(fmt(a['scores'].get(c)) for c in cols) +
                 f' | {fmt(a["mi"]["task"]["mean"], 4)} | '
                 f'{fmt(a["mi"]["granularity"]["mean"], 4)} | {fmt(a["changed_vs_full"], 2)}'
                 f' | {fmt(a["runtime_s"], 0)} |')
  missing = [v for v in order if v not in agg]
  if missing:
    lines += ['', 'Not run: ' + ', '.join(missing) + '.']
  unevaluated = [r['run'] for r in runs if not r['evaluated'] and r['stage'] != 'stage1']
  if unevaluated:
    lines += ['', 'Runs without an evaluation (unfinished or stopped): ' +
              ', '.join(f'`{r}`' for r in unevaluated) + '.']
  layers = sorted({l for a in agg.values() for l in a['mi']['task']['layers']})
  if layers:
    lines += ['', '## Routing specialisation per MoE layer (bits)', '',
              '| variant | ' + ' | '.join(f'I(e;task) {l}' for l in layers) + ' | ' +
              ' | '.join(f'I(e;gran) {l}' for l in layers) + ' |',
              '|---|' + '---|' * (2 * len(layers))]
    for v in names:
      mi = agg[v]['mi']
      if not mi['task']['layers']:
        continue
      lines.append(f'| {v} | ' + ' | '.join(fmt(mi['task']['layers'].get(l), 4) for l in layers)
                   + ' | ' + ' | '.join(fmt(mi['granularity']['layers'].get(l), 4)
                                        for l in layers) +
                   ' |')
  lines += ['', '## Claims', '',
            "A paired two-sided t-test per claim over the seeds both variants ran (each seed's "
            "variants share its stage I; Welch's where the seeds differ); verdicts at a family-wise "
            f'alpha of {FAMILY_ALPHA} over the {m} tested claims of this table '
            '(Holm-Bonferroni).', '',
            '| claim | measure | comparison | effect | spread (SE) | n seeds | p | Holm p | '
            'paper | verdict | seeds needed |',
            '|---|---|---|---|---|---|---|---|---|---|---|']
  for r in rows:
    digits = 4 if 'bits' in r['measure'] else 3
    spread = '-' if r['spread'] is None else f'{r["spread"]:.{digits}f}'
    if r['spread_kind'] and r['spread_kind'] != 'seeds':
      spread = r['spread_kind'] if r['spread'] is None else f'{spread} ({r["spread_kind"]})'
    lines.append(f'| {r["claim"]} | {r["measure"]} | {r["compare"]} | '
                 f'{_signed(r["effect"], digits)} | {spread} | {r["n"][0]} vs {r["n"][1]} | '
                 f'{_p(r["p"])} | {_p(r["p_holm"])} | {r["paper"] or "-"} | {r["verdict"]} | '
                 f'{r["seeds_needed"] or "-"} |')
  lines += ['', NOTES.format(alpha=FAMILY_ALPHA, power=POWER), '']
  return '\n'.join(lines)


def plot_metrics(agg: Dict, order: List[str], path: pathlib.Path,
                 base: Optional[Dict[str, float]] = None) -> bool:
  """One panel per task: its headline metric by variant (the table's order), mean ± std over
  seeds; the constant-answer baseline dashed where metrics.json gives it, and the 0.15-0.85
  band of issue 19 shaded behind accuracies."""
  names = ordered_variants(agg, order)
  tasks = [t for t in TASK_COLUMNS if any(t in agg[v]['scores'] for v in names)]
  if not tasks:
    return False
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  ncols = min(3, len(tasks))
  nrows = math.ceil(len(tasks) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.2 + 2.4 * nrows),
                           squeeze=False)
  x = np.arange(len(names))
  for ax, task in zip(axes.flat, tasks):
    cells = [agg[v]['scores'].get(task) or {} for v in names]
    means = [c.get('mean') if c.get('mean') is not None else np.nan for c in cells]
    errs = [c.get('std') or 0.0 for c in cells]
    if HEADLINE.get(task) != 'cider':
      ax.axhspan(*BAND, color='0.92', zorder=0, label=f'{BAND[0]}-{BAND[1]}')
      ax.set_ylim(0, 1)
    ax.bar(x, means, 0.7, yerr=errs, capsize=3, color='tab:blue', zorder=2)
    if base and task in base:
      ax.axhline(base[task], color='k', linestyle='--', linewidth=1, zorder=3,
                 label='constant answer')
    ax.set_title(f'{task} ({HEADLINE.get(task, "accuracy")})')
    ax.set_xticks(x)
    ax.set_xticklabels(names, rotation=60, ha='right', fontsize=7)
    if ax.get_legend_handles_labels()[0]:
      ax.legend(fontsize=7, loc='upper right')
  for ax in list(axes.flat)[len(tasks):]:
    ax.axis('off')
  axes[0][0].set_ylabel('mean ± std over seeds')
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)
  return True


def plot_mi(agg: Dict, order: List[str], path: pathlib.Path) -> bool:
  """Grouped bars: I(expert; task) and I(expert; granularity) per layer, one bar per variant."""
  names = [v for v in ordered_variants(agg, order) if agg[v]['mi']['task']['layers']]
  if not names:
    return False
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  layers = sorted({l for v in names for l in agg[v]['mi']['task']['layers']})
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), sharey=True)
  width = 0.8 / len(names)
  x = np.arange(len(layers))
  for ax, axis in zip(axes, ('task', 'granularity')):
    for i, v in enumerate(names):
      per = [agg[v]['mi'][axis]['layers'].get(l) or {} for l in layers]
      means = [p.get('mean') or 0.0 for p in per]
      errs = [p.get('std') or 0.0 for p in per]
      ax.bar(x + (i - (len(names) - 1) / 2) * width, means, width, yerr=errs, label=v,
             hatch='//' if v == PLAIN else None)
    ax.set_xticks(x)
    ax.set_xticklabels(layers)
    ax.set_title(f'I(expert; {axis})')
    ax.set_xlabel('MoE layer')
  axes[0].set_ylabel('bits (mean ± std over seeds)')
  axes[1].legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.02, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=100, bbox_inches='tight')
  plt.close(fig)
  return True


def stage1_layout(runs: List[Dict]) -> Dict:
  """Where the stage-II runs started from: 'per seed' (each from a stage I of its own seed: a
  stage-I run of this root trained with that seed, or one workdir per seed elsewhere),
  'shared' (one stage-I workdir for all: seeds vary stage II only), or 'mixed' (runs of one seed
  from different stage Is, or seeds sharing some: flagged in the report)."""
  stage2 = [r for r in runs if r['stage'] == 'stage2' and r.get('init_from')]
  inits = sorted({r['init_from'] for r in stage2})
  if not inits:
    return {'layout': None, 'inits': [], 'text': '-', 'note': None}
  own = {r['run']: r['seed'] for r in runs if r['stage'] == 'stage1'}
  by_seed = {}
  for r in stage2:
    by_seed.setdefault(r['seed'], set()).add(r['init_from'])
  names = ', '.join(f'`{i}`' for i in inits)
  if all(own.get(pathlib.PurePath(r['init_from']).name, -1) == r['seed'] for r in stage2):
    return {'layout': 'per seed', 'inits': inits, 'note': None,
            'text': f'a stage I per seed, trained in this root ({names})'}
  if len(inits) == 1:
    return {'layout': 'shared', 'inits': inits, 'note': None,
            'text': f'one shared stage I `{inits[0]}` (seeds vary stage II only)'}
  if all(len(v) == 1 for v in by_seed.values()) and len(inits) == len(by_seed):
    return {'layout': 'per seed', 'inits': inits, 'note': None,
            'text': f'a stage I per seed ({names})'}
  return {'layout': 'mixed', 'inits': inits, 'text': names,
          'note': 'Mixed stage-I layout: runs of one seed start from different stage-I '
                  'workdirs, or seeds share some, so differences between variants include '
                  'differences of stage I. Sweep each layout into a root of its own.'}


def report(root, out, config=None) -> Dict:
  root, out = pathlib.Path(root), pathlib.Path(out)
  if not root.is_dir():
    raise SystemExit(f'--workdir_root={root}: no such folder')
  module = load_variants(config)
  order = list(module.VARIANTS) if module else []
  every = load_runs(root, module)
  stage1_runs = [r for r in every if r['stage'] == 'stage1']
  runs = [r for r in every if r['stage'] != 'stage1']
  changed_answers(runs)
  agg = aggregate(runs)
  rows = claims(agg)
  evaluated = [r for r in runs if r['evaluated']]
  layout = stage1_layout(every)
  sizes, base = {}, {}
  for r in evaluated:
    for col, cell in r['scores'].items():
      if col in HEADLINE:
        sizes.setdefault(col, set()).add(cell['n'])
    for task, value in r.get('baselines', {}).items():
      base.setdefault(task, []).append(value)
  meta = {'root': str(root), 'runs': len(runs), 'stage1_runs': [r['run'] for r in stage1_runs],
          'steps': ', '.join(sorted({str(r.get('total_steps')) for r in evaluated})) or '-',
          'stage1': layout['text'], 'stage1_layout': layout['layout'],
          'stage1_inits': layout['inits'], 'layout_note': layout['note'],
          'eval': ', '.join(sorted({str(r.get('eval_samples')) for r in evaluated})) or '-',
          'questions': {t: sorted(n) for t, n in sizes.items()},
          'baselines': {t: float(np.mean(v)) for t, v in base.items()},
          'family_alpha': FAMILY_ALPHA, 'power': POWER}
  out.mkdir(parents=True, exist_ok=True)
  text = markdown(agg, rows, runs, order, meta)
  (out / 'ablations.md').write_text(text)
  plotted = plot_mi(agg, order, out / 'routing_mi.png')
  plotted_metrics = plot_metrics(agg, order, out / 'metrics_by_variant.png', meta['baselines'])
  for r in every:
    r.pop('_answers', None)
  (out / 'ablations.json').write_text(json.dumps(
      {'meta': meta, 'runs': runs, 'stage1_runs': stage1_runs, 'variants': agg, 'claims': rows},
      indent=1) + '\n')
  return {'markdown': text, 'plot': plotted, 'metrics_plot': plotted_metrics, 'runs': runs,
          'stage1_runs': stage1_runs, 'variants': agg, 'claims': rows, 'meta': meta}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--workdir_root', required=True, help='The sweep root (one run per folder).')
  parser.add_argument('--out', default=str(REPO / 'benchmarks/results/ablations'))
  parser.add_argument('--config', default=str(REPO / 'configs/ablations.py'),
                      help='Config file whose VARIANTS name the runs ("" = raw overrides).')
  args = parser.parse_args(argv)
  result = report(args.workdir_root, args.out, args.config or None)
  print(result['markdown'])


if __name__ == '__main__':
  main()
