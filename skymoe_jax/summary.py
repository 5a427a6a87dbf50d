"""python -m skymoe_jax.summary --config=FILE[:ARG] [--config.FIELD=VALUE ...]

Prints one JSON object describing a config's model: parameter counts total, active per token,
per part (model/flops.py). Nothing is allocated, so even the 22B model takes seconds.
"""
import json

from absl import flags

from skymoe_jax import cli
from skymoe_jax.model import flops


def define_flags():
  cli.define_config_flag()


def main(argv):
  cli.check_no_arguments(argv)
  print(json.dumps(flops.count_params(flags.FLAGS.config)))


if __name__ == '__main__':
  cli.run(main, define_flags)
