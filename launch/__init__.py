"""Launchers: the same `python -m skymoe_jax.train` on every process of a job, and sweeps.

  common.py    what every launcher shares: the train command, overrides, run names, provenance
  prepare.py   the one-process step before a multi-process job (data, tokenizer, provenance)
  local.py     this machine: one process, or N CPU processes joined like hosts
  tpu_pod.py   a Cloud TPU VM pod slice (gcloud ... ssh --worker=all) or a GKE cluster (xpk)
  slurm.py     a SLURM GPU cluster (one sbatch script, srun per task)
  sweep.py     config-driven sweeps (get_sweep() in a config file) and their summary table
  aot_compile.py  the train step compiled ahead of time for a TPU topology (memory, FLOPs)
  hlo.py       reading the compiled HLO text: computations, instructions, bytes, loop counts

Every launcher takes --dry_run (print the exact commands, run nothing) and passes
--config.FIELD=VALUE overrides through to the trainer unchanged.
"""
