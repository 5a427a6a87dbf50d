"""The one command-line convention every runnable thing follows:

  python -m skymoe_jax.<verb> --config=FILE[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]

FILE is a Python config file whose get_config(ARG) returns the config (configs/); any field is
overridden as --config.FIELD=VALUE (ml_collections' config flags: values are typed like the
field). Commands whose workdir already holds the run's config (chat, export) take --workdir
alone. launch/ and data_prep/ scripts take the same --config / override forms where they take
a config (config.load reads them exactly as these flags do).

Every command starts through `run(main, define_flags)`: a bad flag or config (an unknown field,
a value of the wrong type, a missing config file, a ConfigError) is one line on stderr, naming
the flag and, for a typo, ml_collections' suggestion, and exit status 2, never a traceback.
"""
import ast
import pathlib
import sys
import traceback
from typing import Callable, Optional, Sequence

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from skymoe_jax.registry import ConfigError

USAGE_ERROR_EXIT = 2  # as argparse: the command was given wrongly, nothing ran


def define_config_flag(required: bool = True) -> None:
  config_flags.DEFINE_config_file(
      'config', None, 'Config file FILE[:ARG]; override any field with --config.FIELD=VALUE.',
      lock_config=False)
  if required:
    flags.mark_flag_as_required('config')


def define_workdir_flag(help_text: str, required: bool = True) -> None:
  flags.DEFINE_string('workdir', None, help_text)
  if required:
    flags.mark_flag_as_required('workdir')


def config_file() -> str:
  """--config's FILE[:ARG] as given."""
  return config_flags.get_config_filename(flags.FLAGS['config'])


def config_overrides() -> dict:
  """The --config.FIELD=VALUE overrides given, as {field: typed value}."""
  return dict(config_flags.get_override_values(flags.FLAGS['config']))


def check_no_arguments(argv) -> None:
  """Commands take flags only: a stray word is a typo, not something to ignore."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments {argv[1:]}: every option is a --flag')


def quiet_library_logs() -> None:
  """INFO logs of this project only: orbax and the data libraries log every file they touch."""
  logging.set_verbosity(logging.INFO)
  noisy = ('/orbax/', '/clu/', '/jax/_src/', '/tensorflow/')
  keep = lambda r: r.levelno >= logging.WARNING or not any(n in r.pathname for n in noisy)
  # ABSLHandler hands records to its python_handler without filtering them itself.
  logging.get_absl_handler().python_handler.addFilter(keep)


def run(main: Callable, define_flags: Optional[Callable[[], None]] = None) -> None:
  """app.run(main) after define_flags(), with flag and config errors as one line and exit 2.

  absl and ml_collections report a typo'd override (--config.train.total_stepz=5) as a
  traceback whose useful part, "Did you mean "total_steps"", is buried in it; a ConfigError
  raised while main checks the config would be one too. Both become `<command>: <message>`.
  Other exceptions keep their tracebacks: they are bugs or failures, not a wrong command line.
  """
  if define_flags is not None:
    define_flags()

  def parse(argv: Sequence[str]):
    try:
      rest = flags.FLAGS(argv)
      _check_config_file_loaded(argv)
    except (flags.Error, AttributeError, KeyError, OSError, ValueError) as e:
      message = usage_error_message(e, argv)
      if message is None:
        raise
      _exit_with_usage_error(argv, message)
    return rest

  def checked_main(argv):
    try:
      return main(argv)
    except (ConfigError, app.UsageError) as e:
      _exit_with_usage_error(sys.argv, str(e))

  app.run(checked_main, flags_parser=parse)


def usage_error_message(error: BaseException, argv: Sequence[str]) -> Optional[str]:
  """One line saying what on the command line is wrong, or None where `error` (raised while
  parsing `argv`) is not a flag or config error."""
  chain = list(_chain(error))
  config_errors = [e for e in chain if isinstance(e, ConfigError)]
  if config_errors:
    # A config file's get_config refused its :ARG. ml_collections re-raises it as the same type
    # with the traceback as its message: the innermost one is the original.
    return f'--config={_config_arg(argv)}: {config_errors[-1]}'
  if isinstance(error, (AttributeError, KeyError)):
    if not _raised_by_ml_collections(error):
      return None  # e.g. a bug inside a config file's get_config
    return _unknown_field_message(error, argv)
  if isinstance(error, OSError):
    return _config_file_message(error, argv)
  if isinstance(error, flags.Error):
    message = str(error)
    if 'Error whilst parsing config file' in message:  # its traceback: say where, in one line
      cause = chain[-1]
      frame = traceback.extract_tb(cause.__traceback__)[-1] if cause.__traceback__ else None
      where = f' ({frame.filename}:{frame.lineno})' if frame else ''
      return f'--config={_config_arg(argv)}: {type(cause).__name__}: {cause}{where}'
    return _one_line(message)
  return None


def _exit_with_usage_error(argv: Sequence[str], message: str) -> None:
  command = pathlib.Path(argv[0]).stem if argv else 'skymoe_jax'
  sys.stderr.write(f'{command}: {_one_line(message)}\n')
  sys.stderr.flush()
  sys.exit(USAGE_ERROR_EXIT)


def _one_line(message: str) -> str:
  return ' '.join(part.strip() for part in str(message).splitlines() if part.strip())


def _raised_by_ml_collections(error: BaseException) -> bool:
  frames = traceback.extract_tb(error.__traceback__)
  return bool(frames) and '/ml_collections/' in frames[-1].filename.replace('\\', '/')


def _unknown_field_message(error: BaseException, argv: Sequence[str]) -> str:
  """'--config.train.total_stepz=5: config.train has no field 'total_stepz'. Did you mean ...'"""
  # ConfigDict raises KeyError("'<key>'\nDid you mean ...?"), re-raised as AttributeError(KeyError).
  text = next((e.args[0] for e in _chain(error)
               if isinstance(e, KeyError) and e.args and isinstance(e.args[0], str)), str(error))
  first, _, hint = text.partition('\n')
  try:
    key = ast.literal_eval(first)
  except (ValueError, SyntaxError):
    key = first
  for arg in argv:
    name = arg.split('=', 1)[0]
    if name.startswith('--config.') and str(key) in name.split('.')[1:]:
      parts = name[2:].split('.')
      parent = '.'.join(parts[:parts.index(str(key))])
      return _one_line(f'{arg}: {parent} has no field {key!r}. {hint}')
  return _one_line(f'unknown config field {key!r}. {hint}')


def _chain(error: BaseException):
  """`error`, then the exception it was raised from or while handling, and so on."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def _config_arg(argv: Sequence[str]) -> str:
  """--config's value as given (the last one, as absl takes it)."""
  value = ''
  for i, arg in enumerate(argv):
    if arg.startswith('--config='):
      value = arg[len('--config='):]
    elif arg == '--config' and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _config_file_message(error: OSError, argv: Sequence[str]) -> str:
  """ml_collections' "Failed loading config file ... Attempted [Relative path]: ... [Errno 2]
  No such file or directory: 'X'" (several lines) as its last line."""
  lines = [l.strip() for l in str(error).splitlines() if l.strip()]
  reason = lines[-1] if lines else error
  return f'--config={_config_arg(argv)}: cannot load the config file: {reason}'


def _check_config_file_loaded(argv: Sequence[str]) -> None:
  """ml_collections defers a config file that failed to load until the config is first read
  (which may be after minutes of setup): read it now."""
  if 'config' not in flags.FLAGS:
    return
  try:
    getattr(flags.FLAGS['config'].value, 'keys', None)  # a failed load raises OSError on access
  except OSError as e:
    _exit_with_usage_error(argv, _config_file_message(e, argv))
