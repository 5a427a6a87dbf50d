"""The one-process step before a job: generated data, the workdir's tokenizer, provenance.json.

The command lines, options and behaviour are documented in skymoe_jax/jobs/prepare.py, the code
this script runs (`python launch/prepare.py --help` lists the flags).
"""
import sys

from skymoe_jax import cli
from skymoe_jax.jobs import prepare

if __name__ == '__main__':
  cli.quiet_library_logs()  # the process's logging: the entry point's choice, not the library's
  sys.exit(prepare.main())
