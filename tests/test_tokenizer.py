"""The tokenizer: training on a small chat corpus, its special pieces, and conversations into
loss-masked ids (checked by decoding the masked tokens back to the answers)."""
import io
import json
import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm

from skymoe_jax.data import builders
from skymoe_jax.data import records
from skymoe_jax.data import tasks
from skymoe_jax.data import template as tmpl
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.data.tokenizer import TokenizeError, Tokenizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
T = tmpl.LLAVA_V1

_OBJECTS = ('airplane', 'storage tank', 'ship', 'tennis court', 'baseball field', 'vehicle',
            'bridge', 'harbor', 'ground track field', 'windmill')
_SCENES = ('airport', 'dense residential', 'farmland', 'forest', 'harbor', 'industrial area')


def _conversation(rng: random.Random, turns: int = 1):
  """A GeoChat-style conversation of `turns` rounds with a task tag, boxes and counts."""
  conv = []
  for k in range(turns):
    obj = rng.choice(_OBJECTS)
    kind = rng.randrange(4)
    if kind == 0:
      box = '{' + ''.join(f'<{rng.randint(0, 100)}>' for _ in range(4)) + '}'
      q, a = f'[refer] Where is the {obj}?', f'The {obj} is at {box}.'
    elif kind == 1:
      q, a = f'{{VQA}} How many {obj}s are there?', str(rng.randint(0, 40))
    elif kind == 2:
      q, a = '[CLS] Classify the scene of this image.', rng.choice(_SCENES).title()
    else:
      q, a = '{VG} Describe the image.', f'An aerial view of a {rng.choice(_SCENES)} with {obj}s.'
    conv.append({'from': 'human', 'value': ('<image>\n' if k == 0 else '') + q})
    conv.append({'from': 'gpt', 'value': a})
  return conv


def _corpus():
  rng = random.Random(0)
  convs = [_conversation(rng, turns=1 + i % 3) for i in range(120)]
  return tokenizer_lib.template_texts(T) + [
      t for c in convs for t in tokenizer_lib.conversation_texts(T, c)]


@pytest.fixture(scope='module')
def corpus():
  return _corpus()


@pytest.fixture(scope='module')
def tok(corpus):
  return tokenizer_lib.train(corpus, None, 1024)


def _answers_from_mask(tok, ids, mask):
  """The decoded answers carried by the loss mask, split at its eos ids."""
  answers, current = [], []
  for i in ids[mask]:
    if i == tok.eos_id:
      answers.append(tok.decode(current))
      current = []
    else:
      current.append(int(i))
  assert not current, 'masked tokens after the last eos'
  return answers


# ---------------------------------------------------------------------------- training

def test_special_ids_and_single_piece_symbols(tok):
  assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2, 3)
  assert tok.id_to_piece(tok.pad_id) == '<pad>'
  for symbol in list(tasks.TAGS) + [T.image_placeholder]:
    sid = tok.piece_to_id(symbol)
    assert sid != tok.unk_id and tok.id_to_piece(sid) == symbol
    ids = tok.encode(f'{symbol} where is it')
    assert sid in ids and tok.decode(ids) == f'{symbol} where is it'
  # Digits are one token each (boxes and counts).
  assert [tok.id_to_piece(i) for i in tok.encode('<12>')][-3:-1] == ['1', '2']


def test_coordinate_tokens_make_each_box_value_one_piece(corpus, tok):
  coords = tokenizer_lib.train(corpus, None, 1024, coordinates='geochat')
  for v in range(101):
    ids = coords.encode(f'<{v}>')
    assert [coords.id_to_piece(i) for i in ids][-1] == f'<{v}>', v
  box = '{<7><30><100><0>|<45>}'
  ids = coords.encode(f'It is at {box}.')
  assert coords.decode(ids) == f'It is at {box}.'
  pieces = [coords.id_to_piece(i) for i in ids]
  assert pieces[pieces.index('<7>'):pieces.index('<7>') + 4] == ['<7>', '<30>', '<100>', '<0>']
  # Counts and other numbers still spell one digit per token; without coordinate tokens a box
  # value is spelt too.
  assert [coords.id_to_piece(i) for i in coords.encode('37 cars')][:3] == ['▁', '3', '7']
  assert len(tok.encode('<37>')) > len(coords.encode('<37>'))
  with pytest.raises(ValueError, match="'vhm' writes its values inside a list"):
    tokenizer_lib.train(corpus, None, 1024, coordinates='vhm')


def test_training_is_deterministic(corpus, tmp_path):
  a = tokenizer_lib.train(corpus, str(tmp_path / 'a' / 'tok'), 1024)
  b = tokenizer_lib.train(list(corpus), str(tmp_path / 'b'), 1024)
  bytes_a = (tmp_path / 'a' / 'tok.model').read_bytes()
  assert bytes_a == (tmp_path / 'b.model').read_bytes() == a.model_bytes
  assert a.model_hash == b.model_hash and a.path == str(tmp_path / 'a' / 'tok.model')
  assert Tokenizer(a.path).model_bytes == bytes_a
  c = tokenizer_lib.train(corpus[:-5], None, 1024)
  assert c.model_bytes != bytes_a


@pytest.mark.parametrize('vocab_size,byte_fallback', [(256, False), (1024, True), (8000, True)])
def test_vocab_fits_the_requested_size(corpus, vocab_size, byte_fallback):
  tok = tokenizer_lib.train(corpus, None, vocab_size)
  assert tok.vocab_size <= vocab_size
  assert tok.byte_fallback == byte_fallback
  assert tok.piece_to_id('[refer]') != tok.unk_id
  if vocab_size == 256:
    assert tok.vocab_size == 256  # BPE fills a small table
  for text in corpus[:50]:
    ids = tok.encode(text)
    assert tok.unk_id not in ids and tok.decode(ids) == text


def test_too_small_vocab_is_a_clear_error(corpus):
  with pytest.raises(ValueError, match='vocab_size=40'):
    tokenizer_lib.train(corpus, None, 40)
  with pytest.raises(ValueError, match='no texts'):
    tokenizer_lib.train([], None, 256)


# ---------------------------------------------------------------------------- encode / decode

@pytest.mark.parametrize('text', [
    'The storage tank is at {<12><34><56><78>}.',
    '  two  spaces and a\nnewline\ttab ',
    'unseen characters: ü, 中文, 🚀, ~|',
    '',
])
def test_round_trip(tok, text):
  ids = tok.encode(text)
  assert tok.bos_id not in ids and tok.eos_id not in ids and tok.unk_id not in ids
  assert tok.decode(ids) == text


def test_decode_stops_at_eos_and_drops_bos_pad_and_ids_past_the_vocab(tok):
  a, b = tok.encode('a ship'), tok.encode('a bridge')
  assert tok.decode([tok.bos_id] + a + [tok.pad_id, tok.eos_id] + b) == 'a ship'
  assert tok.decode(np.asarray(a + [tok.vocab_size + 5], np.int32)) == 'a ship'
  # The template's eos string in text is text, never the eos id.
  ids = tok.encode('Yes</s>')
  assert tok.eos_id not in ids and tok.decode(ids) == 'Yes</s>'


def test_pickle(tok):
  again = pickle.loads(pickle.dumps(tok))
  assert again.model_bytes == tok.model_bytes
  assert again.encode('[VG] a windmill') == tok.encode('[VG] a windmill')


# ---------------------------------------------------------------------------- conversations

def test_encode_conversation_single_turn(tok):
  conv = [{'from': 'human', 'value': '<image>\n[refer] Where is the ship?'},
          {'from': 'gpt', 'value': 'The ship is at {<10><20><30><40>}.'}]
  ids, mask, info = tok.encode_conversation(T, conv, max_len=512)
  assert ids.dtype == np.int32 and mask.dtype == np.bool_ and ids.shape == mask.shape
  assert ids[0] == tok.bos_id and not mask[0]
  assert ids[-1] == tok.eos_id and mask[-1]
  assert list(ids).count(tok.eos_id) == 1  # </s> became the eos id, not text
  assert _answers_from_mask(tok, ids, mask) == ['The ship is at {<10><20><30><40>}.']
  # The loss mask is one contiguous run: exactly the answer and its eos.
  start = int(np.argmax(mask))
  assert mask[start:].all() and not mask[:start].any()
  assert list(ids[start:-1]) == tok.encode('The ship is at {<10><20><30><40>}.')
  # The prompt: the <image> line is gone, the tag is one token.
  prompt = tok.decode(ids[:start])
  assert prompt == T.system + ' USER: [refer] Where is the ship? ASSISTANT:'
  assert T.image_placeholder not in prompt
  assert tok.piece_to_id('[refer]') in ids[:start]
  assert tok.piece_to_id(T.image_placeholder) not in ids
  assert info == {'length': len(ids), 'truncated': 0, 'loss_tokens': int(mask.sum())}
  # The generation prompt is exactly the ids before the answer.
  np.testing.assert_array_equal(tok.encode_prompt(T, conv[:1]), ids[:start])


def test_encode_conversation_multi_turn(tok):
  conv = [{'from': 'human', 'value': '<image>\n{VQA} How many ships are there?'},
          {'from': 'gpt', 'value': '12'},
          {'from': 'human', 'value': '[refer] Where is the largest ship?'},
          {'from': 'gpt', 'value': 'It is at {<5><6><70><80>}.'},
          {'from': 'human', 'value': '[CLS] Classify the scene.'},
          {'from': 'gpt', 'value': 'Harbor'}]
  ids, mask, info = tok.encode_conversation(T, conv, max_len=1024)
  answers = [turn['value'] for turn in conv[1::2]]
  assert _answers_from_mask(tok, ids, mask) == answers
  eos_at = np.flatnonzero(ids == tok.eos_id)
  assert len(eos_at) == 3 and mask[eos_at].all()
  # Three masked runs, each ending on an eos.
  runs = np.flatnonzero(np.diff(mask.astype(np.int8)) == -1)
  np.testing.assert_array_equal(runs, eos_at[:-1])
  assert info['loss_tokens'] == int(mask.sum()) and not info['truncated']
  # Prompts for the second and third answers are prefixes of the training ids.
  for turns, end in ((3, eos_at[0] + 1), (5, eos_at[1] + 1)):
    prompt = tok.encode_prompt(T, conv[:turns])
    np.testing.assert_array_equal(prompt, ids[:len(prompt)])
    assert not mask[end:len(prompt)].any()
    assert tok.decode(prompt[end:]) == f'USER: {conv[turns - 1]["value"]} ASSISTANT:'
  with pytest.raises(TokenizeError, match='human turn'):
    tok.encode_prompt(T, conv[:2])


def test_truncation_is_reported(tok):
  rng = random.Random(3)
  conv = _conversation(rng, turns=3)
  full, full_mask, info = tok.encode_conversation(T, conv, max_len=4096)
  assert info['truncated'] == 0
  ids, mask, info = tok.encode_conversation(T, conv, max_len=40)
  assert len(ids) == 40 and info == {'length': len(full), 'truncated': len(full),
                                     'loss_tokens': int(full_mask[:40].sum())}
  np.testing.assert_array_equal(ids, full[:40])
  np.testing.assert_array_equal(mask, full_mask[:40])
  _, _, info = tok.encode_conversation(T, conv, max_len=len(full))
  assert info['truncated'] == 0


@pytest.mark.parametrize('first', [
    '<image>\n[refer] Where is it?', '<image>[refer] Where is it?', '[refer] Where is it?\n<image>',
    '  <image>\n[refer] Where is it?'])
def test_placeholder_is_removed_wherever_it_sits(tok, first):
  conv = [{'from': 'human', 'value': first}, {'from': 'gpt', 'value': 'Here.'}]
  ids, mask, _ = tok.encode_conversation(T, conv, max_len=512)
  assert tok.decode(ids[~mask]) == T.system + ' USER: [refer] Where is it? ASSISTANT:'


@pytest.mark.parametrize('conv,match', [
    ([{'from': 'human', 'value': 'No image here.'}, {'from': 'gpt', 'value': 'Ok.'}],
     'first human turn has 0'),
    ([{'from': 'human', 'value': '<image>\n<image>\nTwo?'}, {'from': 'gpt', 'value': 'Ok.'}],
     'first human turn has 2'),
    ([{'from': 'human', 'value': '<image>\nQ?'}, {'from': 'gpt', 'value': 'See <image>.'}],
     'turn 1 contains'),
    ([{'from': 'human', 'value': '<image>\nQ?'}, {'from': 'gpt', 'value': 'A.'},
      {'from': 'human', 'value': '<image>\nAgain?'}, {'from': 'gpt', 'value': 'B.'}],
     'turn 2 contains'),
])
def test_placeholder_errors(tok, conv, match):
  with pytest.raises(TokenizeError, match=match):
    tok.encode_conversation(T, conv, max_len=512)
  with pytest.raises(TokenizeError):
    tokenizer_lib.conversation_texts(T, conv)
  assert issubclass(TokenizeError, ValueError)


def test_malformed_conversation_is_a_value_error(tok):
  with pytest.raises(ValueError, match='turn 1'):
    tok.encode_conversation(T, [{'from': 'human', 'value': '<image>\nQ'},
                                {'from': 'human', 'value': 'Q'}], max_len=64)
  for bad in (None, [], [{'from': 'human'}], [{'from': 'robot', 'value': '<image>\nQ'}]):
    with pytest.raises(ValueError):
      tok.encode_conversation(T, bad, max_len=64)


def test_llama_style_model_without_pad_or_symbols(corpus, tmp_path):
  """An existing LLaMA/Vicuna model: unk 0, bos 1, eos 2, no pad, tags are plain text."""
  writer = io.BytesIO()
  with open(os.devnull, 'w') as devnull:
    spm.SentencePieceTrainer.train(
        logstream=devnull, sentence_iterator=iter(corpus), model_writer=writer, vocab_size=400,
        model_type='bpe', hard_vocab_limit=False, character_coverage=1.0, byte_fallback=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, normalization_rule_name='identity',
        remove_extra_whitespaces=False, num_threads=1)
  (tmp_path / 'tokenizer.model').write_bytes(writer.getvalue())
  tok = Tokenizer(tmp_path / 'tokenizer.model')
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 0)
  assert len(tok.encode('[refer]')) > 1
  conv = [{'from': 'human', 'value': '<image>\n[refer] Where is the ship?'},
          {'from': 'gpt', 'value': 'The ship is at {<10><20><30><40>}.'}]
  ids, mask, _ = tok.encode_conversation(T, conv, max_len=512)
  assert ids[0] == 1 and ids[-1] == 2 and list(ids).count(2) == 1
  assert _answers_from_mask(tok, ids, mask) == [conv[1]['value']]
  assert tok.decode(ids[~mask]) == T.system + ' USER: [refer] Where is the ship? ASSISTANT:'


# ---------------------------------------------------------------------------- records, ensure, CLI

def _write_records(out_dir, n=40, seed=0):
  rng = random.Random(seed)
  builders.write_records(out_dir, {'train': [
      records.Record(id=f'r{i}', image=b'not decoded here',
                     conversations=_conversation(rng, turns=1 + i % 2), task='vqa',
                     granularity='mixed') for i in range(n)]}, licence='CC0')


def test_texts_from_records_and_ensure(tmp_path, monkeypatch):
  _write_records(tmp_path / 'a', seed=0)
  _write_records(tmp_path / 'b', seed=1)
  texts = tokenizer_lib.texts_from_records(tmp_path / 'a', 'train')
  assert texts[:3] == [T.system, 'USER:', 'ASSISTANT:']
  # The system prompt opens each record's first piece, so it counts once per record.
  assert sum(t.startswith(T.system + ' USER: ') for t in texts) == 40
  assert not any('<image>' in t or t.endswith('</s>') for t in texts)
  assert any(t.startswith('USER: [refer] Where is the') for t in texts)

  prefix = tmp_path / 'tok' / 'demo'
  tok = tokenizer_lib.ensure(prefix, [tmp_path / 'a', tmp_path / 'b'], 1024)
  assert tok.path == str(prefix) + '.model' and tok.vocab_size <= 1024

  def no_training(*args, **kwargs):
    raise AssertionError('ensure retrained an existing model')
  monkeypatch.setattr(tokenizer_lib, 'train', no_training)
  again = tokenizer_lib.ensure(prefix, [tmp_path / 'a', tmp_path / 'b'], 1024)
  assert again.model_bytes == tok.model_bytes
  with pytest.raises(ValueError, match='more than'):
    tokenizer_lib.ensure(prefix, [tmp_path / 'a'], 256)


def test_a_run_trains_its_tokenizer_with_the_configs_coordinate_tokens(tmp_path):
  from conftest import load_config
  from skymoe_jax import config as config_lib
  from skymoe_jax import workdir as workdir_lib
  _write_records(tmp_path / 'a', seed=0)
  config = load_config('tiny')
  config.data.sources = {'a': dict(data_dir=str(tmp_path / 'a'), split='train', weight=1.0)}
  config.data.update(tokenizer='', tokenizer_vocab_size=1024, tokenizer_coordinates='geochat')
  config.train.init_from = ''
  tok = workdir_lib.prepare_tokenizer(config, tmp_path / 'run')
  assert [tok.id_to_piece(i) for i in tok.encode('{<37><5><100><0>}')][1:5] == [
      '<37>', '<5>', '<100>', '<0>']
  config.data.tokenizer_coordinates = 'vhm'
  with pytest.raises(config_lib.ConfigError,
                     match="config.data.tokenizer_coordinates='vhm': box dialect 'vhm' writes"):
    workdir_lib.prepare_tokenizer(config, tmp_path / 'other_run')


def test_cli(tmp_path):
  _write_records(tmp_path / 'a', seed=0)
  _write_records(tmp_path / 'b', seed=1)
  out = tmp_path / 'out' / 'tok'
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, 'data_prep', 'train_tokenizer.py'),
       f'--data_dir={tmp_path / "a"}', f'--data_dir={tmp_path / "b"}', f'--out={out}',
       '--vocab_size=1024'],
      capture_output=True, text=True, cwd=REPO, timeout=120,
      env={**os.environ, 'TF_CPP_MIN_LOG_LEVEL': '3'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  tok = Tokenizer(str(out) + '.model')
  assert summary['model'] == str(out) + '.model'
  assert summary['vocab_size'] == tok.vocab_size <= 1024
  assert summary['model_hash'] == tok.model_hash
  texts = (tokenizer_lib.texts_from_records(tmp_path / 'a', 'train') +
           tokenizer_lib.texts_from_records(tmp_path / 'b', 'train'))
  assert summary['texts'] == len(texts)
  # The CLI's model is the one the library trains on the same texts.
  assert tokenizer_lib.train(texts, None, 1024).model_bytes == tok.model_bytes
