"""Launchers and sweeps, the library behind the launch/ scripts: the same
`python -m skymoe_jax.train` on every process of a job.

  common.py    what every launcher shares: the job, its command lines, run names, plans
  prepare.py   the one-process step before a multi-process job (data, tokenizer, provenance)
  local.py     this machine: one process, or N CPU processes joined like hosts
  tpu_pod.py   a Cloud TPU VM pod slice (gcloud ... ssh --worker=all) or a GKE cluster (xpk)
  slurm.py     a SLURM GPU cluster (one sbatch script, srun per task)
  sweep.py     config-driven sweeps (get_sweep() in a config file) and their summary table
  grid.py      product and zip_, the sweep helpers config files use (standard library only)

Each launcher has main(argv) (launch/<name>.py runs it), takes --dry_run (print the exact
commands, run nothing) and passes --config.FIELD=VALUE overrides through to the trainer
unchanged.
"""
