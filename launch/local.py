"""This machine: one training process, or N CPU processes joined like the hosts of a pod.

The command lines, options and behaviour are documented in skymoe_jax/jobs/local.py, the code
this script runs (`python launch/local.py --help` lists the flags).
"""
import sys

from skymoe_jax.jobs import local

if __name__ == '__main__':
  sys.exit(local.main())
