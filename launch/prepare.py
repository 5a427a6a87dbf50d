"""The one-process step before a job: generated data, the workdir's tokenizer, provenance.json.

  python launch/prepare.py --config=FILE[:ARG] --workdir=DIR [--swept=f1,f2] [--config.F=V ...]

The code is skymoe_jax/jobs/prepare.py.
"""
import sys

from skymoe_jax import cli
from skymoe_jax.jobs import prepare

if __name__ == '__main__':
  cli.quiet_library_logs()  # the process's logging: the entry point's choice, not the library's
  sys.exit(prepare.main())
