"""Config-driven sweeps: every run of a config file's get_sweep(), here or on a cluster.

  python launch/sweep.py --config=configs/tiny.py --workdir_root=/tmp/sweep --local \
      [--config.train.total_steps=4 ...]
  python launch/sweep.py --config=configs/my_pod.py:stage1 --workdir_root=/mnt/shared/lr \
      --target=tpu --dry_run --tpu=my-pod --zone=us-east5-a --accelerator_type=v5p-128
  python launch/sweep.py --config=... --workdir_root=/shared/lr --target=slurm --nodes=2
  python launch/sweep.py --summarize --workdir_root=/tmp/sweep

The code is skymoe_jax/jobs/sweep.py; config files' get_sweep() use skymoe_jax/jobs/grid.py.
"""
import sys

from skymoe_jax.jobs import sweep

if __name__ == '__main__':
  sys.exit(sweep.main())
