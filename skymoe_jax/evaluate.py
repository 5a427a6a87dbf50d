"""python -m skymoe_jax.evaluate --config=configs/<name>.py[:stage] --workdir=DIR [--step=N]

Evaluates the workdir's latest (or --step) checkpoint on the eval split of the config's data
sources and writes DIR/eval/<step>/{metrics.json, answers.jsonl, routing.json, routing.png}
(evaluation/runner.py). A rerun skips the questions already answered.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from skymoe_jax.evaluation import runner
from skymoe_jax.train import trainer


def define_flags():
  """Only when run as a program: other entry points define --config too."""
  config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                  lock_config=False)
  flags.DEFINE_string('workdir', None, 'The training workdir (checkpoints/, tokenizer.model).')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  trainer.quiet_library_logs()
  config = flags.FLAGS.config
  trainer.resolve_sources(config)
  report = runner.evaluate(config, flags.FLAGS.workdir, flags.FLAGS.step)
  print(runner.table(report))
  print(f'written to {report["dir"]}')


if __name__ == '__main__':
  define_flags()
  app.run(main)
