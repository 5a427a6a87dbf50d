"""A SLURM GPU cluster: one sbatch script; srun starts the trainer once per task.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 [--partition=P --time=24:00:00] \
      --config=configs/my_cluster.py:stage1 --workdir=/shared/runs/stage1 [--dry_run] \
      [--config.F=V ...]

The code is skymoe_jax/jobs/slurm.py.
"""
import sys

from skymoe_jax.jobs import slurm

if __name__ == '__main__':
  sys.exit(slurm.main())
