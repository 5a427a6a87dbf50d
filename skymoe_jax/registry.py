"""One idiom for every named choice: a `name -> implementation` dict in the module that owns the
choice, read through `lookup`.

  BACKENDS = {'loop': loop_backend, 'dense': dense_backend, ...}          # model/moe/backends.py
  backend = registry.lookup(BACKENDS, name, 'config.model.moe.backend', 'MoE backend')

MoE backends, expert-parallel strategies, remat policies, evaluators, box dialects, chat
templates and CDA edits are all found this way, so a bad name fails the same way everywhere:
an UnknownChoiceError naming where the name came from and the names that exist. This is the
project's lowest module (every layer may use it); ConfigError lives here for the same reason.
"""
from typing import Mapping, TypeVar

T = TypeVar('T')


class ConfigError(ValueError):
  """A config field has a bad value; the message names the field."""


class UnknownChoiceError(ConfigError, KeyError):
  """A name that is not in its registry: a bad config value and a missing key alike."""

  def __str__(self):
    return str(self.args[0])  # KeyError would quote the message


def lookup(table: Mapping[str, T], name: str, field: str, kind: str) -> T:
  """table[name]; else UnknownChoiceError("<field>='<name>': unknown <kind>; known: [...]").

  field: where the name came from ('config.model.moe.backend', 'task'); kind: what the table
  holds ('MoE backend').
  """
  try:
    return table[name]
  except (KeyError, TypeError):
    raise UnknownChoiceError(f'{field}={name!r}: unknown {kind}; known {kind}s: '
                             f'{sorted(table)}') from None
