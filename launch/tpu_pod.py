"""A Cloud TPU VM pod slice (gcloud) or a GKE TPU cluster (xpk): the trainer on every host.

The command lines, options and behaviour are documented in skymoe_jax/jobs/tpu_pod.py, the code
this script runs (`python launch/tpu_pod.py --help` lists the flags).
"""
import sys

from skymoe_jax.jobs import tpu_pod

if __name__ == '__main__':
  sys.exit(tpu_pod.main())
