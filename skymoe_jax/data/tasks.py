"""The task-tag registry: prompt tags (and untagged prompts) -> (task, granularity) for the router.

TASKS and GRANULARITIES are the router's vocabularies (config.py sizes the router from
them); ids are indices into these tuples. Granularity (docs/design.md section 4): global for scene classification and captioning, local
for grounding, counting and attribute VQA, mixed for other VQA.

Tags are looked up at the start of the human turn, after an optional `<image>` line:
  GeoChat  [grounding] [refer] -> grounding      [identify] -> vqa, local (a question about a region)
  VHM      {CLS} -> scene_classification   {VQA} -> vqa   {VG} -> grounding
           {IDK} -> vqa (questions that may have no answer)   {IT} -> scene_classification
           (image-type/modality of the whole image: a global classification)
  LHRS     [VG] [CLS] [VQA] as the VHM tags, [Identify] as GeoChat's [identify]
An exact tag is looked up first, then case-insensitively within the same bracket style; any other
bracketed word at the start (`[foo]`, `{FOO}`) raises UnknownTagError.

Untagged prompts follow keyword rules, first match wins (whole words, case-insensitive):
  1. 'how many', 'count', 'number of'                            -> counting, local
  2. 'bounding box', 'locate', 'location of', 'where is',
     'coordinates', 'output the box'                             -> grounding, local
  3. 'describe', 'description', 'caption'                        -> captioning, global
  4. 'classify', 'scene', 'category', 'land use'                 -> scene_classification, global
  5. 'what colo(u)r', 'what size', 'what shape'                  -> vqa, local (attribute VQA)
  6. anything else                                               -> vqa, mixed
"""
import dataclasses
import re
from typing import Optional, Tuple

# The adaptive router's vocabularies (docs/design.md section 4).
TASKS = ('scene_classification', 'vqa', 'grounding', 'captioning', 'counting')
GRANULARITIES = ('global', 'local', 'mixed')


class UnknownTagError(ValueError):
  """A prompt starts with a bracketed tag that is not in the registry."""


# The granularity of each task when nothing more specific is known.
TASK_GRANULARITY = {
    'scene_classification': 'global',
    'captioning': 'global',
    'grounding': 'local',
    'counting': 'local',
    'vqa': 'mixed',
}
assert set(TASK_GRANULARITY) == set(TASKS), 'TASK_GRANULARITY must cover TASKS'
assert set(TASK_GRANULARITY.values()) <= set(GRANULARITIES)


@dataclasses.dataclass(frozen=True)
class TaskTag:
  tag: str            # as written, brackets included
  family: str         # geochat | vhm | lhrs
  task: str
  granularity: str

  @property
  def task_id(self) -> int:
    return TASKS.index(self.task)

  @property
  def granularity_id(self) -> int:
    return GRANULARITIES.index(self.granularity)


def _tag(tag: str, family: str, task: str, granularity: Optional[str] = None) -> TaskTag:
  return TaskTag(tag, family, task, granularity or TASK_GRANULARITY[task])


TAGS = {t.tag: t for t in (
    _tag('[grounding]', 'geochat', 'grounding'),
    _tag('[refer]', 'geochat', 'grounding'),
    _tag('[identify]', 'geochat', 'vqa', 'local'),
    _tag('{CLS}', 'vhm', 'scene_classification'),
    _tag('{VQA}', 'vhm', 'vqa'),
    _tag('{VG}', 'vhm', 'grounding'),
    _tag('{IDK}', 'vhm', 'vqa'),
    _tag('{IT}', 'vhm', 'scene_classification'),
    _tag('[VG]', 'lhrs', 'grounding'),
    _tag('[CLS]', 'lhrs', 'scene_classification'),
    _tag('[VQA]', 'lhrs', 'vqa'),
    _tag('[Identify]', 'lhrs', 'vqa', 'local'),
)}

# An optional image line, then optional spaces, then a bracketed word: [word] or {WORD}.
IMAGE_PREFIX = re.compile(r'^(\s*<image>[ \t]*\n?)?')
TAG_AT_START = re.compile(r'^\s*(\[[A-Za-z_]+\]|\{[A-Za-z_]+\})[ \t]*')

KEYWORD_RULES = (
    (r'how many|count|counts|number of', 'counting', 'local'),
    (r'bounding box(es)?|locate|location of|where is|coordinates?|output the box(es)?',
     'grounding', 'local'),
    (r'describe|description|caption', 'captioning', 'global'),
    (r'classify|scene|category|land use', 'scene_classification', 'global'),
    (r'what colou?r|what size|what shape', 'vqa', 'local'),
)


def task_id(task: str) -> int:
  return TASKS.index(task)


def granularity_id(granularity: str) -> int:
  return GRANULARITIES.index(granularity)


def lookup_tag(tag: str) -> TaskTag:
  """The registry entry of `tag` (brackets included): exact, else case-insensitive."""
  if tag in TAGS:
    return TAGS[tag]
  matches = {t for name, t in TAGS.items() if name.lower() == tag.lower()}
  if len({(t.task, t.granularity) for t in matches}) == 1:
    return next(iter(matches))
  raise UnknownTagError(f'unknown task tag {tag!r}; known tags: {sorted(TAGS)}')


def _split(prompt: str):
  """(image prefix, tag or None, rest) of a human turn."""
  prefix = IMAGE_PREFIX.match(prompt).group(0)
  rest = prompt[len(prefix):]
  m = TAG_AT_START.match(rest)
  if not m:
    return prefix, None, rest
  return prefix, m.group(1), rest[m.end():]


def strip_tag(prompt: str) -> str:
  """The prompt without its leading task tag (and the spaces after it); the image line stays."""
  prefix, tag, rest = _split(prompt)
  if tag is not None:
    lookup_tag(tag)  # unknown tags raise here too
  return prefix + rest


def classify_untagged(prompt: str) -> Tuple[str, str]:
  """(task, granularity) names of a prompt without a tag, by the module's keyword rules."""
  text = prompt.lower()
  for pattern, task, granularity in KEYWORD_RULES:
    if re.search(r'\b(?:' + pattern + r')\b', text):
      return task, granularity
  return 'vqa', 'mixed'


def classify(prompt: str) -> Tuple[int, int, Optional[str]]:
  """(task_id, granularity_id, tag or None) of a human turn's text."""
  _, tag, rest = _split(prompt)
  if tag is not None:
    t = lookup_tag(tag)
    return t.task_id, t.granularity_id, tag
  task, granularity = classify_untagged(rest)
  return task_id(task), granularity_id(granularity), None
