"""python -m skymoe_jax.train --config=FILE[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]

Trains one stage in DIR (training/loop.py); rerunning resumes. With train.eval_every set, the
evaluation runner scores the checkpoint every that many steps.
"""
import json

from absl import flags

from skymoe_jax import cli
from skymoe_jax.evaluation import runner
from skymoe_jax.training import loop


def define_flags():
  cli.define_config_flag()
  cli.define_workdir_flag('Checkpoints, metrics and the tokenizer of this run.')


def main(argv):
  cli.check_no_arguments(argv)
  cli.quiet_library_logs()
  summary = loop.train(flags.FLAGS.config, flags.FLAGS.workdir, evaluate=runner.evaluate)
  print(json.dumps(summary))


if __name__ == '__main__':
  cli.run(main, define_flags)
