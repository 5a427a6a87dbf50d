"""The two-stage recipe end to end: stage I, stage II upcycled from it, evaluation, a table.

  python -m skymoe_jax.recipe --config=configs/demo.py --workdir=/tmp/skymoe_demo

loads the config file twice (`:stage1` and `:stage2`), trains WORKDIR/stage1 then WORKDIR/stage2
(each resumable: rerunning continues where it stopped), evaluates stage II's last checkpoint on
the eval split, and prints the per-task table next to a best-constant-answer baseline. It
leaves a few held-out scenes in WORKDIR/examples (chat.write_examples), for chat and the demo.
`--config.FIELD=VALUE` overrides a field of both stages, e.g. `--config.train.total_steps=50`.
"""
import time

from absl import flags

from skymoe_jax import cli
from skymoe_jax import config as config_lib
from skymoe_jax import workdir as workdir_lib
from skymoe_jax.data import sources
from skymoe_jax.evaluation import chat, runner
from skymoe_jax.training import loop

def define_flags():
  """Only when run as a program: other entry points define --config too."""
  cli.define_config_flag()
  cli.define_workdir_flag('Parent folder of the stage1 and stage2 workdirs.')


def run(path: str, workdir, overrides=None) -> dict:
  """Both stages of config file `path` (its :stage1 and :stage2) with `overrides`
  ({field: value}) into workdir/stage1 and workdir/stage2, then stage II's evaluation."""
  if ':' in path:
    raise config_lib.ConfigError(f'--config={path!r}: the recipe picks :stage1 and :stage2 itself; '
                                 'give the file alone')
  workdir = workdir_lib.resolve(workdir)
  times = {}
  for stage in config_lib.STAGES:
    start = time.perf_counter()
    loop.train(config_lib.load(f'{path}:{stage}', overrides), workdir / stage,
               evaluate=runner.evaluate)
    times[stage] = time.perf_counter() - start
  start = time.perf_counter()
  config = config_lib.load(f'{path}:stage2', overrides)
  sources.resolve_sources(config)
  report = runner.evaluate(config, workdir / 'stage2')
  times['evaluation'] = time.perf_counter() - start
  baseline = {task: r['baseline'] for task, r in report['tasks'].items() if 'baseline' in r}
  # Read from the eval split after everything is measured: no number above depends on it.
  examples = chat.write_examples(config, workdir / chat.EXAMPLES_DIR)
  return {'report': report, 'baseline': baseline, 'seconds': times, 'examples': str(examples)}


def main(argv):
  cli.check_no_arguments(argv)
  cli.quiet_library_logs()
  result = run(cli.config_file(), flags.FLAGS.workdir, cli.config_overrides())
  print(runner.table(result['report']))
  print('best constant answer (each task\'s headline metric): ' + ', '.join(
      f'{task} {acc:.3f}' for task, acc in sorted(result['baseline'].items())))
  print('seconds: ' + ', '.join(f'{k} {v:.0f}' for k, v in result['seconds'].items()))
  print(f'evaluation files: {result["report"]["dir"]}')
  print(f'example scenes and questions: {result["examples"]}')


if __name__ == '__main__':
  cli.run(main, define_flags)
