"""What every launcher shares: the job, its two command lines, run names, plans.

A job is (config file[:arg], workdir, overrides). Every launcher runs the same two programs:

  python launch/prepare.py  --config=FILE[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]
  python -m skymoe_jax.train --config=FILE[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]

prepare once, on one process, then train on every process; launchers differ only in how the
processes start and find each other (parallel/multihost.py reads SKYMOE_COORDINATOR,
SKYMOE_NUM_PROCESSES and SKYMOE_PROCESS_ID). Overrides travel as the trainer's own
`--config.FIELD=VALUE` flags (config.override_flags writes them), and whatever reads a job's
config reads it with config.load, the trainer's own parser, so what a launcher checks
(total_steps, the config hash) is what the trainer will see.

A launcher's plan is a list of steps (files to write, commands to run); --dry_run prints it as a
shell snippet that can be pasted, instead of running it. This module needs nothing of the
project but config: printing a pod's or a cluster's commands loads no data libraries.
"""
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shlex
import socket
import subprocess
import sys
from typing import Dict, List, Optional, Sequence

from skymoe_jax import config as config_lib
from skymoe_jax import storage

REPO = pathlib.Path(__file__).resolve().parents[2]  # the checkout: launch/ and configs/ in it
TRAIN_MODULE = 'skymoe_jax.train'
PREPARE_SCRIPT = 'launch/prepare.py'   # relative to the repository root
PROVENANCE_FILE = 'provenance.json'

ENV_COORDINATOR = 'SKYMOE_COORDINATOR'     # the names parallel/multihost.py reads
ENV_NUM_PROCESSES = 'SKYMOE_NUM_PROCESSES'
ENV_PROCESS_ID = 'SKYMOE_PROCESS_ID'


# -- the command line ---------------------------------------------------------------------------

def split_override_args(argv: Sequence[str]):
  """(overrides {field: text}, other args): the `--config.FIELD=VALUE` items of a command line
  taken out for config.load (which types them), the rest left to the launcher's argparse."""
  prefix = config_lib.OVERRIDE_PREFIX
  overrides, rest = {}, []
  for arg in argv:
    if arg.startswith(prefix):
      field, eq, value = arg[len(prefix):].partition('=')
      if not eq or not field:
        raise SystemExit(f'{arg!r}: write config overrides as {prefix}FIELD=VALUE')
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


def override_texts(overrides: Dict) -> Dict[str, str]:
  """{field: value} -> {field: the text of its --config.FIELD=VALUE flag} (config.override_flags
  writes them; the text is what run names and provenance record)."""
  prefix = config_lib.OVERRIDE_PREFIX
  return dict(flag[len(prefix):].split('=', 1) for flag in config_lib.override_flags(overrides))


@dataclasses.dataclass
class Job:
  """One training run: config file[:arg], workdir and overrides (field -> value or text)."""
  config: str
  workdir: str
  overrides: Dict = dataclasses.field(default_factory=dict)
  swept: Sequence[str] = ()   # the fields a sweep chose for this run (recorded in provenance)


def train_argv(job: Job, python: str = 'python') -> List[str]:
  return [python, '-m', TRAIN_MODULE, f'--config={job.config}', f'--workdir={job.workdir}',
          *config_lib.override_flags(job.overrides)]


def prepare_argv(job: Job, python: str = 'python', script: str = PREPARE_SCRIPT) -> List[str]:
  swept = [f'--swept={",".join(job.swept)}'] if job.swept else []
  return [python, script, f'--config={job.config}', f'--workdir={job.workdir}', *swept,
          *config_lib.override_flags(job.overrides)]


# -- run names ----------------------------------------------------------------------------------

_UNSAFE = re.compile(r'[^A-Za-z0-9._,=+-]')
MAX_NAME = 96


def run_name(overrides: Dict) -> str:
  """A readable, filesystem-safe workdir name: `field=value,...` sorted by field.

  Characters outside [A-Za-z0-9._,=+-] become '_'; a name that had to change, or is longer than
  MAX_NAME, ends with 8 hex digits of the exact text's hash, so two runs never share a workdir.
  """
  if not overrides:
    return 'base'
  texts = override_texts(overrides)
  text = ','.join(f'{field}={texts[field]}' for field in sorted(texts))
  safe = _UNSAFE.sub('_', text)
  if safe != text or len(safe) > MAX_NAME:
    digest = hashlib.sha256(text.encode()).hexdigest()[:8]
    safe = f'{safe[:MAX_NAME - 9]}-{digest}'
  return safe


def local_dir(workdir, log_dir: str = '') -> pathlib.Path:
  """Where a launcher keeps what must be a local file (process logs, a SLURM script and its
  output): log_dir when given, else the workdir itself, or for a bucket workdir (gs://b/run)
  ~/skymoe_logs/b/run, since shell redirects and sbatch take local paths only."""
  if log_dir:
    return pathlib.Path(log_dir).expanduser().absolute()
  if storage.is_remote(workdir):
    return pathlib.Path('~/skymoe_logs').expanduser() / str(workdir).split('://', 1)[1]
  return pathlib.Path(workdir).expanduser()


def workdir_arg(workdir: str) -> str:
  """--workdir as the launchers pass it on: local ones absolute, bucket URLs as they are."""
  return str(storage.resolve(workdir))


def read_json(path) -> Optional[Dict]:
  path = storage.path(path)
  return json.loads(path.read_text()) if path.exists() else None


# -- the checkout -------------------------------------------------------------------------------

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
      if storage.is_remote(step.path):  # an object: uploaded from stdin, no folder to make
        lines += [f"gcloud storage cp - {shlex.quote(step.path)} <<'{tag}'",
                  step.text.rstrip('\n'), tag]
      else:
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
      path = storage.path(step.path)
      path.parent.mkdir(parents=True, exist_ok=True)  # nothing to make in a bucket
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
