"""Launchers and sweeps: the commands they print, a real local sweep, two local processes.

The pod and cluster launchers cannot run here, so their dry runs are checked for what matters
(process counts, coordinator, overrides), and the SLURM script is executed by bash with stand-in
scontrol / srun / python that print what each task would have run. The local sweep and the
two-process run train the tiny config for real.
"""
import csv
import json
import os
import pathlib
import shlex
import stat
import subprocess
import sys
import time

import pytest

from conftest import REPO
from skymoe_jax import config as config_lib
from skymoe_jax.jobs import common
from skymoe_jax.jobs import grid
from skymoe_jax.jobs import local
from skymoe_jax.jobs import prepare
from skymoe_jax.jobs import slurm
from skymoe_jax.jobs import sweep
from skymoe_jax.jobs import tpu_pod

TINY = str(REPO / 'configs' / 'tiny.py')
OVERRIDES = ['--config.mesh.fsdp=2', "--config.data.sources.geo.data_dir=/data/geo chat's"]


def _commands(text: str) -> list:
  """The command lines of a printed plan (comments dropped), each split as the shell would."""
  return [shlex.split(line) for line in text.splitlines()
          if line.strip() and not line.startswith('#')]


def _flag(argv, name):
  values = [a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}=')]
  assert len(values) == 1, (name, argv)
  return values[0]


# -- sweep helpers and names --------------------------------------------------------------------

def test_product_and_zip():
  runs = grid.product({'optimizer.learning_rate': [1e-3, 3e-4]}, seed=[0, 1])
  assert runs == [{'optimizer.learning_rate': 1e-3, 'seed': 0},
                  {'optimizer.learning_rate': 1e-3, 'seed': 1},
                  {'optimizer.learning_rate': 3e-4, 'seed': 0},
                  {'optimizer.learning_rate': 3e-4, 'seed': 1}]
  assert grid.zip_({'optimizer.learning_rate': [1e-3, 3e-4]}, seed=[0, 1]) == [
      {'optimizer.learning_rate': 1e-3, 'seed': 0}, {'optimizer.learning_rate': 3e-4, 'seed': 1}]
  # Nested: a zip of two fields, crossed with a third; a tuple value inside a list.
  nested = grid.product(grid.zip_({'a': [1, 2], 'b': [3, 4]}), {'model.moe.layers': [(0, 2)]})
  assert nested == [{'a': 1, 'b': 3, 'model.moe.layers': (0, 2)},
                    {'a': 2, 'b': 4, 'model.moe.layers': (0, 2)}]
  assert grid.product() == [{}]
  with pytest.raises(ValueError, match='different lengths'):
    grid.zip_(a=[1, 2], b=[1])
  with pytest.raises(ValueError, match="'a' is set twice"):
    grid.product(grid.product(a=[1]), a=[2])
  with pytest.raises(ValueError, match="'model.moe.layers': give a list"):
    grid.product({'model.moe.layers': (0, 2)})


LIGHT_IMPORTS = """
import sys
import skymoe_jax.jobs.grid
assert 'jax' not in sys.modules, 'jobs.grid (config files import it) imports jax'
from skymoe_jax.jobs import local, slurm, tpu_pod
heavy = sorted({'tensorflow', 'orbax', 'sentencepiece'} & set(sys.modules))
assert not heavy, f'printing a launch plan imports {heavy}'
"""


def test_config_files_and_launchers_import_light():
  """Config files import jobs.grid: it stays standard library only; the launchers' plans need
  config, not the data libraries."""
  r = subprocess.run([sys.executable, '-c', LIGHT_IMPORTS], capture_output=True, text=True)
  assert r.returncode == 0, r.stderr


def test_run_names_are_readable_safe_and_distinct():
  name = common.run_name({'train.total_steps': 4, 'optimizer.learning_rate': 0.001})
  assert name == 'optimizer.learning_rate=0.001,train.total_steps=4'  # sorted by field
  assert common.run_name({}) == 'base'
  unsafe = common.run_name({'data.tokenizer': '/a/b.model', 'model.moe.layers': (0, 2)})
  assert '/' not in unsafe and ' ' not in unsafe and unsafe.startswith('data.tokenizer=_a_b')
  # '/' and '_' map to the same character: the hash keeps the two runs apart.
  assert unsafe != common.run_name({'data.tokenizer': '_a_b.model', 'model.moe.layers': (0, 2)})
  long = {f'model.field_{i}': 0.123456789 for i in range(10)}
  assert len(common.run_name(long)) == common.MAX_NAME
  assert common.run_name(long) != common.run_name({**long, 'model.field_9': 0.5})


def test_expand_rejects_a_field_both_given_and_swept(tmp_path):
  runs = sweep.expand(TINY, str(tmp_path), [{'seed': 1}], {'train.total_steps': '2'})
  assert runs[0].job.overrides == {'train.total_steps': '2', 'seed': 1}
  assert runs[0].job.workdir == str(tmp_path / 'seed=1') and runs[0].job.swept == ('seed',)
  with pytest.raises(SystemExit, match='seed: given on the command line and swept'):
    sweep.expand(TINY, str(tmp_path), [{'seed': 1}], {'seed': '2'})
  assert config_lib.load_sweep(TINY) == [{'seed': 0}, {'seed': 1}, {'seed': 2}]


def _chained_runs(root):
  """A stage I, a stage II starting from it (its sibling workdir) and one from elsewhere."""
  return sweep.link_dependencies(sweep.expand(TINY, str(root), [
      {'config_arg': 'stage1'},
      {'config_arg': 'stage2', 'train.init_from': 'config_arg=stage1'},
      {'config_arg': 'stage2', 'seed': 1, 'train.init_from': '/elsewhere/stage1'}], {}))


def test_sweep_runs_with_their_own_config_arg_and_dependencies(tmp_path, capsys, monkeypatch):
  runs = _chained_runs(tmp_path)
  assert [r.name for r in runs] == ['config_arg=stage1',
                                    'config_arg=stage2,train.init_from=config_arg=stage1',
                                    'config_arg=stage2,seed=1,train.init_from=_elsewhere_stage1'
                                    + runs[2].name[-9:]]
  assert [r.job.config for r in runs] == [TINY + ':stage1', TINY + ':stage2', TINY + ':stage2']
  assert runs[0].job.overrides == {} and runs[0].swept == {}
  assert [r.after for r in runs] == [None, 'config_arg=stage1', None]
  with pytest.raises(SystemExit, match='lists the run config_arg=stage2,train.init_from'):
    sweep.link_dependencies(sweep.expand(TINY, str(tmp_path), [
        {'config_arg': 'stage2', 'train.init_from': 'config_arg=stage1'},
        {'config_arg': 'stage1'}], {}))

  # --local: a failed stage I leaves its stage II unstarted; the independent run still runs.
  monkeypatch.setattr(prepare, 'prepare', lambda job: None)
  status = sweep.run_local(runs, {}, python='false')
  assert status == {runs[0].name: 'failed (exit 1)',
                    runs[1].name: f'failed (not started: {runs[0].name} failed)',
                    runs[2].name: 'failed (exit 1)'}
  assert sweep.run_local(runs, {}, python='true') == {r.name: 'done' for r in runs}
  capsys.readouterr()

  # SLURM submits and returns: the run that starts from an unfinished one is held back.
  assert sweep.run_remote(runs, 'slurm', ['--nodes=1', f'--log_dir={tmp_path / "logs"}'],
                          dry_run=True) == 0
  out = capsys.readouterr().out
  assert f'held back until {runs[0].name} (its train.init_from) is finished' in out
  assert [c[0] for c in _commands(out)].count('sbatch') == 2 and '1 runs held back' in out


def test_overrides_reach_the_config_as_the_trainer_reads_them():
  config = config_lib.load(TINY + ':stage1', {'model.moe.layers': (0,), 'seed': 3,
                                                 'optimizer.learning_rate': '0.5',
                                                 'data.template': 'llava_v1'})
  assert config.model.moe.layers == (0,) and config.seed == 3
  assert config.optimizer.learning_rate == 0.5 and config.train.stage == 'stage1'
  assert prepare.config_hash(config) != prepare.config_hash(config_lib.load(TINY))


# -- TPU pods -----------------------------------------------------------------------------------

def test_tpu_slice_shapes():
  shape = tpu_pod.slice_shape
  assert shape('v5p-128') == {'generation': 'v5p', 'chips': 64, 'hosts': 16,
                              'devices_per_host': 4}
  assert shape('v5p-8')['hosts'] == 1 and shape('v4-32')['hosts'] == 4
  assert shape('v3-8') == {'generation': 'v3', 'chips': 4, 'hosts': 1, 'devices_per_host': 8}
  assert shape('v5litepod-16')['hosts'] == 4 and shape('v6e-8')['hosts'] == 1
  assert shape('v6e-256')['hosts'] == 64
  with pytest.raises(SystemExit, match='v9-8'):
    shape('v9-8')


def test_tpu_pod_dry_run_v5p_128(capsys):
  tpu_pod.main(['--tpu=pod', '--zone=us-east5-a', '--project=proj',
                '--accelerator_type=v5p-128', '--setup', '--repo_url=https://example/sky.git',
                '--git_ref=abc123', '--config=configs/skymoe_7b.py:stage1',
                '--workdir=/mnt/shared/7b', '--dry_run', *OVERRIDES])
  out = capsys.readouterr().out
  assert '16 hosts x 4 devices; one process per host: 16 processes, 64 devices' in out
  setup, prepare, train = _commands(out)
  for argv in (setup, prepare, train):
    assert argv[:6] == ['gcloud', 'compute', 'tpus', 'tpu-vm', 'ssh', 'pod']
    assert '--zone=us-east5-a' in argv and '--project=proj' in argv
  assert _flag(setup, 'worker') == 'all' and _flag(train, 'worker') == 'all'
  assert _flag(prepare, 'worker') == '0'
  setup_cmd = _flag(setup, 'command')
  assert 'git clone -q https://example/sky.git skymoe_jax' in setup_cmd
  assert 'git checkout -q abc123' in setup_cmd and 'pip install -q -e ".[tpu]"' in setup_cmd
  # The remote train command, as the worker's shell splits it.
  remote = shlex.split(_flag(train, 'command'))
  assert remote[:3] == ['cd', 'skymoe_jax', '&&']
  assert remote[3:5] == ['SKYMOE_COORDINATOR=auto', 'SKYMOE_NUM_PROCESSES=16']
  assert remote[5:] == ['.venv/bin/python', '-m', 'skymoe_jax.train',
                        '--config=configs/skymoe_7b.py:stage1', '--workdir=/mnt/shared/7b',
                        *OVERRIDES]
  remote_prepare = shlex.split(_flag(prepare, 'command'))
  assert 'launch/prepare.py' in remote_prepare and remote_prepare[-2:] == OVERRIDES


def test_xpk_dry_run_multislice(capsys):
  tpu_pod.main(['--xpk_cluster=cluster', '--zone=us-east5', '--accelerator_type=v5p-128',
                '--num_slices=2', '--docker_image=gcr.io/p/sky:1', '--config=configs/tiny.py',
                '--workdir=/gcs/runs/a', '--dry_run', '--config.seed=1'])
  (argv,) = _commands(capsys.readouterr().out)
  assert argv[:3] == ['xpk', 'workload', 'create']
  assert _flag(argv, 'tpu-type') == 'v5p-128' and _flag(argv, 'num-slices') == '2'
  assert _flag(argv, 'cluster') == 'cluster' and _flag(argv, 'docker-image') == 'gcr.io/p/sky:1'
  assert _flag(argv, 'workload').startswith('a-')
  assert shlex.split(_flag(argv, 'command')) == [
      'SKYMOE_COORDINATOR=auto', 'SKYMOE_NUM_PROCESSES=32', 'python', '-m', 'skymoe_jax.train',
      '--config=configs/tiny.py', '--workdir=/gcs/runs/a', '--config.mesh.num_slices=2',
      '--config.seed=1']


# -- SLURM --------------------------------------------------------------------------------------

FAKE_SCONTROL = '#!/bin/bash\n# scontrol show hostnames LIST\necho gpu-node-07; echo gpu-node-08\n'
# srun: drop its own options; one task with --ntasks=1, else $SLURM_NTASKS tasks in turn.
FAKE_SRUN = '''#!/bin/bash
tasks=$SLURM_NTASKS
while [[ "$1" == --* ]]; do [[ "$1" == --ntasks=1 ]] && tasks=1; shift; done
for ((i = 0; i < tasks; i++)); do SLURM_PROCID=$i SLURM_LOCALID=$i "$@"; done
'''
# python: one JSON line per call with the multi-process settings and the arguments.
FAKE_PYTHON = '''#!/usr/bin/env python3
import json, os, sys
print(json.dumps({'argv': sys.argv[1:], **{k: os.environ.get(k) for k in (
    'SKYMOE_COORDINATOR', 'SKYMOE_NUM_PROCESSES', 'SKYMOE_PROCESS_ID', 'CUDA_VISIBLE_DEVICES')}}))
'''


def _fake_bin(tmp_path) -> pathlib.Path:
  folder = tmp_path / 'bin'
  folder.mkdir()
  for name, text in (('scontrol', FAKE_SCONTROL), ('srun', FAKE_SRUN), ('python', FAKE_PYTHON)):
    (folder / name).write_text(text)
    (folder / name).chmod(stat.S_IRWXU)
  return folder


@pytest.mark.parametrize('processes', ['node', 'gpu'])
def test_slurm_two_nodes(tmp_path, capsys, processes):
  workdir = tmp_path / 'run'
  slurm.main(['--nodes=2', '--gpus_per_node=4', f'--processes={processes}', '--partition=a100',
              f'--repo_dir={tmp_path}', f'--python={_fake_bin(tmp_path) / "python"}',
              f'--config={TINY}', f'--workdir={workdir}', '--dry_run', *OVERRIDES])
  out = capsys.readouterr().out
  tasks = 1 if processes == 'node' else 4
  assert f'#SBATCH --nodes=2\n#SBATCH --ntasks-per-node={tasks}\n' in out
  assert '#SBATCH --gpus-per-node=4' in out and '#SBATCH --partition=a100' in out
  assert f'2 nodes x {tasks} task(s) per node = {2 * tasks} processes' in out
  assert _commands(out)[-1] == ['sbatch', str(workdir / 'slurm' / 'train.sbatch')]

  # Run what the dry run printed (writes the script), then the script, as SLURM would.
  env = dict(os.environ, PATH=f'{tmp_path / "bin"}:{os.environ["PATH"]}',
             SLURM_JOB_NODELIST='gpu-node-[07-08]', SLURM_NTASKS=str(2 * tasks),
             SLURM_JOB_ID='1234567')
  snippet = out.rsplit('\nsbatch ', 1)[0]
  subprocess.run(['bash', '-c', snippet], check=True, env=env)
  result = subprocess.run(['bash', str(workdir / 'slurm' / 'train.sbatch')], env=env,
                          capture_output=True, text=True, check=True)
  calls = [json.loads(line) for line in result.stdout.splitlines()]
  prepare, trains = calls[0], calls[1:]
  assert prepare['argv'][0] == 'launch/prepare.py' and prepare['argv'][-2:] == OVERRIDES
  assert len(trains) == 2 * tasks
  for i, call in enumerate(trains):
    assert call['SKYMOE_COORDINATOR'] == f'gpu-node-07:{20000 + 1234567 % 20000}'
    assert call['SKYMOE_NUM_PROCESSES'] == str(2 * tasks)
    assert call['SKYMOE_PROCESS_ID'] == str(i)
    assert call['CUDA_VISIBLE_DEVICES'] == (str(i) if processes == 'gpu' else
                                            os.environ.get('CUDA_VISIBLE_DEVICES'))
    assert call['argv'] == ['-m', 'skymoe_jax.train', f'--config={TINY}',
                            f'--workdir={workdir}', *OVERRIDES]


# -- this machine -------------------------------------------------------------------------------

def test_local_dry_run_two_processes(capsys):
  local.main(['--num_processes=2', '--devices_per_process=4', '--port=4321',
              f'--config={TINY}', '--workdir=/tmp/x', '--dry_run', '--config.seed=1'])
  lines = _commands(capsys.readouterr().out)
  prepare, mkdir, *procs, wait = lines
  assert prepare[1].endswith('launch/prepare.py') and mkdir == ['mkdir', '-p', '/tmp/x/logs']
  assert wait == ['wait'] and len(procs) == 2
  for i, argv in enumerate(procs):
    assert argv[:5] == ['JAX_PLATFORMS=cpu',
                        'XLA_FLAGS=--xla_force_host_platform_device_count=4',
                        'SKYMOE_COORDINATOR=127.0.0.1:4321', 'SKYMOE_NUM_PROCESSES=2',
                        f'SKYMOE_PROCESS_ID={i}']
    assert argv[6:12] == ['-m', 'skymoe_jax.train', f'--config={TINY}', '--workdir=/tmp/x',
                          '--config.seed=1', '>']
    assert argv[12:] == [f'/tmp/x/logs/process_{i}.log', '2>&1', '&']


def _tiny_overrides(tmp_path):
  return [f'--config.data.synthetic.cache_dir={tmp_path / "data"}',
          '--config.train.total_steps=2', '--config.train.log_every=1',
          '--config.train.checkpoint_every=2']


def test_local_sweep_runs_skips_and_summarizes(tmp_path, capfd, monkeypatch):
  # capfd, not capsys: sentencepiece (tokenizer training, in this process) needs a real
  # sys.stderr file descriptor.
  # One CPU device per run (conftest forces 8 on this process; its children need not).
  monkeypatch.setenv('XLA_FLAGS', '')
  root = tmp_path / 'sweep'
  # Stage I (dense) compiles in half the time of the MoE config; get_sweep gets the ':stage1'.
  config = TINY + ':stage1'
  argv = [f'--config={config}', f'--workdir_root={root}', '--local', *_tiny_overrides(tmp_path)]
  start = time.perf_counter()
  assert sweep.main(argv) == 0
  first = time.perf_counter() - start
  names = ['seed=0', 'seed=1', 'seed=2']
  assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ['.jax_cache', *names]
  for seed, name in enumerate(names):
    workdir = root / name
    assert sweep.checkpoint_steps(workdir) == [2]
    prov = json.loads((workdir / 'provenance.json').read_text())
    assert prov['overrides']['seed'] == str(seed) and prov['swept'] == ['seed']
    assert prov['total_steps'] == 2 and prov['packages']['jax']
    assert prov['data_manifest']['sources']['synthetic']['info_sha256']
    assert prov['config'] == config and prov['config_hash'] == prepare.config_hash(
        config_lib.load(config, {**common.split_override_args(argv)[0], 'seed': seed}))
    # The trainer saw the same config: its config.json agrees on the swept and given fields.
    trained = json.loads((workdir / 'config.json').read_text())
    assert trained['seed'] == seed and trained['train']['total_steps'] == 2
    assert trained['train']['stage'] == 'stage1'
  manifests = {json.loads((root / n / 'provenance.json').read_text())['data_manifest']['hash']
               for n in names}
  assert len(manifests) == 1  # the same data for every seed
  capfd.readouterr()

  # Again: every run is finished, nothing trains.
  mtimes = [(root / n / 'metrics.jsonl').stat().st_mtime for n in names]
  start = time.perf_counter()
  assert sweep.main(argv) == 0
  assert capfd.readouterr().out.count('finished, skipped') == 3
  assert [(root / n / 'metrics.jsonl').stat().st_mtime for n in names] == mtimes
  assert time.perf_counter() - start < first / 3

  assert sweep.main(['--summarize', f'--workdir_root={root}']) == 0
  out = capfd.readouterr().out.splitlines()
  header, rows = out[0].split(), [line.split() for line in out[1:4]]
  assert header[:3] == ['seed', 'step', 'status'] and 'loss' in header and 'ce_loss' in header
  assert [r[:3] for r in rows] == [['0', '2', 'finished'], ['1', '2', 'finished'],
                                   ['2', '2', 'finished']]
  assert out[4].startswith('3 runs')
  with open(root / 'summary.csv') as f:
    table = list(csv.DictReader(f))
  assert [r['run'] for r in table] == names and [r['seed'] for r in table] == ['0', '1', '2']
  for r, name in zip(table, names):
    last = sweep.last_metrics(root / name)
    assert float(r['loss']) == pytest.approx(last['loss'])
    assert float(r['ce_loss']) == pytest.approx(last['ce_loss'])


@pytest.mark.slow
def test_two_local_processes_train_like_one(tmp_path, capsys):
  """launch/local.py with 2 CPU processes x 4 devices trains the tiny config; the losses match
  one process with 8 devices on the same data, tokenizer and initial state."""
  base = _tiny_overrides(tmp_path)
  two, one = tmp_path / 'two', tmp_path / 'one'
  assert local.main(['--num_processes=2', '--devices_per_process=4', '--timeout_s=1200',
                     f'--config={TINY}', f'--workdir={two}', *base]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert summary['step'] == 2 and not summary['preempted']
  assert sweep.checkpoint_steps(two) == [2]
  for i in range(2):  # both processes joined one job of 8 devices and trained both steps
    log = (two / 'logs' / f'process_{i}.log').read_text()
    assert 'step 2/2' in log
  assert local.main(['--devices_per_process=8', f'--config={TINY}', f'--workdir={one}',
                     f'--config.data.tokenizer={two / "tokenizer.model"}', *base]) == 0
  lines = lambda w: [json.loads(x) for x in (w / 'metrics.jsonl').read_text().splitlines()]
  got, want = lines(two), lines(one)
  assert [m['step'] for m in got] == [1, 2]
  for g, w in zip(got, want):
    assert g['loss'] == pytest.approx(w['loss'], rel=1e-5)
    assert g['ce_loss'] == pytest.approx(w['ce_loss'], rel=1e-5)


def test_dry_runs_with_a_bucket_workdir(tmp_path, capsys, monkeypatch):
  """gs:// workdirs pass through as they are; what must be local (the sbatch script, SLURM's
  output, process logs) goes under --log_dir, or ~/skymoe_logs/BUCKET/PATH."""
  monkeypatch.setenv('HOME', str(tmp_path))
  slurm.main(['--nodes=2', '--config=' + TINY, '--workdir=gs://my-bucket/runs/a', '--dry_run',
              *OVERRIDES])
  out = capsys.readouterr().out
  logs = tmp_path / 'skymoe_logs' / 'my-bucket' / 'runs' / 'a'
  assert f'#SBATCH --output={logs / "slurm" / "%j.out"}' in out
  assert _commands(out)[-1] == ['sbatch', str(logs / 'slurm' / 'train.sbatch')]
  assert '--workdir=gs://my-bucket/runs/a' in out and 'gs:/my-bucket' not in out

  slurm.main(['--nodes=1', '--log_dir=' + str(tmp_path / 'shared'), '--config=' + TINY,
              '--workdir=gs://my-bucket/runs/a', '--dry_run'])
  assert str(tmp_path / 'shared' / 'slurm' / 'train.sbatch') in capsys.readouterr().out

  local.main(['--num_processes=2', '--devices_per_process=4', '--config=' + TINY,
              '--workdir=gs://my-bucket/runs/b', '--dry_run'])
  out = capsys.readouterr().out
  assert '--workdir=gs://my-bucket/runs/b' in out
  logs = tmp_path / 'skymoe_logs' / 'my-bucket' / 'runs' / 'b'
  assert str(logs / 'logs' / 'process_0.log') in out
