"""What every launcher shares: the train command, config overrides, run names, provenance.

A job is (config file[:arg], workdir, overrides). Every launcher runs the same two programs:

  python launch/prepare.py  --config=FILE[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]
  python -m skymoe_jax.train --config=FILE[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]

prepare once, on one process, then train on every process; launchers differ only in how the
processes start and find each other (parallel/multihost.py reads SKYMOE_COORDINATOR,
SKYMOE_NUM_PROCESSES and SKYMOE_PROCESS_ID). Overrides travel as the trainer's own
`--config.FIELD=VALUE` flags, and launchers read configs through the same ml_collections parser,
so what a launcher checks (total_steps, the config hash) is what the trainer will see.

A launcher's plan is a list of steps (files to write, commands to run); --dry_run prints it as a
shell snippet that can be pasted, instead of running it. Imports here are standard library only
(jax and the project load inside the functions that need them), so config files can import
launch.sweep's helpers cheaply.
"""
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import os
import pathlib
import platform
import re
import shlex
import socket
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

REPO = pathlib.Path(__file__).resolve().parents[1]
TRAIN_MODULE = 'skymoe_jax.train'
PREPARE_SCRIPT = 'launch/prepare.py'   # relative to the repository root
PROVENANCE_FILE = 'provenance.json'
OVERRIDE_PREFIX = '--config.'

ENV_COORDINATOR = 'SKYMOE_COORDINATOR'     # the names parallel/multihost.py reads
ENV_NUM_PROCESSES = 'SKYMOE_NUM_PROCESSES'
ENV_PROCESS_ID = 'SKYMOE_PROCESS_ID'

# Recorded in provenance.json when installed.
PACKAGES = ('skymoe_jax', 'jax', 'jaxlib', 'libtpu', 'jax-cuda12-plugin', 'flax', 'optax',
            'orbax-checkpoint', 'ml_collections', 'numpy', 'tensorflow-cpu', 'tensorflow',
            'tensorflow-datasets', 'sentencepiece', 'clu')


# -- overrides ----------------------------------------------------------------------------------

def override_text(value) -> str:
  """A value as ml_collections' flag parser reads it back: strings as they are, else repr."""
  if isinstance(value, str):
    return value
  if isinstance(value, (list, tuple)):
    return repr(tuple(value))  # config fields hold tuples; the parser reads a tuple literal
  return repr(value)


def override_flags(overrides: Dict) -> List[str]:
  return [f'{OVERRIDE_PREFIX}{field}={override_text(v)}' for field, v in overrides.items()]


def split_override_args(argv: Sequence[str]):
  """(overrides {field: text}, other args) from a command line's `--config.FIELD=VALUE` items."""
  overrides, rest = {}, []
  for arg in argv:
    if arg.startswith(OVERRIDE_PREFIX):
      field, eq, value = arg[len(OVERRIDE_PREFIX):].partition('=')
      if not eq or not field:
        raise SystemExit(f'{arg!r}: write config overrides as --config.FIELD=VALUE')
      overrides[field] = value
    else:
      rest.append(arg)
  return overrides, rest


def parse_args(parser, argv=None):
  """argparse for a launcher: its own flags plus any number of --config.FIELD=VALUE overrides."""
  overrides, rest = split_override_args(sys.argv[1:] if argv is None else argv)
  return parser.parse_args(rest), overrides


def add_job_args(parser, workdir: bool = True):
  parser.add_argument('--config', required=True, help='Config file, path[:arg].')
  if workdir:
    parser.add_argument('--workdir', required=True, help='The run\'s workdir.')
  parser.add_argument('--dry_run', action='store_true',
                      help='Print the exact commands without running them.')


@dataclasses.dataclass
class Job:
  """One training run: config file[:arg], workdir and overrides (field -> value or text)."""
  config: str
  workdir: str
  overrides: Dict = dataclasses.field(default_factory=dict)
  swept: Sequence[str] = ()   # the fields a sweep chose for this run (recorded in provenance)


def train_argv(job: Job, python: str = 'python') -> List[str]:
  return [python, '-m', TRAIN_MODULE, f'--config={job.config}', f'--workdir={job.workdir}',
          *override_flags(job.overrides)]


def prepare_argv(job: Job, python: str = 'python', script: str = PREPARE_SCRIPT) -> List[str]:
  swept = [f'--swept={",".join(job.swept)}'] if job.swept else []
  return [python, script, f'--config={job.config}', f'--workdir={job.workdir}', *swept,
          *override_flags(job.overrides)]


def load_config(config: str, overrides: Optional[Dict] = None):
  """The config the trainer builds from `--config=config` and these overrides.

  Parsed by ml_collections' own flag machinery (a private FlagValues), so field types, tuples and
  strings are read exactly as `python -m skymoe_jax.train` reads them.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  argv = ['launch', f'--config={config}', *override_flags(overrides or {})]
  values = flags.FlagValues()
  # The override flags are defined from the argv given at definition time, not sys.argv's.
  config_flags.DEFINE_config_file('config', None, 'Config file.', flag_values=values,
                                  lock_config=False, sys_argv=argv)
  values(argv)
  return values.config


def config_hash(config) -> str:
  """sha256 of the resolved config as sorted JSON: equal hashes, equal runs (given equal code)."""
  text = config.to_json_best_effort(sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


# -- run names and state ------------------------------------------------------------------------

_UNSAFE = re.compile(r'[^A-Za-z0-9._,=+-]')
MAX_NAME = 96


def run_name(overrides: Dict) -> str:
  """A readable, filesystem-safe workdir name: `field=value,...` sorted by field.

  Characters outside [A-Za-z0-9._,=+-] become '_'; a name that had to change, or is longer than
  MAX_NAME, ends with 8 hex digits of the exact text's hash, so two runs never share a workdir.
  """
  if not overrides:
    return 'base'
  text = ','.join(f'{field}={override_text(overrides[field])}' for field in sorted(overrides))
  safe = _UNSAFE.sub('_', text)
  if safe != text or len(safe) > MAX_NAME:
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    safe = f'{safe[:MAX_NAME - 9]}-{digest}'
  return safe


def checkpoint_steps(workdir) -> List[int]:
  """Steps of the committed checkpoints (orbax renames a step's folder to its number when the
  save is complete, so a half-written one never counts)."""
  folder = pathlib.Path(workdir) / 'checkpoints'
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())


def is_finished(workdir, total_steps: int) -> bool:
  """The run has its checkpoint at total_steps (or beyond: rerunning it would do nothing)."""
  steps = checkpoint_steps(workdir)
  return bool(steps) and steps[-1] >= total_steps


def read_json(path) -> Optional[Dict]:
  path = pathlib.Path(path)
  return json.loads(path.read_text()) if path.exists() else None


def last_metrics(workdir) -> Optional[Dict]:
  """The last line of the workdir's metrics.jsonl (the last logged step), or None."""
  path = pathlib.Path(workdir) / 'metrics.jsonl'
  if not path.exists():
    return None
  lines = [line for line in path.read_text().splitlines() if line.strip()]
  return json.loads(lines[-1]) if lines else None


# -- provenance ---------------------------------------------------------------------------------

def git(*args, repo=REPO) -> str:
  """The output of a git command in this checkout; '' when git or the checkout is missing."""
  try:
    return subprocess.run(['git', '-C', str(repo), *args], capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return ''


def git_info() -> Dict:
  """The checkout's commit and whether it has uncommitted changes (None outside a git repo)."""
  commit = git('rev-parse', 'HEAD')
  if not commit:
    return {'commit': None, 'dirty': None}
  return {'commit': commit, 'dirty': bool(git('status', '--porcelain'))}


def package_versions() -> Dict:
  versions = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def source_dirs(config) -> Dict[str, str]:
  """Each data source's folder, generated sources included (where the trainer will put them)."""
  from skymoe_jax.train import trainer  # pylint: disable=g-import-not-at-top
  dirs = {}
  for name, source in config.data.sources.items():
    generated = source.get('generate', '') == 'synthetic'
    dirs[name] = str(trainer.synthetic_dir(config) if generated else source.data_dir)
  return dirs


def data_manifest(config) -> Dict:
  """Hashes of the sources' dataset_info.json (None for one not made yet), and of all of them.

  dataset_info.json lists every shard with its record count and the converter's settings, so
  its hash changes whenever the data does, without reading the shards.
  """
  from skymoe_jax.data import records  # pylint: disable=g-import-not-at-top
  sources = {}
  for name, folder in sorted(source_dirs(config).items()):
    info = pathlib.Path(folder).expanduser() / records.INFO_FILE
    sources[name] = {'data_dir': folder, 'info_sha256': (
        hashlib.sha256(info.read_bytes()).hexdigest() if info.exists() else None)}
  joined = json.dumps({n: s['info_sha256'] for n, s in sources.items()}, sort_keys=True)
  return {'hash': hashlib.sha256(joined.encode()).hexdigest(), 'sources': sources}


def provenance(job: Job, config) -> Dict:
  return {
      'config': job.config,
      'config_hash': config_hash(config),
      'overrides': {field: override_text(v) for field, v in job.overrides.items()},
      'swept': list(job.swept),
      'total_steps': int(config.train.total_steps),
      'git': git_info(),
      'packages': package_versions(),
      'data_manifest': data_manifest(config),
      'host': socket.gethostname(),
      'written': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


def prepare(job: Job) -> Dict:
  """The one-process step before a job: data, tokenizer and provenance.json in the workdir.

  Every process of a multi-process run reads the generated data and the workdir's tokenizer,
  but the trainer makes them on process 0 only (data) or on each process (tokenizer) without
  waiting for the others; made here first, every process finds them ready. Needs no
  accelerator. Returns the provenance written.
  """
  from skymoe_jax.train import trainer  # pylint: disable=g-import-not-at-top
  config = load_config(job.config, job.overrides)
  workdir = pathlib.Path(job.workdir).expanduser().resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  resolved = config.copy_and_resolve_references()  # resolve_sources fills in data_dir
  trainer.resolve_sources(resolved)
  trainer.load_tokenizer(resolved, workdir)
  record = provenance(job, config)
  previous = read_json(workdir / PROVENANCE_FILE)
  if previous and previous.get('config_hash') != record['config_hash']:
    record['previous_config_hash'] = previous.get('config_hash')  # e.g. total_steps raised
  (workdir / PROVENANCE_FILE).write_text(json.dumps(record, indent=1) + '\n')
  return record


# -- plans: what a launcher does, printed or run ------------------------------------------------

@dataclasses.dataclass
class WriteFile:
  path: str
  text: str


@dataclasses.dataclass
class Command:
  argv: List[str]
  env: Dict[str, str] = dataclasses.field(default_factory=dict)  # set on top of os.environ
  comment: str = ''


def quote(arg: str) -> str:
  """shlex.quote, but `--flag=value` keeps its name outside the quotes: --command='...'."""
  match = re.fullmatch(r'(--[\w.-]+=)(.*)', arg, re.S)
  if match and shlex.quote(arg) != arg:
    return match.group(1) + shlex.quote(match.group(2))
  return shlex.quote(arg)


def shell_line(argv: Sequence[str], env: Optional[Dict[str, str]] = None) -> str:
  words = [f'{k}={shlex.quote(str(v))}' for k, v in (env or {}).items()]
  return ' '.join(words + [quote(a) for a in argv])


def render(plan) -> str:
  """The plan as a shell snippet: comments, heredocs for files, one line per command."""
  lines = []
  for step in plan:
    if isinstance(step, WriteFile):
      tag = 'SKYMOE_EOF'
      lines += [f'mkdir -p {shlex.quote(str(pathlib.Path(step.path).parent))}',
                f"cat > {shlex.quote(step.path)} <<'{tag}'", step.text.rstrip('\n'), tag]
    else:
      if step.comment:
        lines += [f'# {c}' for c in step.comment.splitlines()]
      lines.append(shell_line(step.argv, step.env))
  return '\n'.join(lines)


def execute(plan) -> int:
  """Runs a plan in order; stops at the first command that fails and returns its exit code."""
  for step in plan:
    if isinstance(step, WriteFile):
      path = pathlib.Path(step.path).expanduser()
      path.parent.mkdir(parents=True, exist_ok=True)
      path.write_text(step.text)
      continue
    print('+ ' + shell_line(step.argv, step.env), flush=True)
    code = subprocess.run(step.argv, env={**os.environ, **step.env}).returncode
    if code:
      return code
  return 0


def run_plan(plan, dry_run: bool) -> int:
  if dry_run:
    print(render(plan))
    return 0
  return execute(plan)


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
