"""A Cloud TPU VM pod slice (gcloud) or a GKE TPU cluster (xpk): the trainer on every host.

  python launch/tpu_pod.py --tpu=my-pod --zone=us-east5-a --accelerator_type=v5p-128 \
      --setup --repo_url=https://github.com/ORG/skymoe_jax.git \
      --config=configs/my_pod.py:stage1 --workdir=gs://my-bucket/runs/stage1 \
      [--config.mesh.fsdp=8 ...] [--dry_run]
  python launch/tpu_pod.py --xpk_cluster=my-cluster --zone=us-east5 --accelerator_type=v5p-128 \
      --num_slices=2 --docker_image=gcr.io/PROJECT/skymoe:latest --config=... \
      --workdir=gs://my-bucket/runs/7b

TPU VM (gcloud compute tpus tpu-vm ssh NAME --worker=...):
  [--create]  create the slice (gcloud compute tpus tpu-vm create)
  [--setup]   on every worker: Python, clone --repo_url at --git_ref (default: this checkout's
              commit), a venv, pip install -e ".[tpu]"
  prepare     on worker 0: launch/prepare.py (data, tokenizer, provenance.json)
  train       on every worker (--worker=all): python -m skymoe_jax.train, the same command
One process per host, each driving its host's chips. jax finds the coordinator and each host's
process id from the TPU metadata (SKYMOE_COORDINATOR=auto); SKYMOE_NUM_PROCESSES is set to the
slice's host count (x slices for xpk) so that a wrong --accelerator_type fails at start-up
instead of training on part of the slice.

The workdir and the data are bucket URLs (--workdir=gs://bucket/run, data.sources.*.data_dir=
gs://..., data.synthetic.cache_dir too, whose default ~/.cache is per host): every host reads
its data from the bucket, orbax writes checkpoints from every host and process 0 writes the
metrics, all through the path libraries (skymoe_jax/storage.py); no filesystem is shared.

Several slices (xpk, --num_slices=N, joined by the data-centre network): the train command gets
--config.mesh.num_slices=N (the mesh checks the devices are in N slices) and the mesh lays the
slices along its data axis (config.mesh.dcn_data=-1, dcn_fsdp=1: the slices split the batch and
only the gradient reduction crosses between them; parallel/mesh.py). The global batch
(data.batch_size) is divided over the slices: scale it with N to keep each slice's share.

xpk builds a container from --docker_image (the project installed, working directory at the
repository root) or from --base_docker_image plus this checkout (pip install at start), and runs
the same train command in every pod; it has no prepare step: make the data and tokenizer in the
bucket first (launch/prepare.py --workdir=gs://... from any machine that can write to it) and
give data.tokenizer.
"""
import argparse
import dataclasses
import hashlib
import math
import pathlib
import re
import shlex

from skymoe_jax.jobs import common

# Accelerator type -> how to read its number. 'cores': the number counts TensorCores, 2 per chip
# (v4/v5p run them as one megacore device per chip; v2/v3 show each core as a device); 'chips':
# it counts chips (v5e, v6e; slices of up to 8 chips are one host). Multi-host slices have 4
# chips per host.
GENERATIONS = {
    'v2': ('cores', 2), 'v3': ('cores', 2), 'v4': ('cores', 1), 'v5p': ('cores', 1),
    'v5litepod': ('chips', 1), 'v5e': ('chips', 1), 'v6e': ('chips', 1),
}
CHIPS_PER_HOST = 4
RUNTIME_VERSIONS = {'v2': 'tpu-ubuntu2204-base', 'v3': 'tpu-ubuntu2204-base',
                    'v4': 'tpu-ubuntu2204-base', 'v5p': 'v2-alpha-tpuv5',
                    'v5litepod': 'v2-alpha-tpuv5-lite', 'v5e': 'v2-alpha-tpuv5-lite',
                    'v6e': 'v2-alpha-tpuv6e'}


def slice_shape(accelerator_type: str) -> dict:
  """chips, hosts and jax devices per host of a slice such as 'v5p-128' (16 hosts)."""
  match = re.fullmatch(r'(v\d+[a-z]*)-(\d+)', accelerator_type)
  if not match or match.group(1) not in GENERATIONS:
    raise SystemExit(f'--accelerator_type={accelerator_type!r}: expected GENERATION-SIZE with '
                     f'GENERATION in {sorted(GENERATIONS)}, e.g. v5p-128')
  generation, size = match.group(1), int(match.group(2))
  counts, devices_per_chip = GENERATIONS[generation]
  chips = size // 2 if counts == 'cores' else size
  if chips < 1:
    raise SystemExit(f'--accelerator_type={accelerator_type!r}: less than one chip')
  hosts = 1 if counts == 'chips' and chips <= 8 else math.ceil(chips / CHIPS_PER_HOST)
  return {'generation': generation, 'chips': chips, 'hosts': hosts,
          'devices_per_host': chips // hosts * devices_per_chip}


def add_args(parser):
  g = parser.add_argument_group('TPU')
  g.add_argument('--accelerator_type', required=True, help='e.g. v5p-128, v5litepod-16, v6e-64')
  g.add_argument('--tpu', default='', help='TPU VM name (gcloud); or use --xpk_cluster.')
  g.add_argument('--zone', default='', help='Zone (gcloud) or the cluster\'s zone/region (xpk).')
  g.add_argument('--project', default='')
  g.add_argument('--create', action='store_true', help='Create the TPU VM slice first.')
  g.add_argument('--runtime_version', default='', help='For --create; default by generation.')
  g.add_argument('--setup', action='store_true', help='Clone and pip install on every worker.')
  g.add_argument('--repo_url', default='', help='For --setup; default: this checkout\'s origin.')
  g.add_argument('--git_ref', default='', help='For --setup; default: this checkout\'s commit.')
  g.add_argument('--remote_dir', default='skymoe_jax', help='Checkout on each worker (from ~).')
  g.add_argument('--python_bin', default='python3.11', help='Python on the TPU VM image.')
  g.add_argument('--detach', action='store_true',
                 help='Train under nohup (log: ~/skymoe_train.log on each worker) and return.')
  g.add_argument('--no_prepare', action='store_true', help='Skip launch/prepare.py on worker 0.')
  g.add_argument('--xpk_cluster', default='', help='Run as an xpk workload on this GKE cluster.')
  g.add_argument('--num_slices', type=int, default=1,
                 help='xpk: slices (multislice over DCN; the mesh lays them along data).')
  g.add_argument('--workload', default='', help='xpk workload name; default from the workdir.')
  g.add_argument('--docker_image', default='', help='xpk: an image with the project installed.')
  g.add_argument('--base_docker_image', default='python:3.11',
                 help='xpk without --docker_image: this checkout on this image, installed at '
                      'start.')


def _gcloud_ssh(args, worker: str, command: str) -> list:
  project = [f'--project={args.project}'] if args.project else []
  return ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', args.tpu, f'--zone={args.zone}',
          *project, f'--worker={worker}', f'--command={command}']


def setup_command(args, repo_url: str, git_ref: str) -> str:
  """Shell run on every worker: Python, the checkout at git_ref, a venv with the tpu extra."""
  py, d = args.python_bin, shlex.quote(args.remote_dir)
  return ' && '.join([
      f'(command -v {py} >/dev/null || (sudo apt-get update -q && '
      f'sudo apt-get install -y -q {py} {py}-venv))',
      f'([ -d {d}/.git ] || git clone -q {shlex.quote(repo_url)} {d})',
      f'cd {d}', 'git fetch -q origin', f'git checkout -q {shlex.quote(git_ref)}',
      f'([ -x .venv/bin/python ] || {py} -m venv .venv)',
      '.venv/bin/pip install -q -e ".[tpu]"'])


def distributed_env(shape: dict, num_slices: int = 1) -> dict:
  return {common.ENV_COORDINATOR: 'auto',
          common.ENV_NUM_PROCESSES: str(shape['hosts'] * num_slices)}


def plan(args, job: common.Job):
  shape = slice_shape(args.accelerator_type)
  if args.num_slices < 1 or (args.num_slices > 1 and not args.xpk_cluster):
    raise SystemExit(f'--num_slices={args.num_slices}: slices >= 1, and more than one needs '
                     '--xpk_cluster (a TPU VM is one slice)')
  slices = args.num_slices if args.xpk_cluster else 1
  if slices > 1:  # the mesh checks the devices are in this many slices (config.mesh.num_slices)
    job = dataclasses.replace(job, overrides={'mesh.num_slices': slices, **job.overrides})
  processes = shape['hosts'] * slices
  about = (f'{args.accelerator_type}: {shape["chips"]} chips, {shape["hosts"]} hosts x '
           f'{shape["devices_per_host"]} devices'
           + (f', x {slices} slices' if slices > 1 else '')
           + f'; one process per host: {processes} processes, '
           f'{processes * shape["devices_per_host"]} devices')
  env = distributed_env(shape, slices)
  if args.xpk_cluster:
    return xpk_plan(args, job, env, about)
  if not args.tpu or not args.zone:
    raise SystemExit('a TPU VM needs --tpu and --zone (or use --xpk_cluster)')
  steps = []
  if args.create:
    version = args.runtime_version or RUNTIME_VERSIONS[shape['generation']]
    project = [f'--project={args.project}'] if args.project else []
    steps.append(common.Command(
        ['gcloud', 'compute', 'tpus', 'tpu-vm', 'create', args.tpu, f'--zone={args.zone}',
         *project, f'--accelerator-type={args.accelerator_type}', f'--version={version}'],
        comment='create the slice'))
  if args.setup:
    repo_url = args.repo_url or common.git('remote', 'get-url', 'origin')
    git_ref = args.git_ref or common.git('rev-parse', 'HEAD')
    if not repo_url or not git_ref:
      raise SystemExit('--setup needs --repo_url and --git_ref (this checkout has no origin '
                       'remote or commit to default to)')
    comment = f'every worker: clone, checkout {git_ref}, venv, pip install ".[tpu]"'
    if not args.git_ref and common.git_info()['dirty']:
      comment += ('\n(this checkout has uncommitted changes: the workers get the commit '
                  'without them)')
    steps.append(common.Command(_gcloud_ssh(args, 'all', setup_command(args, repo_url, git_ref)),
                                comment=comment))
  cd = f'cd {shlex.quote(args.remote_dir)} && '
  if not args.no_prepare:
    prepare = common.shell_line(common.prepare_argv(job, '.venv/bin/python'),
                                {'JAX_PLATFORMS': 'cpu'})
    steps.append(common.Command(_gcloud_ssh(args, '0', cd + prepare),
                                comment='worker 0: data, tokenizer, provenance.json'))
  train = common.shell_line(common.train_argv(job, '.venv/bin/python'), env)
  if args.detach:
    train = f'(nohup {train} > ~/skymoe_train.log 2>&1 < /dev/null &)'
  steps.append(common.Command(_gcloud_ssh(args, 'all', cd + train),
                              comment=f'every worker: train. {about}'))
  return steps


def workload_name(workdir: str) -> str:
  """A valid, distinct xpk workload name from a workdir: its readable part, then a hash of the
  whole path (sweep runs differ in their names' tails, which the length limit may cut)."""
  readable = re.sub(r'[^a-z0-9]+', '-', pathlib.Path(workdir).name.lower()).strip('-')[:30]
  digest = hashlib.sha256(str(workdir).encode()).hexdigest()[:6]
  return f'{readable.rstrip("-") or "skymoe"}-{digest}'


def xpk_plan(args, job: common.Job, env: dict, about: str):
  if not args.zone:
    raise SystemExit('xpk needs --zone (the cluster\'s zone or region)')
  name = args.workload or workload_name(job.workdir)
  train = common.shell_line(common.train_argv(job, 'python'), env)
  if args.docker_image:
    image = [f'--docker-image={args.docker_image}']
  else:  # xpk copies --script-dir into the image; install it when the container starts
    image = [f'--base-docker-image={args.base_docker_image}', f'--script-dir={common.REPO}']
    train = 'pip install -q -e ".[tpu]" && ' + train
  project = [f'--project={args.project}'] if args.project else []
  return [common.Command(
      ['xpk', 'workload', 'create', f'--cluster={args.xpk_cluster}', f'--workload={name}',
       f'--tpu-type={args.accelerator_type}', f'--num-slices={args.num_slices}',
       f'--zone={args.zone}', *project, *image, f'--command={train}'],
      comment=f'every pod: train. {about}\nno prepare step: make the data and tokenizer in the '
              'bucket first (launch/prepare.py) and give data.tokenizer')]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  common.add_job_args(parser)
  add_args(parser)
  args, overrides = common.parse_args(parser, argv)
  return common.run_plan(plan(args, common.Job(args.config, args.workdir, overrides)),
                         args.dry_run)

