"""The two-stage recipe end to end: stage I, stage II upcycled from it, evaluation, a table.

  python -m skymoe_jax.recipe --config=configs/demo.py --workdir=/tmp/skymoe_demo

loads the config file twice (`:stage1` and `:stage2`), trains WORKDIR/stage1 then WORKDIR/stage2
(each resumable: rerunning continues where it stopped), evaluates stage II's last checkpoint on
the eval split, and prints the per-task table next to a best-constant-answer baseline. `--set`
overrides a field of both stages, e.g. `--set=train.total_steps=50`.
"""
import ast
import collections
import json
import pathlib
import time

from absl import app
from absl import flags

from skymoe_jax import config_defaults
from skymoe_jax.evaluation import runner
from skymoe_jax.train import trainer

# Tasks scored by exact answer match, where a constant answer is a meaningful chance level.
EXACT_MATCH_TASKS = ('scene_classification', 'vqa', 'counting')



def define_flags():
  """Only when run as a program: other entry points define --config too."""
  flags.DEFINE_string('config', None, 'Config file with stage1 and stage2 variants.')
  flags.DEFINE_string('workdir', None, 'Parent folder of the stage1 and stage2 workdirs.')
  flags.DEFINE_multi_string('set', [], 'field=value overrides applied to both stages.')
  flags.mark_flags_as_required(['config', 'workdir'])


def stage_config(path: str, stage: str, overrides=()):
  config = config_defaults.load_config_file(path, stage)
  for item in overrides:
    field, _, value = item.partition('=')
    node = config
    *parents, leaf = field.split('.')
    for p in parents:
      node = node[p]
    try:
      node[leaf] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      node[leaf] = value  # a plain string
  return config


def constant_baseline(answers_file: pathlib.Path) -> dict:
  """Accuracy of always giving each task's most frequent reference answer (a chance level)."""
  by_task = collections.defaultdict(list)
  for line in answers_file.read_text().splitlines():
    row = json.loads(line)
    if row['task'] in EXACT_MATCH_TASKS:
      by_task[row['task']].append(row['references'][0].strip().lower())
  return {task: collections.Counter(refs).most_common(1)[0][1] / len(refs)
          for task, refs in by_task.items()}


def run(path: str, workdir, overrides=()) -> dict:
  workdir = pathlib.Path(workdir).expanduser().resolve()
  times = {}
  for stage in config_defaults.STAGES:
    start = time.perf_counter()
    trainer.train(stage_config(path, stage, overrides), workdir / stage)
    times[stage] = time.perf_counter() - start
  start = time.perf_counter()
  config = stage_config(path, 'stage2', overrides)
  trainer.resolve_sources(config)
  report = runner.evaluate(config, workdir / 'stage2')
  times['evaluation'] = time.perf_counter() - start
  baseline = constant_baseline(pathlib.Path(report['dir']) / 'answers.jsonl')
  return {'report': report, 'baseline': baseline, 'seconds': times}


def main(argv):
  del argv
  trainer.quiet_library_logs()
  f = flags.FLAGS
  result = run(f.config, f.workdir, f.set)
  print(runner.table(result['report']))
  print('best constant answer (accuracy): ' + ', '.join(
      f'{task} {acc:.3f}' for task, acc in sorted(result['baseline'].items())))
  print('seconds: ' + ', '.join(f'{k} {v:.0f}' for k, v in result['seconds'].items()))
  print(f'evaluation files: {result["report"]["dir"]}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
