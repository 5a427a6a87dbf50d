"""Reliability of evaluation, chat and the command line: nothing a user has is lost or silently
wrong. Answers are reused only under the settings that made them; a run killed mid-write resumes;
a bad image or a typo'd override is one clear line before anything slow happens."""
import dataclasses
import json
import logging
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, train_tiny_run
from skymoe_jax.data import template as template_lib
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.evaluation import chat, runner


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny MoE model trained for two steps, and its config."""
  return train_tiny_run(tmp_path_factory.mktemp('faults_evaluation'), max_samples=4, max_new_tokens=6,
                        batch_size=4)


@pytest.fixture(scope='module')
def evaluated(run):
  """The run evaluated once with its settings, and a copy of that eval/<step>/ folder."""
  config, workdir = run
  report = runner.evaluate(config, workdir)
  snapshot = workdir.parent / 'evaluated'
  shutil.copytree(report['dir'], snapshot)
  return config, workdir, snapshot


@pytest.fixture
def fresh(evaluated):
  """The run with only that first evaluation in eval/2/."""
  config, workdir, snapshot = evaluated
  shutil.rmtree(workdir / 'eval', ignore_errors=True)
  shutil.copytree(snapshot, workdir / 'eval' / '2')
  return config.copy_and_resolve_references(), workdir


@pytest.fixture
def generate_calls(monkeypatch):
  """How many batches evaluate() generated since the test began."""
  calls = []
  make = runner.generate_lib.make_generate_fn

  def counting(*args, **kwargs):
    fn = make(*args, **kwargs)

    def generate(*a, **k):
      calls.append(1)
      return fn(*a, **k)
    return generate
  monkeypatch.setattr(runner.generate_lib, 'make_generate_fn', counting)
  return calls


def _with(config, **eval_fields):
  c = config.copy_and_resolve_references()
  c.eval.update(eval_fields)
  return c


# --- the answer cache is keyed by the generation settings ---------------------------------------

def test_answer_settings_key_every_setting_but_batch_size(run):
  config, workdir = run
  template = template_lib.get_template(config.data.template)
  tok = tokenizer_lib.Tokenizer(workdir / 'tokenizer.model').model_hash
  base = runner.answer_settings(config, template, tok)
  assert base == runner.answer_settings(_with(config, batch_size=1), template, tok)
  other = config.copy_and_resolve_references()
  other.data.template = next(n for n in template_lib.TEMPLATES if n != config.data.template)
  changed = [
      runner.answer_settings(_with(config, max_new_tokens=3), template, tok),
      runner.answer_settings(_with(config, temperature=0.7), template, tok),
      runner.answer_settings(_with(config, top_p=0.5), template, tok),
      runner.answer_settings(other, template_lib.get_template(other.data.template), tok),
      runner.answer_settings(config, dataclasses.replace(template, system='Answer briefly.'), tok),
      runner.answer_settings(config, template, 'f' * 12),
  ]
  for settings in changed:
    assert runner.settings_hash(settings) != runner.settings_hash(base), settings


def test_other_generation_settings_do_not_reuse_answers(fresh, generate_calls, caplog):
  config, workdir = fresh
  out = workdir / 'eval' / '2'
  first = (out / 'answers.jsonl').read_text()
  assert json.loads((out / 'settings.json').read_text())['settings']['max_new_tokens'] == 6

  # Other settings: answered afresh, the earlier answers kept aside (not mixed, not lost).
  with caplog.at_level(logging.WARNING):
    shorter = runner.evaluate(_with(config, max_new_tokens=3), workdir)
  assert generate_calls, 'answers made with max_new_tokens=6 were reused for max_new_tokens=3'
  assert shorter['settings']['max_new_tokens'] == 3
  assert json.loads((out / 'settings.json').read_text())['settings']['max_new_tokens'] == 3
  kept = list(out.glob('settings-*/answers.jsonl'))
  assert len(kept) == 1 and kept[0].read_text() == first
  assert any(str(kept[0].parent) in r.getMessage() for r in caplog.records)
  rows = [json.loads(l) for l in (out / 'answers.jsonl').read_text().splitlines()]
  assert len(rows) == len({r['question_id'] for r in rows}) == len(first.splitlines())

  # Batch size does not change greedy answers (tests/test_generate.py), so it reuses them.
  generate_calls.clear()
  runner.evaluate(_with(config, max_new_tokens=3, batch_size=2), workdir)
  assert not generate_calls

  # Back to the first settings: their answers come back, nothing generated.
  again = runner.evaluate(config, workdir)
  assert not generate_calls
  assert (out / 'answers.jsonl').read_text() == first
  assert again['settings']['max_new_tokens'] == 6
  assert len(list(out.glob('settings-*/answers.jsonl'))) == 1  # the max_new_tokens=3 ones


def test_answers_of_unknown_settings_are_kept_aside_not_reused(tmp_path, run):
  """answers.jsonl without settings.json (written before settings were recorded)."""
  config, workdir = run
  template = template_lib.get_template(config.data.template)
  settings = runner.answer_settings(config, template, 'a' * 12)
  (tmp_path / 'answers.jsonl').write_text('{"question_id": "q", "answer": "old"}\n')
  (tmp_path / 'metrics.json').write_text('{}\n')
  runner.use_settings(tmp_path, settings)
  assert not (tmp_path / 'answers.jsonl').exists() and not (tmp_path / 'metrics.json').exists()
  assert (tmp_path / 'settings-unknown' / 'answers.jsonl').read_text() == (
      '{"question_id": "q", "answer": "old"}\n')
  assert json.loads((tmp_path / 'settings.json').read_text())['settings'] == settings


# --- a run killed mid-write ---------------------------------------------------------------------

def test_partial_last_line_is_dropped_with_a_warning(fresh, generate_calls, caplog):
  """A run killed while writing its last row; also: the resumed run's routing.json covers every
  question, not only the one it answered."""
  config, workdir = fresh
  out = workdir / 'eval' / '2'
  report = json.loads((out / 'metrics.json').read_text())
  routing = json.loads((out / 'routing.json').read_text())
  path = out / 'answers.jsonl'
  full = path.read_text()
  n = len(full.splitlines())
  path.write_text(full[:-25])  # killed in the middle of writing the last row
  with caplog.at_level(logging.WARNING):
    again = runner.evaluate(config, workdir)
  assert any(str(path) in r.getMessage() and f'line {n}' in r.getMessage()
             for r in caplog.records), [r.getMessage() for r in caplog.records]
  assert len(generate_calls) == 1  # only the batch of the question whose row was cut
  rows = [json.loads(l) for l in path.read_text().splitlines()]
  assert sorted(rows, key=lambda r: r['question_id']) == sorted(
      (json.loads(l) for l in full.splitlines()), key=lambda r: r['question_id'])
  assert again['tasks'] == report['tasks']
  assert json.loads((out / 'routing.json').read_text()) == routing


def test_load_answers_names_a_corrupt_line(tmp_path, caplog):
  path = tmp_path / 'answers.jsonl'
  good = json.dumps({'question_id': 'a', 'answer': 'x'})
  path.write_text(good + '\n{"question_id": "b", "ans\n' + good.replace('"a"', '"c"') + '\n')
  with pytest.raises(ValueError, match=f'{path}: line 2'):
    runner.load_answers(path)
  # A cut last line (no newline after it) is what a kill leaves: dropped, the file repaired.
  path.write_text(good + '\n{"question_id": "b", "ans')
  with caplog.at_level(logging.WARNING):
    assert list(runner.load_answers(path)) == ['a']
  assert f'{path}: line 2' in caplog.text
  assert path.read_text() == good + '\n'
  # A complete last row whose newline was not written yet is kept.
  path.write_text(good)
  assert list(runner.load_answers(path)) == ['a'] and path.read_text() == good + '\n'


# --- chat ---------------------------------------------------------------------------------------

def _command(*argv, timeout=120):
  return subprocess.run([sys.executable, '-m', *argv], capture_output=True, text=True,
                        cwd=REPO, timeout=timeout)


def test_chat_checks_the_image_before_loading_the_model(tmp_path):
  """The workdir does not exist: a command that loaded the model first would fail on it."""
  image = tmp_path / 'garbage.png'
  image.write_bytes(b'not an image at all')
  r = _command('skymoe_jax.chat', f'--workdir={tmp_path / "no_run"}', f'--image={image}',
               '--prompt=How many ships?')
  assert r.returncode != 0
  assert 'Traceback' not in r.stderr, r.stderr
  assert f'--image: {image}: cannot decode' in r.stderr and 'config.json' not in r.stderr, r.stderr


def test_read_image_names_the_file(tmp_path):
  with pytest.raises(chat.ImageError, match=f'{tmp_path / "x.png"}: no such file'):
    chat.read_image(tmp_path / 'x.png')
  (tmp_path / 'bad.jpg').write_bytes(b'\xff\xd8 truncated jpeg')
  with pytest.raises(chat.ImageError, match=f'{tmp_path / "bad.jpg"}: cannot decode'):
    chat.read_image(tmp_path / 'bad.jpg')


def test_chat_answer_with_undecodable_bytes_is_a_clear_error(run):
  _, workdir = run
  bot = chat.Chat(workdir, max_new_tokens=2)
  with pytest.raises(chat.ImageError, match=r'image_bytes \(12 bytes, .*cannot decode'):
    bot.answer(b'not an image', 'How many ships are there?')
  with pytest.raises(TypeError, match='read_image'):
    bot.answer(str(workdir / 'x.png'), 'How many ships are there?')


# --- the command line ---------------------------------------------------------------------------

@pytest.mark.parametrize('argv, says', [
    (['--config.train.total_stepz=5'], 'Did you mean "total_steps"'),
    (['--config.trian.total_steps=5'], "'trian'"),
    (['--config.train.total_steps=five'], 'five'),
    (['--config.model.moe.backend=nope'], "config.model.moe.backend='nope'"),
])
def test_config_errors_are_one_line_without_traceback(argv, says):
  r = _command('skymoe_jax.summary', '--config=configs/tiny.py', *argv, timeout=60)
  assert r.returncode != 0
  assert 'Traceback' not in r.stderr, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and says in lines[0] and argv[0].split('=')[0][2:] in lines[0], r.stderr


@pytest.mark.parametrize('config_arg, says', [
    ('configs/tiny.py:bogus', "config argument 'bogus'"),
    ('configs/no_such_config.py', 'No such file'),
])
def test_config_file_errors_are_one_line_without_traceback(config_arg, says):
  r = _command('skymoe_jax.summary', f'--config={config_arg}', timeout=60)
  assert r.returncode != 0
  assert 'Traceback' not in r.stderr, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and says in lines[0] and config_arg in lines[0], r.stderr
