"""Config-driven sweeps: every run of a config file's get_sweep(), here or on a cluster.

The command lines, options and behaviour are documented in skymoe_jax/jobs/sweep.py, the code
this script runs (`python launch/sweep.py --help` lists the flags).
"""
import sys

from skymoe_jax.jobs import sweep

if __name__ == '__main__':
  sys.exit(sweep.main())
