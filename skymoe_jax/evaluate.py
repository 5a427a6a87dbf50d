"""python -m skymoe_jax.evaluate --config=FILE[:ARG] --workdir=DIR [--step=N] [--config.FIELD=VALUE]

Evaluates the workdir's latest (or --step) checkpoint on the eval split of the config's data
sources and writes DIR/eval/<step>/{metrics.json, answers.jsonl, settings.json, routing.json,
routing.png} (evaluation/runner.py). A rerun skips the questions already answered with the same
generation settings; answers made with other settings are moved aside, never reused.
"""
from absl import flags

from skymoe_jax import cli
from skymoe_jax.data import sources
from skymoe_jax.evaluation import runner


def define_flags():
  cli.define_config_flag()
  cli.define_workdir_flag('The training workdir (checkpoints/, tokenizer.model).')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')


def main(argv):
  cli.check_no_arguments(argv)
  cli.quiet_library_logs()
  config = flags.FLAGS.config
  sources.resolve_sources(config)
  report = runner.evaluate(config, flags.FLAGS.workdir, flags.FLAGS.step)
  print(runner.table(report))
  print(f'written to {report["dir"]}')


if __name__ == '__main__':
  cli.run(main, define_flags)
