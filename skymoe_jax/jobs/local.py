"""This machine: one training process, or N CPU processes joined like the hosts of a pod.

  python launch/local.py --config=configs/demo.py --workdir=/tmp/demo [--config.F=V ...]
  python launch/local.py --num_processes=2 --devices_per_process=4 \
      --config=configs/tiny.py --workdir=/tmp/tiny2 [--dry_run]
  python launch/local.py --config=configs/demo.py --workdir=gs://my-bucket/runs/demo

One process runs the trainer as it is (whatever platform jax picks; --devices_per_process forces
that many CPU devices). N > 1 is for testing multi-host code on one machine: every process gets
JAX_PLATFORMS=cpu, its own D forced host devices (XLA_FLAGS), and SKYMOE_COORDINATOR=
127.0.0.1:PORT, SKYMOE_NUM_PROCESSES=N, SKYMOE_PROCESS_ID=i, exactly what a pod or SLURM job
gives each host; CPU collectives go over gloo (parallel/multihost.py). launch/prepare.py runs
first. Each process logs to WORKDIR/logs/process_<i>.log (for a gs:// workdir, whose files
the trainer writes into the bucket itself, to ~/skymoe_logs/BUCKET/PATH/logs/); when one
fails the others are stopped (a lone survivor would wait in a collective until its timeout) and the failing log's tail is
printed. On success the last line printed is process 0's summary JSON.
"""
import argparse
import os
import pathlib
import shlex
import subprocess
import sys
import time

from skymoe_jax.jobs import common

FORCED_DEVICES = '--xla_force_host_platform_device_count'


def process_env(process_id: int, num_processes: int, devices: int, port: int,
                environ=None) -> dict:
  """The variables one local process needs on top of the inherited environment."""
  environ = os.environ if environ is None else environ
  env = {}
  if devices:
    # Drop an inherited forced count (pytest's conftest forces 8): the last flag would win
    # anyway, but one visible value keeps the command honest.
    flags = [f for f in environ.get('XLA_FLAGS', '').split() if not f.startswith(FORCED_DEVICES)]
    env['JAX_PLATFORMS'] = 'cpu'
    env['XLA_FLAGS'] = ' '.join(flags + [f'{FORCED_DEVICES}={devices}'])
  if num_processes > 1:
    env['JAX_PLATFORMS'] = 'cpu'
    env.update({common.ENV_COORDINATOR: f'127.0.0.1:{port}',
                common.ENV_NUM_PROCESSES: str(num_processes),
                common.ENV_PROCESS_ID: str(process_id)})
  else:  # an inherited multi-process setting would make this lone process wait for others
    env.update({name: '' for name in (common.ENV_COORDINATOR, common.ENV_NUM_PROCESSES,
                                      common.ENV_PROCESS_ID) if environ.get(name)})
  return env


def plan(job: common.Job, num_processes: int = 1, devices_per_process: int = 0, port: int = 0,
         python: str = sys.executable, prepare: bool = True):
  """[prepare command] + one train command per process (run concurrently)."""
  if num_processes > 1 and not devices_per_process:
    raise SystemExit('--num_processes > 1 runs CPU processes: give --devices_per_process')
  steps = []
  if prepare:
    steps.append(common.Command(common.prepare_argv(job, python, str(
        common.REPO / common.PREPARE_SCRIPT)), comment='once, before the processes start'))
  for i in range(num_processes):
    steps.append(common.Command(
        common.train_argv(job, python),
        process_env(i, num_processes, devices_per_process, port),
        comment=f'process {i} of {num_processes}' if num_processes > 1 else ''))
  return steps


def log_path(workdir, i: int, log_dir: str = '') -> pathlib.Path:
  """The process's log: under the workdir, or for a gs:// one under common.local_dir."""
  return common.local_dir(workdir, log_dir) / 'logs' / f'process_{i}.log'


def render(steps, workdir, num_processes: int) -> str:
  if num_processes == 1:
    return common.render(steps)
  before = steps[:-num_processes]
  lines = [common.render(before)] if before else []
  lines.append(f'mkdir -p {shlex.quote(str(log_path(workdir, 0).parent))}')
  for i, step in enumerate(steps[-num_processes:]):
    lines.append(f'# {step.comment}')
    lines.append(f'{common.shell_line(step.argv, step.env)} > '
                 f'{shlex.quote(str(log_path(workdir, i)))} 2>&1 &')
  lines.append('wait')
  return '\n'.join(lines)


def run_processes(steps, workdir, timeout_s: float = 0) -> int:
  """Starts the train commands together; waits; stops them all when one fails or time is up."""
  logs, procs = [], []
  for i, step in enumerate(steps):
    path = log_path(workdir, i)
    path.parent.mkdir(parents=True, exist_ok=True)
    logs.append(open(path, 'w'))
    procs.append(subprocess.Popen(step.argv, env={**os.environ, **step.env},
                                  stdout=logs[-1], stderr=subprocess.STDOUT))
  deadline = time.monotonic() + timeout_s if timeout_s else float('inf')
  try:
    while any(p.poll() is None for p in procs):
      if any(p.returncode for p in procs) or time.monotonic() > deadline:
        break
      time.sleep(0.5)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
    for f in logs:
      f.close()
  failed = [i for i, p in enumerate(procs) if p.returncode]
  if failed:
    why = 'timed out' if time.monotonic() > deadline else 'failed'
    for i in failed:
      tail = log_path(workdir, i).read_text()[-3000:]
      print(f'--- process {i} {why} (exit {procs[i].returncode}), '
            f'{log_path(workdir, i)}:\n{tail}', file=sys.stderr)
    return next(procs[i].returncode for i in failed) or 1
  lines = log_path(workdir, 0).read_text().strip().splitlines()
  if lines:
    print(lines[-1])  # the trainer's summary JSON
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  common.add_job_args(parser)
  parser.add_argument('--num_processes', type=int, default=1)
  parser.add_argument('--devices_per_process', type=int, default=0,
                      help='Forced CPU devices per process (needed when num_processes > 1).')
  parser.add_argument('--port', type=int, default=0, help='Coordinator port; 0 = a free one.')
  parser.add_argument('--timeout_s', type=float, default=0, help='0 = no limit.')
  parser.add_argument('--no_prepare', action='store_true', help='Skip launch/prepare.py.')
  args, overrides = common.parse_args(parser, argv)
  workdir = common.workdir_arg(args.workdir)  # may be gs://bucket/run
  job = common.Job(args.config, workdir, overrides)
  port = args.port or (common.free_port() if args.num_processes > 1 else 0)
  steps = plan(job, args.num_processes, args.devices_per_process, port,
               prepare=not args.no_prepare)
  if args.dry_run:
    print(render(steps, workdir, args.num_processes))
    return 0
  if args.num_processes == 1:
    return common.execute(steps)
  code = common.execute(steps[:-args.num_processes])
  return code or run_processes(steps[-args.num_processes:], workdir, args.timeout_s)

