"""A SLURM GPU cluster: one sbatch script; srun starts the trainer once per task.

  python launch/slurm.py --nodes=2 --gpus_per_node=8 [--partition=P --time=24:00:00] \
      --config=configs/my_cluster.py:stage1 --workdir=gs://my-bucket/runs/stage1 [--dry_run] \
      [--config.F=V ...]

Writes LOGS/slurm/train.sbatch and submits it with sbatch (--dry_run prints both as a shell
snippet). The script, on the job's first node:
  SKYMOE_COORDINATOR    the first host of $SLURM_JOB_NODELIST (scontrol show hostnames), with
                        a port from the job id so that jobs sharing a node do not collide
  SKYMOE_NUM_PROCESSES  $SLURM_NTASKS
  srun --ntasks=1       launch/prepare.py: data, tokenizer, provenance.json, once
  srun                  one task per process, each exporting SKYMOE_PROCESS_ID=$SLURM_PROCID

Process layout (--processes=node|gpu):
  node (default)  one process per node that drives all the node's GPUs (jax's usual multi-GPU
                  set-up; fewer processes, intra-node collectives stay inside one process).
  gpu             one process per GPU: --ntasks-per-node=GPUS and CUDA_VISIBLE_DEVICES=
                  $SLURM_LOCALID in each task, for clusters that bind one task to one GPU.
The repository and its .venv (pip install -e ".[gpu]") must be on a filesystem the nodes share;
the workdir and the data may be a bucket (gs://...) or a shared folder. LOGS (the sbatch script
and SLURM's output, local files by nature) is --log_dir, default the workdir, or for a gs://
workdir ~/skymoe_logs/BUCKET/PATH (a home directory the nodes share).
"""
import argparse
import shlex

from skymoe_jax.jobs import common

PORT_BASE, PORT_RANGE = 20000, 20000


def add_args(parser):
  g = parser.add_argument_group('SLURM')
  g.add_argument('--nodes', type=int, required=True)
  g.add_argument('--gpus_per_node', type=int, default=8)
  g.add_argument('--processes', choices=('node', 'gpu'), default='node',
                 help='One process per node (all its GPUs) or one per GPU.')
  g.add_argument('--cpus_per_task', type=int, default=0, help='0 = the cluster default.')
  g.add_argument('--partition', default='')
  g.add_argument('--account', default='')
  g.add_argument('--time', default='', help='Time limit, e.g. 24:00:00.')
  g.add_argument('--job_name', default='skymoe')
  g.add_argument('--sbatch_arg', action='append', default=[],
                 help='Extra #SBATCH line, e.g. --sbatch_arg=--exclusive (repeatable).')
  g.add_argument('--repo_dir', default=str(common.REPO), help='The checkout on the shared FS.')
  g.add_argument('--python', default='.venv/bin/python', help='Relative to --repo_dir or absolute.')
  g.add_argument('--no_prepare', action='store_true', help='Skip launch/prepare.py.')
  g.add_argument('--log_dir', default='', help='Shared local folder for the sbatch script and '
                 'its output; default the workdir, or ~/skymoe_logs/BUCKET/PATH for gs://.')


def tasks_per_node(args) -> int:
  return args.gpus_per_node if args.processes == 'gpu' else 1


def sbatch_script(args, job: common.Job) -> str:
  per_node = tasks_per_node(args)
  workdir = common.local_dir(job.workdir, args.log_dir)
  directives = [f'--job-name={args.job_name}', f'--nodes={args.nodes}',
                f'--ntasks-per-node={per_node}', f'--gpus-per-node={args.gpus_per_node}',
                f'--output={workdir / "slurm" / "%j.out"}']
  directives += [f'--cpus-per-task={args.cpus_per_task}'] if args.cpus_per_task else []
  directives += [f'--{k}={v}' for k, v in (('partition', args.partition),
                                            ('account', args.account), ('time', args.time)) if v]
  directives += args.sbatch_arg
  task_env = 'export SKYMOE_PROCESS_ID=$SLURM_PROCID'
  if args.processes == 'gpu':
    task_env += '; export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID'
  train = common.shell_line(common.train_argv(job, args.python))
  lines = ['#!/bin/bash', *[f'#SBATCH {d}' for d in directives], '',
           f'# {args.nodes} nodes x {per_node} task(s) per node = {args.nodes * per_node} '
           f'processes, one per {args.processes}.',
           'set -euo pipefail', f'cd {shlex.quote(args.repo_dir)}', '',
           '# Process 0 runs on the first node; the port comes from the job id so that jobs',
           '# sharing a node do not collide. (An array, not `| head -n 1`: under pipefail',
           '# scontrol may die of SIGPIPE when head stops reading, and end the job.)',
           'nodes=($(scontrol show hostnames "$SLURM_JOB_NODELIST"))',
           f'export {common.ENV_COORDINATOR}="${{nodes[0]}}:$(({PORT_BASE} + SLURM_JOB_ID % '
           f'{PORT_RANGE}))"',
           f'export {common.ENV_NUM_PROCESSES}=$SLURM_NTASKS', '']
  if not args.no_prepare:
    prepare = common.shell_line(common.prepare_argv(job, args.python))
    lines += ['# Once, before the processes start: data, tokenizer, provenance.json.',
              f"srun --nodes=1 --ntasks=1 {prepare}", '']
  lines += ['# Every task: its process id from SLURM, then the same train command.',
            f'srun --kill-on-bad-exit=1 bash -c {shlex.quote(f"{task_env}; exec {train}")}', '']
  return '\n'.join(lines)


def plan(args, job: common.Job):
  path = str(common.local_dir(job.workdir, args.log_dir) / 'slurm' / 'train.sbatch')
  return [common.WriteFile(path, sbatch_script(args, job)),
          common.Command(['sbatch', path], comment='submit')]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  common.add_job_args(parser)
  add_args(parser)
  args, overrides = common.parse_args(parser, argv)
  workdir = common.workdir_arg(args.workdir)  # may be gs://bucket/run
  return common.run_plan(plan(args, common.Job(args.config, workdir, overrides)), args.dry_run)

