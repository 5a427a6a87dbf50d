"""Chat templates as named data, their rendering into loss-masked pieces, and their hash.

The GeoChat/LLaVA v1 template (docs/design.md section 4) renders a conversation as

  {system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>

(the human turn's text is used as written, so `<image>\\n` comes from the data). Loss falls only on
the assistant answers and their `</s>`; the `ASSISTANT: ` prefix is part of the prompt piece.
A conversation ending on a human turn renders a generation prompt ending in `ASSISTANT:`.

`template_hash` is logged next to every result: it changes whenever any field of the template does.
"""
import dataclasses
import hashlib
import json
from typing import Any, Dict, List, Mapping, Sequence, Tuple

from skymoe_jax import registry


class ConversationError(ValueError):
  """A conversation is malformed; the message names the index of the bad turn."""


@dataclasses.dataclass(frozen=True)
class Template:
  name: str
  system: str
  user_role: str = 'USER'
  assistant_role: str = 'ASSISTANT'
  role_sep: str = ': '          # between a role name and its text
  system_sep: str = ' '         # after the system text
  turn_sep: str = ' '           # after a human turn's text
  eos: str = '</s>'             # after an assistant answer (trained on)
  image_placeholder: str = '<image>'


LLAVA_V1 = Template(
    name='llava_v1',
    system=('A chat between a curious user and an artificial intelligence assistant. '
            "The assistant gives helpful, detailed, and polite answers to the user's questions."))

TEMPLATES: Dict[str, Template] = {LLAVA_V1.name: LLAVA_V1, 'geochat': LLAVA_V1}

HUMAN = 'human'
ASSISTANT = 'gpt'
SPEAKERS = {'human': HUMAN, 'gpt': ASSISTANT, 'bot': ASSISTANT}


def get_template(name: str) -> Template:
  return registry.lookup(TEMPLATES, name, 'config.data.template', 'chat template')


def template_hash(template: Template) -> str:
  """First 12 hex digits of the sha256 of the template's fields as canonical JSON."""
  canonical = json.dumps(dataclasses.asdict(template), sort_keys=True, separators=(',', ':'),
                         ensure_ascii=False)
  return hashlib.sha256(canonical.encode('utf-8')).hexdigest()[:12]


def _turns(conversations: Sequence[Mapping[str, Any]]) -> List[Tuple[str, str]]:
  """(speaker, text) of each turn, speakers normalised; raises ConversationError."""
  if not isinstance(conversations, (list, tuple)) or not conversations:
    raise ConversationError('conversation is empty (turn 0 missing)')
  turns = []
  for i, turn in enumerate(conversations):
    if not isinstance(turn, Mapping) or 'from' not in turn or 'value' not in turn:
      raise ConversationError(f'turn {i} is not a {{"from", "value"}} object: {turn!r}')
    if not isinstance(turn['from'], str):  # a list or dict is unhashable: no TypeError below
      raise ConversationError(f'turn {i} speaker ("from") is not a string: {turn["from"]!r}')
    speaker = SPEAKERS.get(turn['from'])
    if speaker is None:
      raise ConversationError(
          f'turn {i} has unknown speaker {turn["from"]!r}; expected one of {sorted(SPEAKERS)}')
    if not isinstance(turn['value'], str):
      raise ConversationError(f'turn {i} value is not a string: {turn["value"]!r}')
    expected = HUMAN if i % 2 == 0 else ASSISTANT
    if speaker != expected:
      raise ConversationError(
          f'turn {i} is from {turn["from"]!r} but turns must alternate human/assistant, '
          f'starting with human')
    turns.append((speaker, turn['value']))
  return turns


def render(template: Template, conversations: Sequence[Mapping[str, Any]]
           ) -> List[Tuple[str, bool]]:
  """The conversation as (text, is_assistant) pieces; concatenated they are the full text, and
  exactly the pieces with is_assistant=True (answers plus eos) carry the loss."""
  t = template
  pieces: List[Tuple[str, bool]] = []
  prompt = t.system + t.system_sep
  for speaker, text in _turns(conversations):
    if speaker == HUMAN:
      prompt += t.user_role + t.role_sep + text + t.turn_sep + t.assistant_role + t.role_sep
    else:
      pieces.append((prompt, False))
      pieces.append((text + t.eos, True))
      prompt = ''
  if prompt:  # ends on a human turn: a generation prompt, without the space after the role
    pieces.append((prompt[:len(prompt) - len(t.role_sep)] + t.role_sep.rstrip(), False))
  return pieces


def render_text(template: Template, conversations: Sequence[Mapping[str, Any]]) -> str:
  return ''.join(text for text, _ in render(template, conversations))
