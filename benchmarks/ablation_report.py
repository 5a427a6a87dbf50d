"""The ablation report: a table of every run's evaluation, routing specialisation, the claims.

  python benchmarks/ablation_report.py --workdir_root=/tmp/skymoe_ablations/runs \
      [--out=benchmarks/results/ablations] [--config=configs/ablations.py]

Reads each run folder under the root (provenance.json: overrides and seed; eval/<step>/
metrics.json and routing.json, the last step evaluated) and writes to --out:

  ablations.md     per variant, mean +- std over seeds: each task's headline metric overall and
                   per granularity, their mean over the accuracy tasks, the mutual information
                   of expert choice with task and granularity; then the claims with their
                   measured effect, its spread and a verdict
  routing_mi.png   I(expert; task) and I(expert; granularity) per MoE layer and variant
  ablations.json   all of it, per run and per variant

Mutual information (bits) of one MoE layer: p(task, expert) is proportional to the routed
assignments of that cell, routed * load summed over granularities (routing.json's per-cell
counts), so tasks weigh by their prompt tokens. Spread of an effect (difference of means of two
variants): with >= 2 seeds in both, sqrt(s_a^2/n_a + s_b^2/n_b) from the seeds; otherwise, for
accuracies only, the binomial standard error of the evaluation sample (sqrt(p(1-p)/n) per task,
combined in quadrature), which ignores training noise and so understates the spread. Verdict:
'holds' if effect > 2 x spread, 'does not hold' if effect < -2 x spread, else 'inconclusive';
no spread (one seed, mutual information) is 'inconclusive'.
"""
import argparse
import datetime
import importlib.util
import json
import math
import os
import pathlib
from typing import Dict, List, Optional

import numpy as np

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
EXPERT_VARIANTS = ((1, 'MoE-1'), (2, 'MoE-2'), (4, 'MoE-4'), (8, FULL))


# -- maths --------------------------------------------------------------------------------------

def mean_std(values) -> Dict:
  """{'mean', 'std' (sample, ddof=1; None for one value), 'n'} of the non-None values."""
  v = [float(x) for x in values if x is not None]
  if not v:
    return {'mean': None, 'std': None, 'n': 0}
  return {'mean': float(np.mean(v)), 'std': float(np.std(v, ddof=1)) if len(v) > 1 else None,
          'n': len(v)}


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
  for cell, stats in layer['by_condition'].items():
    task, _, gran = cell.partition('/')
    counts = stats['routed'] * np.asarray(stats['load'], np.float64)
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


def verdict(effect: Optional[float], spread: Optional[float]) -> str:
  if effect is None:
    return 'not measured'
  if not spread:
    return 'inconclusive (no spread)'
  if effect > 2 * spread:
    return 'holds'
  if effect < -2 * spread:
    return 'does not hold'
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
         'evaluated': False}
  config = _json(workdir / 'config.json')
  if config:
    run['init_from'] = config['train'].get('init_from')
    run['total_steps'] = config['train'].get('total_steps')
    run['eval_samples'] = config['eval'].get('max_samples')
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
             mi=routing_mi(_json(folder / 'routing.json')))
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
           'scores': {c: mean_std(r['scores'].get(c, {}).get('value') for r in done)
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
      mean_over_layers = mean_std(np.mean(list(r['mi'][axis].values())) for r in done
                                  if r['mi'][axis])
      agg['mi'][axis] = {'layers': per_layer, 'mean': mean_over_layers}
    out[name] = agg
  return out


def effect(a: Dict, b: Dict) -> Dict:
  """Difference of means a - b of two mean_std dicts and its spread (see the module doc)."""
  if not a or not b or a.get('mean') is None or b.get('mean') is None:
    return {'effect': None, 'spread': None, 'spread_kind': None, 'n': (0, 0)}
  d = a['mean'] - b['mean']
  n = (a['n'], b['n'])
  if a['n'] >= 2 and b['n'] >= 2:
    spread = math.sqrt(a['std'] ** 2 / a['n'] + b['std'] ** 2 / b['n'])
    kind = 'seed std'
  elif a.get('binomial_se') is not None and b.get('binomial_se') is not None:
    spread = math.sqrt(a['binomial_se'] ** 2 + b['binomial_se'] ** 2)
    kind = 'binomial SE (eval sample only)'
  else:
    spread, kind = None, 'none (1 seed)'
  return {'effect': d, 'spread': spread, 'spread_kind': kind, 'n': n}


def _score(agg, variant, col):
  return ((agg.get(variant) or {}).get('scores') or {}).get(col)


def _mi(agg, variant, axis):
  return (((agg.get(variant) or {}).get('mi') or {}).get(axis) or {}).get('mean')


def claims(agg: Dict[str, Dict]) -> List[Dict]:
  rows = []

  def add(claim, measure, a, b, e, paper=None, extra=None):
    row = dict(claim=claim, measure=measure, compare=f'{a} - {b}', paper=paper, **e)
    row['verdict'] = verdict(e['effect'], e['spread'])
    if extra:
      row['verdict'] += extra(row)
    rows.append(row)

  add('1. routed experts beat a dense model (equal active parameters)',
      'mean accuracy (scene, vqa, count, ground)',
      FULL, DENSE, effect(_score(agg, FULL, 'avg_acc'), _score(agg, DENSE, 'avg_acc')))
  add('1b. ... and the stage-I dense model trained further (half the active FFN)',
      'mean accuracy (scene, vqa, count, ground)', FULL, DENSE_STAGE1,
      effect(_score(agg, FULL, 'avg_acc'), _score(agg, DENSE_STAGE1, 'avg_acc')))
  add('2a. adaptive router specialises experts by task', 'I(expert; task), bits, mean of layers',
      FULL, PLAIN, effect(_mi(agg, FULL, 'task'), _mi(agg, PLAIN, 'task')))
  add('2b. ... and by granularity', 'I(expert; granularity), bits, mean of layers',
      FULL, PLAIN, effect(_mi(agg, FULL, 'granularity'), _mi(agg, PLAIN, 'granularity')))
  add('3a. CDA improves local tasks', 'mean accuracy of local questions (vqa, count, ground)',
      FULL, CDA_OFF,
      effect(_score(agg, FULL, 'local_acc'), _score(agg, CDA_OFF, 'local_acc')))
  add('3b. CDA improves counting', 'counting accuracy', FULL, CDA_OFF,
      effect(_score(agg, FULL, 'counting'), _score(agg, CDA_OFF, 'counting')), paper='+0.0947')
  add('3c. CDA improves VQA', 'VQA accuracy', FULL, CDA_OFF,
      effect(_score(agg, FULL, 'vqa'), _score(agg, CDA_OFF, 'vqa')), paper='+0.0656')
  means = [(e, (_score(agg, v, 'avg_acc') or {}).get('mean')) for e, v in EXPERT_VARIANTS]
  means = [(e, m) for e, m in means if m is not None]
  order = ', '.join(f'{e} experts {m:.3f}' for e, m in means)

  def ordering(row):
    if len(means) < 2 or row['effect'] is None:
      return ''
    monotone = all(m1 <= m2 for (_, m1), (_, m2) in zip(means, means[1:]))
    return f'; means by experts {"monotone" if monotone else "not monotone"} ({order})'
  add('3d. more experts are better (8 > 4 > 2 > 1)', 'mean accuracy', 'MoE-8 (full)', 'MoE-1',
      effect(_score(agg, FULL, 'avg_acc'), _score(agg, 'MoE-1', 'avg_acc')),
      paper='8 > 6 > 4 > 1', extra=ordering)
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


def markdown(agg: Dict, rows: List[Dict], runs: List[Dict], order: List[str], meta: Dict) -> str:
  names = ordered_variants(agg, order)
  cols = score_columns(agg)
  lines = [
      '# SkyMoE ablations at demo scale',
      '',
      f'{meta["runs"]} runs under `{meta["root"]}` (stage II: {meta["steps"]} steps each, '
      f'upcycled from `{meta["stage1"]}`); evaluation on the first {meta["eval"]} held-out '
      'synthetic scenes (questions per task: ' + (', '.join(
          f'{SHORT.get(t, t)} {"/".join(map(str, n))}' for t, n in meta.get('questions', {}).items())
          or '-') + '). Cells: mean ± std over seeds (n = seeds; no ± with one seed). '
      'Generated by `benchmarks/ablation_report.py`.',
      '',
      '## Per variant',
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
  unevaluated = [r['run'] for r in runs if not r['evaluated']]
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
            '| claim | measure | comparison | effect | spread | n seeds | paper | verdict |',
            '|---|---|---|---|---|---|---|---|']
  for r in rows:
    digits = 4 if 'bits' in r['measure'] else 3
    spread = '-' if r['spread'] is None else f'{r["spread"]:.{digits}f} ({r["spread_kind"]})'
    if r['spread'] is None and r['spread_kind']:
      spread = r['spread_kind']
    lines.append(f'| {r["claim"]} | {r["measure"]} | {r["compare"]} | {_signed(r["effect"], digits)} | '
                 f'{spread} | {r["n"][0]} vs {r["n"][1]} | {r["paper"] or "-"} | '
                 f'{r["verdict"]} |')
  lines += ['', 'Verdict: holds if effect > 2 x spread, does not hold if effect < -2 x spread, '
            'otherwise inconclusive; without a spread, inconclusive. The binomial SE counts '
            'only the evaluation sample (one seed), not training noise. I(e;task): mutual '
            'information of expert choice and task from routing.json counts (routed x load). '
            'answers ≠ full: share of evaluation questions whose answer differs from the full '
            'model\'s run of the same seed.',
            '']
  return '\n'.join(lines)


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


def report(root, out, config=None) -> Dict:
  root, out = pathlib.Path(root), pathlib.Path(out)
  module = load_variants(config)
  order = list(module.VARIANTS) if module else []
  runs = load_runs(root, module)
  changed_answers(runs)
  agg = aggregate(runs)
  rows = claims(agg)
  evaluated = [r for r in runs if r['evaluated']]
  inits = sorted({r['init_from'] for r in runs if r.get('init_from')})
  sizes = {}
  for r in evaluated:
    for col, cell in r['scores'].items():
      if col in HEADLINE:
        sizes.setdefault(col, set()).add(cell['n'])
  meta = {'root': str(root), 'runs': len(runs),
          'steps': ', '.join(sorted({str(r.get('total_steps')) for r in evaluated})) or '-',
          'stage1': ', '.join(inits) or '-',
          'eval': ', '.join(sorted({str(r.get('eval_samples')) for r in evaluated})) or '-',
          'questions': {t: sorted(n) for t, n in sizes.items()}}
  out.mkdir(parents=True, exist_ok=True)
  text = markdown(agg, rows, runs, order, meta)
  (out / 'ablations.md').write_text(text)
  plotted = plot_mi(agg, order, out / 'routing_mi.png')
  for r in runs:
    r.pop('_answers', None)
  (out / 'ablations.json').write_text(json.dumps(
      {'meta': meta, 'runs': runs, 'variants': agg, 'claims': rows}, indent=1) + '\n')
  return {'markdown': text, 'plot': plotted, 'runs': runs, 'variants': agg, 'claims': rows}


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
