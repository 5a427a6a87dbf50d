"""The evaluate command on a tiny trained checkpoint, resumability, the routing report, chat."""
import json

import numpy as np
import pytest

from conftest import train_tiny_run
from skymoe_jax.data import records, tasks
from skymoe_jax.evaluation import chat, runner


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """A tiny MoE model trained for two steps, and its config."""
  return train_tiny_run(tmp_path_factory.mktemp('evaluate'), max_samples=6, max_new_tokens=6,
                        batch_size=4)


def test_evaluate_writes_all_four_files(run):
  config, workdir = run
  report = runner.evaluate(config, workdir)
  out = workdir / 'eval' / '2'
  assert report['dir'] == str(out)
  for name in ('metrics.json', 'answers.jsonl', 'routing.json', 'routing.png'):
    assert (out / name).stat().st_size > 0, name
  answers = [json.loads(l) for l in (out / 'answers.jsonl').read_text().splitlines()]
  reader = records.open_split(config.data.sources.synthetic.data_dir, 'validation')
  assert len(answers) == min(len(reader), 6)
  assert all(set(a) >= {'question_id', 'answer'} for a in answers)
  metrics = json.loads((out / 'metrics.json').read_text())
  assert set(metrics['tasks']) == {a['task'] for a in answers}
  assert metrics['template_hash'] and metrics['tokenizer_hash']
  # The PNG is a real image: its signature, and matplotlib reads it back as pixels.
  assert (out / 'routing.png').read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
  import matplotlib.image  # pylint: disable=import-outside-toplevel
  pixels = matplotlib.image.imread(out / 'routing.png')
  assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.std() > 0
  routing = json.loads((out / 'routing.json').read_text())
  assert set(routing['layers']) == {f'layer_{i}' for i in config.model.moe.layers}
  for layer in routing['layers'].values():
    assert np.isclose(sum(layer['load']), 1.0, atol=1e-3)
    for cell, stats in layer['by_condition'].items():
      task, gran = cell.split('/')
      assert task in tasks.TASKS and gran in tasks.GRANULARITIES
      assert 0 <= stats['entropy'] <= np.log(config.model.moe.num_experts) + 1e-5
  assert routing['token_drop_rate'] == 0.0  # the tiny config routes dropless

  # Resumable: a second call answers nothing new and gives the same metrics.
  again = runner.evaluate(config, workdir)
  assert len((out / 'answers.jsonl').read_text().splitlines()) == len(answers)
  assert again['tasks'] == report['tasks']


def test_table_lists_every_task(run):
  config, workdir = run
  report = runner.evaluate(config, workdir)
  text = runner.table(report)
  for task in report['tasks']:
    assert task in text


def test_chat_answers_a_question(run):
  config, workdir = run
  record = records.open_split(config.data.sources.synthetic.data_dir, 'validation').record(0)
  bot = chat.Chat(workdir, max_new_tokens=5)
  answer = bot.answer(record.image, 'How many ships are there in the image?')
  assert isinstance(answer, str)
  assert answer == bot.answer(record.image, 'How many ships are there in the image?')
