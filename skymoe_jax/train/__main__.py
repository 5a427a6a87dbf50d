"""python -m skymoe_jax.train --config=configs/<name>.py[:stage] --workdir=DIR [--config.k=v]"""
import json

from absl import app
from absl import flags
from ml_collections import config_flags

from skymoe_jax.train import trainer

config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).', lock_config=True)
flags.DEFINE_string('workdir', None, 'Checkpoints, metrics and the tokenizer of this run.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  trainer.quiet_library_logs()
  summary = trainer.train(flags.FLAGS.config, flags.FLAGS.workdir)
  print(json.dumps(summary))


if __name__ == '__main__':
  app.run(main)
