"""A SLURM GPU cluster: one sbatch script; srun starts the trainer once per task.

The command lines, options and behaviour are documented in skymoe_jax/jobs/slurm.py, the code
this script runs (`python launch/slurm.py --help` lists the flags).
"""
import sys

from skymoe_jax.jobs import slurm

if __name__ == '__main__':
  sys.exit(slurm.main())
