"""The text tokenizer: a sentencepiece model, conversations into loss-masked ids, and training.

Two kinds of model load the same way:
  * an existing LLaMA/Vicuna `tokenizer.model`: unk 0, bos 1, eos 2 and no pad piece. `pad_id` is
    then 0: padding is always masked out by the batch's token_mask, so its id is never trained on
    or read. Task tags and `<image>` are plain text there and take several tokens each.
  * one trained here (`train`): unk 0, bos 1, eos 2, pad 3, then the task tags (tasks.TAGS) and the
    image placeholders as user-defined symbols, so each is always exactly one token; optionally
    every coordinate of a box dialect too (`coordinates`, e.g. geochat's '<0>' ... '<100>'), so a
    box is four tokens, each naming a place, instead of a digit string to spell. BPE, identity
    normalisation and kept whitespace (as LLaMA's), digits split one per token (counts, and box
    coordinates without coordinate tokens), and byte fallback when the 256 byte pieces fit in half
    the table, so that no character ever becomes unk. The tiny config's 256-entry table has no
    room for them: there, characters the training texts never showed become unk.

A conversation is encoded piece by piece (template.render), never as one string, so the loss mask
is exact and the template's `</s>` becomes the eos id instead of the text `<`, `/`, `s`, `>`. Each
piece is stripped of the whitespace at its ends (sentencepiece's dummy prefix `▁` stands for the
space at a piece boundary), which also makes a generation prompt ('... ASSISTANT:') exactly the
ids that precede the answer in training. The model places the image tokens before all text, so
the `<image>` line is cut out of the first human turn before tokenizing; the ids are text only and
`max_len` counts text tokens only.

Training is in memory and deterministic: one thread, every text in order (no sampling or
shuffling) and no output path inside the model proto, so the same texts give a byte-identical
model file wherever it is written.
"""
import hashlib
import io
import logging
import os
from typing import Any, Dict, Iterable, List, Mapping, MutableMapping, Optional, Sequence, Tuple

import numpy as np
import sentencepiece as spm

from skymoe_jax import storage
from skymoe_jax.data import boxes
from skymoe_jax.data import tasks
from skymoe_jax.data import template as tmpl

log = logging.getLogger(__name__)

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3   # of the models `train` writes
NUM_BYTES = 256


class TokenizeError(ValueError):
  """A conversation cannot be tokenized as it is (the message names the problem)."""


class Tokenizer:
  """A loaded sentencepiece model; picklable (it carries the model's bytes)."""

  def __init__(self, path):
    self.path = str(path)
    self._load(storage.path(path).read_bytes())  # bytes: a gs:// model loads as a local one

  @classmethod
  def from_bytes(cls, model: bytes, path: str = '') -> 'Tokenizer':
    tok = cls.__new__(cls)
    tok.path = path
    tok._load(model)
    return tok

  def _load(self, model: bytes):
    self.model_bytes = bytes(model)
    self._sp = spm.SentencePieceProcessor(model_proto=self.model_bytes)

  def __getstate__(self):
    return {'path': self.path, 'model_bytes': self.model_bytes}

  def __setstate__(self, state):
    self.path = state['path']
    self._load(state['model_bytes'])

  @property
  def vocab_size(self) -> int:
    return self._sp.get_piece_size()

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    # LLaMA's model has no pad piece (-1): any id does, padding is masked by token_mask.
    pad = self._sp.pad_id()
    return pad if pad >= 0 else 0

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def byte_fallback(self) -> bool:
    """Whether unknown characters become byte pieces (else unk)."""
    byte0 = self._sp.piece_to_id('<0x00>')
    return byte0 != self.unk_id and self._sp.is_byte(byte0)

  @property
  def model_hash(self) -> str:
    """First 12 hex digits of the sha256 of the model file (logged like the template hash)."""
    return hashlib.sha256(self.model_bytes).hexdigest()[:12]

  def id_to_piece(self, i: int) -> str:
    return self._sp.id_to_piece(int(i))

  def piece_to_id(self, piece: str) -> int:
    return self._sp.piece_to_id(piece)

  def encode(self, text: str) -> List[int]:
    """Ids of `text`, without bos or eos."""
    return self._sp.encode(text, out_type=int)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids` up to the first eos; bos and pad are dropped (with LLaMA's model pad is unk,
    which has no text anyway), and so are ids past the vocab (the model's embedding table may be
    larger than the tokenizer's vocab)."""
    out = []
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if i in (self.bos_id, self.pad_id) or not 0 <= i < self.vocab_size:
        continue
      out.append(i)
    return self._sp.decode(out)

  def _encode_pieces(self, template: tmpl.Template, conversations: Sequence[Mapping[str, Any]]
                     ) -> Tuple[List[int], List[bool]]:
    ids, mask = [self.bos_id], [False]
    for text, is_assistant, has_eos in _pieces(template, conversations):
      piece = self.encode(text) + ([self.eos_id] if has_eos else [])
      ids += piece
      mask += [is_assistant] * len(piece)
    return ids, mask

  def encode_conversation(self, template: tmpl.Template,
                          conversations: Sequence[Mapping[str, Any]], max_len: int
                          ) -> Tuple[np.ndarray, np.ndarray, Dict[str, int]]:
    """(ids int32[n], loss_mask bool[n], info) of a training conversation, n <= max_len.

    ids start with bos; loss_mask is True exactly on the assistant answers' tokens and their eos.
    info: 'length' before truncation, 'truncated' (that length if cut to max_len, else 0) and
    'loss_tokens' (after truncation; 0 means the sample teaches nothing).
    """
    if max_len < 1:
      raise ValueError(f'max_len must be >= 1, got {max_len}')
    ids, mask = self._encode_pieces(template, conversations)
    length = len(ids)
    ids, mask = ids[:max_len], mask[:max_len]
    info = {'length': length, 'truncated': length if length > max_len else 0,
            'loss_tokens': int(sum(mask))}
    return np.asarray(ids, np.int32), np.asarray(mask, np.bool_), info

  def encode_prompt(self, template: tmpl.Template, conversations: Sequence[Mapping[str, Any]]
                    ) -> np.ndarray:
    """Ids int32[n] of a generation prompt: the conversation so far, which ends on a human turn,
    then 'ASSISTANT:'. They equal the ids before that turn's answer in encode_conversation."""
    if not conversations or len(conversations) % 2 == 0:
      raise TokenizeError(f'a generation prompt must end on a human turn; it has '
                          f'{len(conversations or [])} turns')
    ids, _ = self._encode_pieces(template, conversations)
    return np.asarray(ids, np.int32)


def strip_image_placeholder(template: tmpl.Template, conversations: Sequence[Mapping[str, Any]]
                            ) -> List[Dict[str, Any]]:
  """A copy of the conversation without its image placeholder and the newline after it (or before
  it, when it ends the line), the first human turn's text stripped. The placeholder must occur
  exactly once, in the first human turn; otherwise TokenizeError."""
  ph = template.image_placeholder
  if not isinstance(conversations, (list, tuple)):
    return conversations  # render() reports it
  turns = [dict(turn) if isinstance(turn, Mapping) else turn for turn in conversations]
  for i, turn in enumerate(turns):
    value = turn.get('value') if isinstance(turn, dict) else None
    if i == 0 or not isinstance(value, str):
      continue  # render() reports malformed turns
    if ph in value:
      raise TokenizeError(f'turn {i} contains the image placeholder {ph!r}; only the first human '
                          'turn may (the image tokens come once, before all text)')
  first = turns[0].get('value') if turns and isinstance(turns[0], dict) else None
  if not isinstance(first, str):
    return turns
  count = first.count(ph)
  if count != 1:
    raise TokenizeError(f'the first human turn has {count} image placeholders {ph!r}, '
                        f'expected exactly 1: {first!r}')
  before, after = first.split(ph)
  if after.startswith('\n'):
    after = after[1:]
  elif before.endswith('\n'):
    before = before[:-1]
  turns[0]['value'] = (before + after).strip()
  return turns


def _pieces(template: tmpl.Template, conversations: Sequence[Mapping[str, Any]]
            ) -> List[Tuple[str, bool, bool]]:
  """(text to tokenize, is_assistant, ends with eos) per rendered piece; the template's eos
  string is cut off the text (it becomes the eos id) and the ends are stripped."""
  out = []
  for text, is_assistant in tmpl.render(template, strip_image_placeholder(template,
                                                                          conversations)):
    has_eos = bool(is_assistant and template.eos and text.endswith(template.eos))
    if has_eos:
      text = text[:len(text) - len(template.eos)]
    out.append((text.strip(), is_assistant, has_eos))
  return out


# ------------------------------------------------------------------------------------ training

def user_symbols(coordinates: str = '') -> List[str]:
  """The pieces a trained model keeps whole: every task tag, every template's placeholder and,
  when `coordinates` names a box dialect, each of its coordinate values (boxes.coordinate_pieces).
  """
  placeholders = sorted({t.image_placeholder for t in tmpl.TEMPLATES.values()})
  symbols = sorted(tasks.TAGS) + [p for p in placeholders if p not in tasks.TAGS]
  return symbols + (boxes.coordinate_pieces(coordinates) if coordinates else [])


def train(texts: Iterable[str], model_prefix: Optional[str], vocab_size: int, *,
          byte_fallback: Optional[bool] = None, character_coverage: float = 1.0,
          model_type: str = 'bpe', coordinates: str = '') -> Tokenizer:
  """Trains a model on `texts` (in order) with at most `vocab_size` pieces; writes
  `model_prefix`.model unless model_prefix is None.

  byte_fallback=None turns it on when the 256 byte pieces take at most half the table.
  coordinates: a box dialect whose coordinate values become one piece each ('' = none). The
  vocab may come out smaller than asked (hard_vocab_limit off: a small corpus runs out of merges),
  never larger, so it always fits the model's embedding table.
  """
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError('no texts to train the tokenizer on')
  symbols = user_symbols(coordinates)
  if byte_fallback is None:
    byte_fallback = vocab_size >= 2 * NUM_BYTES
  writer = io.BytesIO()
  try:
    with open(os.devnull, 'w') as devnull:  # the trainer logs every step to stderr
      spm.SentencePieceTrainer.train(
          logstream=devnull, sentence_iterator=iter(texts), model_writer=writer,
          model_type=model_type, vocab_size=vocab_size, hard_vocab_limit=False,
          character_coverage=character_coverage, byte_fallback=byte_fallback,
          unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID,
          user_defined_symbols=symbols, split_digits=True,
          normalization_rule_name='identity', remove_extra_whitespaces=False,
          add_dummy_prefix=True,
          # Determinism: every sentence, in order, on one thread.
          num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
          max_sentence_length=1 << 16)
  except RuntimeError as e:
    raise ValueError(
        f'sentencepiece training failed with vocab_size={vocab_size}, '
        f'byte_fallback={byte_fallback}, {len(symbols)} user symbols, {len(texts)} texts: {e} '
        '(a larger vocab_size, byte_fallback=False or a lower character_coverage may help)'
    ) from None
  tok = Tokenizer.from_bytes(writer.getvalue())
  assert tok.vocab_size <= vocab_size, (tok.vocab_size, vocab_size)
  if model_prefix is not None:
    path = storage.path(str(model_prefix) + '.model')
    path.parent.mkdir(parents=True, exist_ok=True)
    # concurrent writers (one per host) never leave a half-written file
    storage.write_bytes_atomically(path, tok.model_bytes)
    tok.path = str(path)
  return tok


def template_texts(template: tmpl.Template) -> List[str]:
  """The template's fixed strings: system prompt and role prefixes."""
  return [template.system.strip(),
          (template.user_role + template.role_sep).strip(),
          (template.assistant_role + template.role_sep).strip()]


def conversation_texts(template: tmpl.Template, conversations: Sequence[Mapping[str, Any]]
                       ) -> List[str]:
  """The texts encode_conversation tokenizes for this conversation, piece by piece."""
  return [text for text, _, _ in _pieces(template, conversations) if text]


def texts_from_records(data_dir, split: str = 'train',
                       template: tmpl.Template = tmpl.LLAVA_V1,
                       skipped: Optional[MutableMapping[str, int]] = None) -> List[str]:
  """The template's fixed strings, then each record's pieces as encode_conversation sees them
  (all turns, tags kept, placeholder cut), so the system prompt and role names count as often
  as they occur in training.

  A record the pipeline would skip is skipped here too, not fatal: an unreadable one
  (`unreadable_record`) or one whose conversation the template rejects (`malformed_conversation`,
  the pipeline's counter names). Each is logged as a warning naming the shard, the record and the
  field, and counted into `skipped` ({reason: count}, updated in place) when it is given.
  """
  from skymoe_jax.data import records  # tensorflow, only needed here
  texts = template_texts(template)
  counts = skipped if skipped is not None else {}
  reader = records.open_split(data_dir, split)
  try:
    for i in range(len(reader)):
      try:
        record = reader.record(i)
      except records.RecordError as e:  # its message names the file, the record and the field
        log.warning('tokenizer texts: skipped unreadable_record: %s', e)
        counts['unreadable_record'] = counts.get('unreadable_record', 0) + 1
        continue
      try:
        texts += conversation_texts(template, record.conversations)
      except ValueError as e:  # ConversationError, TokenizeError
        log.warning('tokenizer texts: skipped malformed_conversation: %s (id %r): field '
                    'conversations: %s', reader.where(i), record.id, e)
        counts['malformed_conversation'] = counts.get('malformed_conversation', 0) + 1
  finally:
    reader.close()
  return texts


def ensure(prefix, data_dirs: Sequence, vocab_size: int, split: str = 'train',
           template: tmpl.Template = tmpl.LLAVA_V1, coordinates: str = '') -> Tokenizer:
  """The tokenizer at PREFIX.model, trained on the records of `data_dirs` if it is missing
  (with `coordinates`' values as single pieces, see train)."""
  if isinstance(data_dirs, (str, os.PathLike)):
    data_dirs = [data_dirs]
  path = storage.path(str(prefix) + '.model')
  if path.exists():
    tok = Tokenizer(path)
  else:
    texts = [t for d in data_dirs for t in texts_from_records(d, split, template)]
    tok = train(texts, prefix, vocab_size, coordinates=coordinates)
  if tok.vocab_size > vocab_size:
    raise ValueError(f'{path}: the tokenizer has {tok.vocab_size} pieces, more than the model\'s '
                     f'vocab_size {vocab_size}')
  return tok
