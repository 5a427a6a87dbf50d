"""Config-driven sweeps: every run of a config file's get_sweep(), here or on a cluster.

  python launch/sweep.py --config=configs/tiny.py --workdir_root=/tmp/sweep --local \
      [--config.train.total_steps=4 ...]
  python launch/sweep.py --config=configs/my_pod.py:stage1 --workdir_root=gs://my-bucket/lr \
      --target=tpu --dry_run --tpu=my-pod --zone=us-east5-a --accelerator_type=v5p-128
  python launch/sweep.py --config=... --workdir_root=gs://my-bucket/lr --target=slurm --nodes=2
  python launch/sweep.py --summarize --workdir_root=/tmp/sweep

A config file may define, next to get_config(arg),

  from skymoe_jax.jobs.grid import product, zip_   # at the file's top: standard library only

  def get_sweep(arg=None):
    return product({'optimizer.learning_rate': [1e-3, 3e-4]}, seed=[0, 1])

a list of override dicts (field -> value), one per run; arg is the config's ':arg', as for
get_config. Run i trains the config with its overrides in WORKDIR_ROOT/<name>, the name made of
the overrides ('optimizer.learning_rate=0.001,seed=0', common.run_name), with its
provenance.json (launch/prepare.py). --config.FIELD=VALUE given here apply to every run; a field
may not be both given here and swept. A run dict may also hold the key 'config_arg' (CONFIG_ARG),
e.g. {'config_arg': 'stage1', 'seed': 0}: that run reads the config file with this argument
instead of the sweep's (it is part of the run's name, 'config_arg=stage1,seed=0', not an
override), so one sweep can hold a stage I and the stage-II runs that start from it.

A run whose train.init_from is another run's workdir of the sweep depends on it: get_sweep() must
list it after that run; --local does not start it when that run failed, and --target=slurm (or
--detach) holds it back until that run is finished (rerun the sweep then: finished runs are
skipped).

--local (or --target=local) trains the runs one after another, each in a subprocess running the
same command a cluster would (a crash ends that run, not the sweep; its output goes to
WORKDIR/train.log). They share a persistent XLA compilation cache (WORKDIR_ROOT/.jax_cache), so
runs that differ only in what the compiled step takes as inputs (seeds, data) compile once.
A finished run (its last checkpoint at train.total_steps) is skipped; an unfinished one resumes.
--target=tpu|slurm hands each run to launch/tpu_pod.py or launch/slurm.py, whose flags follow.
--summarize prints one table of every run under the root (its swept fields and the last line
of its metrics.jsonl) and writes all of it to WORKDIR_ROOT/summary.csv.
"""
import argparse
import csv
import io
import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

import jax

from skymoe_jax import config as config_lib
from skymoe_jax import storage
from skymoe_jax import workdir as workdir_lib
from skymoe_jax.jobs import common
from skymoe_jax.jobs import prepare
from skymoe_jax.jobs import slurm
from skymoe_jax.jobs import tpu_pod

CACHE_DIR = '.jax_cache'
SUMMARY_CSV = 'summary.csv'
TABLE_METRICS = ('loss', 'ce_loss', 'load_balance_loss', 'router_z_loss', 'grad_norm',
                 'steps_per_s')
LAUNCHERS = {'tpu': tpu_pod, 'slurm': slurm}   # --target -> the launcher a run is handed to
CONFIG_ARG = 'config_arg'   # a run dict's key: the config file's argument for that run alone


# -- a run's state on disk ----------------------------------------------------------------------

def checkpoint_steps(workdir) -> List[int]:
  """Steps of the committed checkpoints (orbax renames a step's folder to its number when the
  save is complete, so a half-written one never counts)."""
  folder = workdir_lib.checkpoint_dir(workdir)
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def is_finished(workdir, total_steps: int) -> bool:
  """The run has its checkpoint at total_steps (or beyond: rerunning it would do nothing)."""
  steps = checkpoint_steps(workdir)
  return bool(steps) and steps[-1] >= total_steps


def last_metrics(workdir) -> Optional[Dict]:
  """The last line of the workdir's metrics.jsonl (the last logged step), or None."""
  path = workdir_lib.resolve(workdir) / workdir_lib.METRICS_FILE
  if not path.exists():
    return None
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  return json.loads(lines[-1]) if lines else None


# -- expanding a sweep --------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
  name: str
  swept: Dict          # this run's own overrides
  job: common.Job      # every override: the command line's, then the run's
  after: Optional[str] = None   # the run of the sweep it starts from (train.init_from)


def expand(config: str, workdir_root: str, sweep: List[Dict], base_overrides: Dict) -> List[Run]:
  runs, names = [], {}
  path, _, _ = config.partition(':')
  for entry in sweep:
    swept = {k: v for k, v in entry.items() if k != CONFIG_ARG}
    both = sorted(set(swept) & set(base_overrides))
    if both:
      raise SystemExit(f'{", ".join(both)}: given on the command line and swept by get_sweep()')
    name = common.run_name(entry)
    if name in names:
      raise SystemExit(f'get_sweep() has the run {entry} twice')
    names[name] = entry
    workdir = str(storage.path(workdir_root) / name)  # gs://bucket/sweep/<name> too
    run_config = f'{path}:{entry[CONFIG_ARG]}' if CONFIG_ARG in entry else config
    job = common.Job(run_config, workdir, {**base_overrides, **swept}, tuple(swept))
    runs.append(Run(name, swept, job))
  return runs


def link_dependencies(runs: List[Run]) -> List[Run]:
  """Sets run.after: the earlier run of the sweep whose workdir its train.init_from names (a
  sibling name or the full path). A run listed before the run it starts from is an error."""
  index = {str(workdir_lib.resolve(r.job.workdir)): i for i, r in enumerate(runs)}
  for i, run in enumerate(runs):
    config = config_lib.load(run.job.config, run.job.overrides)
    if not config.train.get('init_from'):
      continue
    j = index.get(str(workdir_lib.init_workdir(config, run.job.workdir)))
    if j is None:
      continue  # a workdir outside the sweep (trained before)
    if j >= i:
      raise SystemExit(f'get_sweep() lists the run {run.name} before {runs[j].name}, which its '
                       f'train.init_from={config.train.init_from!r} starts from')
    run.after = runs[j].name
  return runs


# -- running it ---------------------------------------------------------------------------------

def local_env(workdir_root, cache: str = CACHE_DIR) -> Dict[str, str]:
  """The environment added for local runs: the shared compilation cache (a user's own
  JAX_COMPILATION_CACHE_DIR wins)."""
  if not cache or os.environ.get('JAX_COMPILATION_CACHE_DIR'):
    return {}
  return {'JAX_COMPILATION_CACHE_DIR': str(storage.path(workdir_root) / cache)}


def _finished(run: Run) -> bool:
  config = config_lib.load(run.job.config, run.job.overrides)
  return is_finished(run.job.workdir, config.train.total_steps)


def run_local(runs: List[Run], env: Dict, dry_run: bool = False,
              python: str = sys.executable) -> Dict[str, str]:
  """Trains the runs one after another; {name: 'skipped' | 'done' | 'failed (exit N)'}."""
  status = {}
  prepare_script = str(common.REPO / common.PREPARE_SCRIPT)
  for i, run in enumerate(runs):
    head = f'[{i + 1}/{len(runs)}] {run.name}'
    if _finished(run):
      status[run.name] = 'skipped'
      print(f'# {head}: finished, skipped' if dry_run else f'{head}: finished, skipped',
            flush=True)
      continue
    if run.after and status.get(run.after, '').startswith('failed'):
      status[run.name] = f'failed (not started: {run.after} failed)'
      print(f'{head}: not started, {run.after} (its train.init_from) failed', flush=True)
      continue
    train = common.train_argv(run.job, python)
    if dry_run:
      print(common.render([
          common.Command(common.prepare_argv(run.job, python, prepare_script), comment=head),
          common.Command(train, env)]))
      continue
    start = time.perf_counter()
    prepare.prepare(run.job)  # in this process: what launch/prepare.py does
    log = common.local_dir(run.job.workdir) / 'train.log'  # a redirect: a local file
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f'{head}: training (log: {log})', flush=True)
    with open(log, 'a') as f:
      code = subprocess.run(train, env={**os.environ, **env}, stdout=f,
                            stderr=subprocess.STDOUT).returncode
    status[run.name] = 'done' if code == 0 else f'failed (exit {code})'
    last = last_metrics(run.job.workdir) or {}
    print(f'{head}: {status[run.name]} in {time.perf_counter() - start:.0f} s, step '
          f'{last.get("step")}, loss {last.get("loss")}', flush=True)
  return status


def run_remote(runs: List[Run], target: str, argv: List[str], dry_run: bool) -> int:
  """Each run through launch/tpu_pod.py or launch/slurm.py, with the flags left in argv."""
  launcher = LAUNCHERS[target]
  parser = argparse.ArgumentParser(prog=f'sweep.py --target={target}')
  launcher.add_args(parser)
  args = parser.parse_args(argv)
  if target == 'tpu' and args.detach and not args.xpk_cluster:
    raise SystemExit('--detach would start every run of the sweep on the same slice at once')
  if target == 'tpu' and args.workload:
    raise SystemExit('leave --workload out of a sweep: each run gets its own (from its workdir)')
  # Submitted jobs run on their own: a run that starts from another of the sweep must wait for it.
  queued = target == 'slurm' or getattr(args, 'detach', False)
  by_name = {r.name: r for r in runs}
  held = []
  for i, run in enumerate(runs):
    head = f'[{i + 1}/{len(runs)}] {run.name}'
    if _finished(run):  # only where the workdir is visible here (a shared filesystem)
      print(f'# {head}: finished, skipped', flush=True)
      continue
    if queued and run.after and not _finished(by_name[run.after]):
      print(f'# {head}: held back until {run.after} (its train.init_from) is finished',
            flush=True)
      held.append(run.name)
      continue
    print(f'# {head}', flush=True)
    code = common.run_plan(launcher.plan(args, run.job), dry_run)
    if code:
      return code
    if target == 'tpu':  # the slice is created and set up once, by the first run
      args.create = args.setup = False
  if held:
    print(f'# {len(held)} runs held back: run this sweep again once the runs they start from '
          'are finished', flush=True)
  return 0


# -- the summary --------------------------------------------------------------------------------

def summarize(workdir_root) -> List[Dict]:
  """One row per run under the root: name, swept fields, progress, last metrics, provenance."""
  rows = []
  for workdir in sorted(p for p in storage.path(workdir_root).iterdir() if p.is_dir()):
    prov = common.read_json(workdir / common.PROVENANCE_FILE)
    metrics = last_metrics(workdir)
    if prov is None and metrics is None:
      continue  # not a run (e.g. the compilation cache)
    prov = prov or {}
    total = prov.get('total_steps')
    if total is None and (workdir / workdir_lib.CONFIG_FILE).exists():
      total = workdir_lib.read_config(workdir).train.total_steps
    row = {'run': workdir.name}
    row.update({f: prov['overrides'].get(f) for f in prov.get('swept', ())})
    row['step'] = metrics.get('step') if metrics else None
    row['status'] = ('finished' if total is not None and is_finished(workdir, total)
                     else 'unfinished')
    for key, value in (metrics or {}).items():
      if key != 'step' and isinstance(value, (int, float)):
        row[key] = value
    row['config_hash'] = (prov.get('config_hash') or '')[:12]
    row['git_commit'] = ((prov.get('git') or {}).get('commit') or '')[:12]
    row['_swept'] = list(prov.get('swept', ()))
    row['_arg'] = str(prov.get('config') or '').partition(':')[2]
    rows.append(row)
  if len({r['_arg'] for r in rows}) > 1:  # runs with their own config argument: a column
    for r in rows:
      r[CONFIG_ARG] = r['_arg']
      r['_swept'].insert(0, CONFIG_ARG)
  for r in rows:
    del r['_arg']
  return rows


def _cell(value) -> str:
  if value is None:
    return ''
  if isinstance(value, float):
    return f'{value:.5g}'
  return str(value)


def table(rows: List[Dict], metrics=TABLE_METRICS) -> str:
  """Swept fields, step, status and the chosen metrics, aligned in columns."""
  swept = list(dict.fromkeys(f for r in rows for f in r['_swept']))
  shown = [m for m in metrics if any(m in r for r in rows)]
  columns = swept + ['step', 'status'] + shown
  cells = [columns] + [[_cell(r.get(c)) for c in columns] for r in rows]
  widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
  return '\n'.join('  '.join(v.ljust(w) for v, w in zip(line, widths)).rstrip()
                   for line in cells)


def write_csv(rows: List[Dict], path) -> None:
  columns = list(dict.fromkeys(k for r in rows for k in r if k != '_swept'))
  text = io.StringIO(newline='')   # csv writes its own \r\n line ends
  writer = csv.DictWriter(text, columns)
  writer.writeheader()
  for r in rows:
    writer.writerow({k: r.get(k, '') for k in columns})
  storage.write_text_atomically(path, text.getvalue())


# -- command line -------------------------------------------------------------------------------

def main(argv=None) -> int:
  # No abbreviations: the target launcher's flags pass through (--tpu must not become --target).
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0], allow_abbrev=False)
  parser.add_argument('--workdir_root', required=True, help='One workdir per run, under this.')
  parser.add_argument('--config', help='Config file with get_sweep(), path[:arg].')
  parser.add_argument('--summarize', action='store_true', help='Print the table of the runs.')
  parser.add_argument('--local', action='store_true', help='Same as --target=local.')
  parser.add_argument('--target', choices=('local', 'tpu', 'slurm'), default='local')
  parser.add_argument('--dry_run', action='store_true', help='Print the commands only.')
  parser.add_argument('--compilation_cache', default=CACHE_DIR,
                      help='Local runs: XLA cache folder under the root; "" = none.')
  # This process prepares runs (data, tokenizer) and needs no accelerator; were it to open the
  # TPU, the runs it starts could not. Set in jax (read when a backend first starts), not
  # JAX_PLATFORMS: the runs inherit the environment and pick their own platform.
  jax.config.update('jax_platforms', 'cpu')
  overrides, rest = common.split_override_args(sys.argv[1:] if argv is None else argv)
  args, target_argv = parser.parse_known_args(rest)
  root = storage.path(args.workdir_root)  # a folder, or gs://bucket/sweep

  if args.summarize:
    if not root.is_dir():
      raise SystemExit(f'--workdir_root={root}: no such folder')
    rows = summarize(root)
    print(table(rows))
    write_csv(rows, root / SUMMARY_CSV)
    print(f'{len(rows)} runs; all columns in {root / SUMMARY_CSV}')
    return 0
  if not args.config:
    parser.error('--config is required unless --summarize')
  target = 'local' if args.local else args.target
  if target == 'local' and target_argv:
    parser.error(f'unrecognized arguments: {" ".join(target_argv)}')
  if target != 'tpu' and not storage.is_remote(root):  # a path on this machine (or shared)
    root = root.absolute()
  try:
    grid = config_lib.load_sweep(args.config)
  except config_lib.ConfigError as e:
    raise SystemExit(str(e)) from None
  runs = link_dependencies(expand(args.config, str(root), grid, overrides))
  print(f'# {len(runs)} runs of {args.config} under {root}', flush=True)
  if target != 'local':
    return run_remote(runs, target, target_argv, args.dry_run)
  status = run_local(runs, local_env(root, args.compilation_cache), args.dry_run)
  failed = [name for name, s in status.items() if s.startswith('failed')]
  if failed:
    print(f'{len(failed)} runs failed: {", ".join(failed)}', file=sys.stderr)
  return 1 if failed else 0

