"""The one command-line convention every runnable thing follows:

  python -m skymoe_jax.<verb> --config=FILE[:ARG] --workdir=DIR [--config.FIELD=VALUE ...]

FILE is a Python config file whose get_config(ARG) returns the config (configs/); any field is
overridden as --config.FIELD=VALUE (ml_collections' config flags: values are typed like the
field). Commands whose workdir already holds the run's config (chat, export) take --workdir
alone. launch/ and data_prep/ scripts take the same --config / override forms where they take
a config (config.load reads them exactly as these flags do).
"""
from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags


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
