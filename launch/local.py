"""This machine: one training process, or N CPU processes joined like the hosts of a pod.

  python launch/local.py --config=configs/demo.py --workdir=/tmp/demo [--config.F=V ...]
  python launch/local.py --num_processes=2 --devices_per_process=4 \
      --config=configs/tiny.py --workdir=/tmp/tiny2 [--dry_run]

The code is skymoe_jax/jobs/local.py.
"""
import sys

from skymoe_jax.jobs import local

if __name__ == '__main__':
  sys.exit(local.main())
