"""The held-out examples the recipe leaves for chat and the demo, the README's chat command on one
of them, the chat engine's per-question routing, and the demo page (skymoe_jax/demo.py): served
on localhost and called with gradio_client (its answers and boxes are the chat command's), and,
in a slow test, driven in headless Chromium."""
import contextlib
import itertools
import json
import os
import pathlib
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from conftest import REPO, train_tiny_run
from skymoe_jax import demo
from skymoe_jax.data import boxes, image_ops, records, synthetic, tasks
from skymoe_jax.evaluation import chat
from skymoe_jax.training import loop

# The README's chat command on one of the recipe's examples, verbatim (README.md must hold it);
# the tests run it on the tiny run with README_WORKDIR replaced by the tiny run's folders. Scene
# 4 of the validation split asks this at the demo's 128 px and the tiny config's 64 px alike.
README_WORKDIR = '/tmp/skymoe_demo'
README_CHAT = ('python -m skymoe_jax.chat --workdir=/tmp/skymoe_demo/stage2 '
               '--image=/tmp/skymoe_demo/examples/syn-validation-000004.png '
               '--prompt="[refer] Where is the red storage tank?"')
CHROMIUM, CHROMEDRIVER = '/usr/bin/chromium', '/usr/bin/chromedriver'
# Chromium on a machine without network stalls on its background requests unless told not to.
CHROMIUM_FLAGS = ('--headless', '--no-sandbox', '--disable-gpu', '--disable-quic',
                  '--no-first-run', '--disable-background-networking',
                  '--disable-component-update', '--disable-sync', '--window-size=1400,1800')


@pytest.fixture(scope='module')
def run(tmp_path_factory):
  """(config, workdir, root): the tiny MoE run trained two steps into root/run, and the recipe's
  examples of its config in root/examples."""
  root = tmp_path_factory.mktemp('demo')
  config, workdir = train_tiny_run(root)
  chat.write_examples(config, root / chat.EXAMPLES_DIR)
  return config, workdir, root


def _readme_command(root: pathlib.Path, workdir: pathlib.Path):
  """README_CHAT's argv on the tiny run: its workdir and examples in place of the README's."""
  command = README_CHAT.replace(f'{README_WORKDIR}/stage2', str(workdir))
  command = command.replace(README_WORKDIR, str(root))
  argv = shlex.split(command)
  assert argv[0] == 'python'
  return [sys.executable] + argv[1:]


def _flag(argv, name: str) -> str:
  return next(a.split('=', 1)[1] for a in argv if a.startswith(f'--{name}='))


@pytest.fixture(scope='module')
def chat_command(run):
  """(argv, stdout) of the README's chat command run on the tiny run, as a separate process."""
  _, workdir, root = run
  argv = _readme_command(root, workdir)
  result = subprocess.run(argv, capture_output=True, text=True, cwd=REPO, timeout=300,
                          check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  return argv, result.stdout


@pytest.fixture(scope='module')
def bot(run):
  return chat.Chat(run[1])


def _validation_images(config):
  """{record id prefix 'syn-validation-00000i': its records} of the tiny run's validation split."""
  reader = records.open_split(config.data.sources.synthetic.data_dir, 'validation')
  by_image = {}
  for i in range(len(reader)):
    r = reader.record(i)
    by_image.setdefault(r.id.rsplit('-', 1)[0], []).append(r)
  reader.close()
  return by_image


def test_examples_are_held_out_scenes_with_a_question_of_every_task(run):
  config, _, root = run
  folder = root / chat.EXAMPLES_DIR
  rows = [json.loads(l) for l in (folder / chat.QUESTIONS_FILE).read_text().splitlines()]
  names = sorted({r['image'] for r in rows})
  # The oracle: the generator renders each validation scene again from (seed, split, index),
  # and picks by hand the first six scenes that have all five tasks.
  s = config.data.synthetic
  complete = [i for i in range(synthetic.split_sizes(s.num_images, s.val_fraction)['validation'])
              if {r.task for r in synthetic.image_records(s.seed, 'validation', i, s.image_size)}
              == set(tasks.TASKS)][:6]
  assert names == [f'syn-validation-{i:06d}.png' for i in complete]
  assert 'syn-validation-000004.png' in names  # the README's example
  for i in complete:
    want = synthetic.image_records(s.seed, 'validation', i, s.image_size)
    name = f'syn-validation-{i:06d}.png'
    png = (folder / name).read_bytes()
    assert png == want[0].image
    got = [r for r in rows if r['image'] == name]
    assert [(g['task'], g['granularity'], g['question'], g['answer']) for g in got] == [
        (w.task, w.granularity, w.conversations[0]['value'].removeprefix('<image>\n'),
         w.conversations[1]['value']) for w in want]
    assert [g['tag'] for g in got] == ['[refer]' if w.task == 'grounding' else None for w in want]
  # Read back as the demo reads them: each image's path and its question.
  back = chat.read_examples(folder)
  assert [(str(r['image']), r['question']) for r in back] == [
      (str(folder / r['image']), r['question']) for r in rows]


def test_read_examples_names_a_bad_row(tmp_path):
  (tmp_path / chat.QUESTIONS_FILE).write_text('{"image": "a.png", "question": "Hi?"}\n')
  with pytest.raises(ValueError, match=f'{tmp_path / chat.QUESTIONS_FILE}: line 1: no image'):
    chat.read_examples(tmp_path)
  (tmp_path / chat.QUESTIONS_FILE).write_text('\n{"question": "Hi?"}\n')
  with pytest.raises(ValueError, match='line 2: not an example row'):
    chat.read_examples(tmp_path)


def test_demo_command_names_a_bad_examples_folder_before_loading_the_model(tmp_path):
  """The workdir does not exist: a command that loaded the model first would fail on it."""
  (tmp_path / chat.QUESTIONS_FILE).write_text('{"image": "gone.png", "question": "Hi?"}\n')
  r = subprocess.run([sys.executable, '-m', 'skymoe_jax.demo', f'--workdir={tmp_path / "no"}',
                      f'--examples={tmp_path}'], capture_output=True, text=True, cwd=REPO,
                     timeout=120, check=False)
  assert r.returncode == 2 and 'Traceback' not in r.stderr, r.stderr
  assert f'{tmp_path / chat.QUESTIONS_FILE}: line 1: no image file' in r.stderr, r.stderr
  assert 'config.json' not in r.stderr, r.stderr


def test_readme_shows_the_chat_command_tested_here():
  readme = (REPO / 'README.md').read_text()
  assert README_CHAT in readme, f'README.md must show the chat command {README_CHAT!r}'


def test_readme_chat_command_answers_on_an_example(chat_command, bot):
  argv, stdout = chat_command
  image = chat.read_image(_flag(argv, 'image'))
  # The command's one line is the engine's answer to the same image and question.
  assert stdout.splitlines() == [bot.answer(image, _flag(argv, 'prompt'))]


def test_ask_gives_the_answer_the_router_inputs_and_this_questions_expert_load(run, bot):
  config, _, root = run
  image = chat.read_image(root / chat.EXAMPLES_DIR / 'syn-validation-000004.png')
  question = 'How many storage tanks are there in the image?'
  reply = bot.ask(image, question)
  assert reply.answer == bot.answer(image, question)
  assert (reply.task, reply.granularity, reply.tag) == ('counting', 'local', None)
  assert (reply.width, reply.height) == (64, 64)
  assert reply.boxes == (boxes.try_parse('geochat', reply.answer, 64, 64) or [])
  # Routing of this one question: one (task, granularity) cell, and every prompt token (the
  # image's (32/8)^2 patches and the templated question) routed to top_k experts in each layer.
  prompt = bot.tokenizer.encode_prompt(
      bot.template, [{'from': 'human', 'value': '<image>\n' + question}])
  routed = ((32 // 8) ** 2 + len(prompt)) * config.model.moe.top_k
  routing = reply.routing
  assert set(routing['layers']) == {f'layer_{i}' for i in config.model.moe.layers}
  for layer in routing['layers'].values():
    assert list(layer['by_condition']) == ['counting/local']
    assert layer['by_condition']['counting/local']['routed'] == routed
    assert len(layer['load']) == config.model.moe.num_experts
    assert np.isclose(sum(layer['load']), 1.0, atol=1e-4)
  tagged = bot.ask(image, '[refer] Where is the red storage tank?')
  assert (tagged.task, tagged.granularity, tagged.tag) == ('grounding', 'local', '[refer]')


def test_draw_boxes_outlines_the_reference_box_on_the_enlarged_image(run):
  _, _, root = run
  folder = root / chat.EXAMPLES_DIR
  row = next(r for r in chat.read_examples(folder)
             if r['task'] == 'grounding' and r['image'].name == 'syn-validation-000004.png')
  assert row['answer'] == '{<6><36><16><45>}'
  pixels = image_ops.decode(row['image'].read_bytes())
  drawn = demo.draw_boxes(pixels, boxes.parse('geochat', row['answer'], 64, 64))
  # By hand: 64 px enlarged 6 times (the smallest whole factor reaching 384 px); the box's
  # edges 0.06, 0.36, 0.16, 0.45 of 384 px are 23.04, 138.24, 61.44, 172.8 -> rounded, the
  # outline covers x 23..60, y 138..172, 3 px wide (6 // 2) inwards.
  enlarged = np.repeat(np.repeat(pixels, 6, axis=0), 6, axis=1)
  assert drawn.shape == enlarged.shape == (384, 384, 3)
  outline = np.zeros((384, 384), bool)
  outline[138:173, 23:61] = True
  outline[141:170, 26:58] = False
  assert (drawn[outline] == demo.BOX_COLOR).all()
  assert (drawn[~outline] == enlarged[~outline]).all()
  # No boxes: the enlarged image itself.
  assert (demo.draw_boxes(pixels, []) == enlarged).all()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def _served(page):
  """`page` served on a free localhost port for the duration; yields its URL."""
  port = _free_port()
  demo.launch(page, '127.0.0.1', port, block=False)
  try:
    yield f'http://127.0.0.1:{port}/'
  finally:
    page.close()


def test_demo_server_answers_like_the_chat_command(run, chat_command, bot):
  from gradio_client import Client, handle_file  # pylint: disable=import-outside-toplevel
  _, _, root = run
  argv, stdout = chat_command
  image_path, question = _flag(argv, 'image'), _flag(argv, 'prompt')
  examples = [[str(r['image']), r['question']] for r in chat.read_examples(root / 'examples')]
  with _served(demo.build_app(bot, examples)) as url:
    client = Client(url, verbose=False, analytics_enabled=False,
                    download_files=str(root / 'downloads'))
    answer, drawn, details, table = client.predict(handle_file(image_path), question,
                                                   api_name=f'/{demo.API_NAME}')
    with pytest.raises(Exception, match='Upload or pick an image first'):
      client.predict(None, question, api_name=f'/{demo.API_NAME}')
    with pytest.raises(Exception, match="unknown task tag '\\[bogus\\]'"):
      client.predict(handle_file(image_path), '[bogus] What?', api_name=f'/{demo.API_NAME}')
  # The chat command's answer, the boxes parsed from it, its router task and granularity.
  want = stdout.strip()
  assert answer == want
  want_boxes = boxes.try_parse('geochat', want, 64, 64) or []
  assert details['boxes'] == [[b.x1, b.y1, b.x2, b.y2] for b in want_boxes]
  assert (details['task'], details['granularity'], details['tag']) == (
      'grounding', 'local', '[refer]')
  # The image: the scene enlarged, with those boxes drawn; the table: a row per MoE layer.
  pixels = image_ops.decode(pathlib.Path(image_path).read_bytes())
  shown = image_ops.decode(pathlib.Path(drawn).read_bytes())
  assert (shown == demo.draw_boxes(pixels, want_boxes)).all()
  reply = bot.ask(chat.read_image(image_path), question)
  assert table['headers'] == ['layer'] + [f'expert {e}' for e in range(4)]
  assert table['data'] == [[name] + [round(v, 3) for v in layer['load']]
                           for name, layer in reply.routing['layers'].items()]


# ---------------------------------------------------------------------------- in a browser

@pytest.fixture(scope='module')
def grounded_run(run, tmp_path_factory):
  """The tiny run trained on to 900 steps, where it reproduces the boxes of its training scenes
  (held-out ones it does not yet locate, nor always write as a box): (workdir, the image file of
  a training scene, its grounding question, the run's answer, a box)."""
  config, workdir, _ = run
  config.train.update(total_steps=900, log_every=100, checkpoint_every=900)
  loop.train(config, workdir)
  bot = chat.Chat(workdir, max_new_tokens=24)
  reader = records.open_split(config.data.sources.synthetic.data_dir, 'train')
  grounding = (r for r in map(reader.record, range(len(reader))) if r.task == 'grounding')
  for r in itertools.islice(grounding, 10):
    question = r.conversations[0]['value'].removeprefix('<image>\n')
    answer = bot.answer(r.image, question)
    if boxes.try_parse('geochat', answer, 64, 64):
      image = tmp_path_factory.mktemp('scene') / f'{r.id}.png'
      image.write_bytes(r.image)
      return workdir, image, question, answer
  pytest.fail(f'the tiny run trained 900 steps names no box for 10 training scenes: {answer!r}')


def _wait_for_page(url: str, process, seconds: float = 240):
  deadline = time.time() + seconds
  while time.time() < deadline:
    if process.poll() is not None:
      raise AssertionError(f'the demo exited with status {process.returncode}')
    try:
      with urllib.request.urlopen(url, timeout=5) as response:
        if response.status == 200:
          return
    except OSError:
      time.sleep(1)
  raise AssertionError(f'the demo did not serve {url} within {seconds} s')


@contextlib.contextmanager
def demo_process(workdir, port: int, log_path: pathlib.Path, *flags):
  """`python -m skymoe_jax.demo` on workdir, serving on localhost:port until the block ends;
  yields its URL once the page answers."""
  env = dict(os.environ, GRADIO_ANALYTICS_ENABLED='False')
  with open(log_path, 'w') as log:
    server = subprocess.Popen([sys.executable, '-m', 'skymoe_jax.demo', f'--workdir={workdir}',
                               f'--port={port}', *flags], cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT)
    try:
      url = f'http://127.0.0.1:{port}/'
      _wait_for_page(url, server)
      yield url
    finally:
      server.terminate()
      try:
        server.wait(timeout=30)
      except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def ask_in_chromium(url: str, image_path, question: str, screenshot: pathlib.Path,
                    profile: pathlib.Path):
  """Headless Chromium opens the page, uploads the image, asks, waits for the answer and the
  drawn image, and saves a screenshot; returns (answer text, the drawn image's bytes)."""
  from selenium import webdriver  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.common.by import By  # pylint: disable=import-outside-toplevel
  from selenium.webdriver.support.ui import WebDriverWait  # pylint: disable=import-outside-toplevel
  options = webdriver.ChromeOptions()
  options.binary_location = CHROMIUM
  for flag in CHROMIUM_FLAGS + (f'--user-data-dir={profile}',):
    options.add_argument(flag)
  driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
  try:
    driver.get(url)
    wait = WebDriverWait(driver, 120)
    upload = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#image-in input[type=file]'))
    upload.send_keys(str(image_path))
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, '#image-in img'))
    driver.find_element(By.CSS_SELECTOR, '#question textarea').send_keys(question)
    driver.find_element(By.CSS_SELECTOR, '#ask').click()
    answer = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#answer textarea')
                        .get_attribute('value'))
    shown = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, '#image-out img'))
    wait.until(lambda d: d.execute_script('return arguments[0].complete', shown))
    time.sleep(1)  # the load table and JSON render after the answer
    driver.save_screenshot(str(screenshot))
    with urllib.request.urlopen(shown.get_attribute('src'), timeout=30) as response:
      return answer, response.read()
  finally:
    driver.quit()


@pytest.mark.slow
def test_demo_page_in_headless_chromium_answers_a_grounding_question(grounded_run, tmp_path):
  if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    pytest.skip(f'needs Debian chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}); '
                'apt-get install chromium chromium-driver)')
  workdir, image_path, question, want = grounded_run
  shot = tmp_path / 'demo_grounding.png'
  with demo_process(workdir, _free_port(), tmp_path / 'demo.log', '--max_new_tokens=24') as url:
    answer, drawn = ask_in_chromium(url, image_path, question, shot, tmp_path / 'chromium')
  artifacts = os.environ.get('SKYMOE_TEST_ARTIFACTS')
  if artifacts:
    pathlib.Path(artifacts).mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, pathlib.Path(artifacts) / shot.name)
  # The page shows the chat engine's answer and the scene with the answer's box drawn on it.
  assert answer == want
  pixels = image_ops.decode(pathlib.Path(image_path).read_bytes())
  assert (image_ops.decode(drawn) == demo.draw_boxes(pixels, boxes.parse('geochat', want, 64, 64))
          ).all()
  # And the screenshot shows it: box-coloured pixels on the page (the browser scales the image,
  # so within a few levels of the colour; no scene pixel is near magenta).
  screen = image_ops.decode(shot.read_bytes()).astype(int)
  assert (np.abs(screen - demo.BOX_COLOR) <= 8).all(axis=-1).sum() > 100


@pytest.mark.slow
def test_recipe_leaves_the_examples_beside_its_stages(tmp_path):
  """The recipe on the tiny config (two steps a stage) writes WORKDIR/examples after its
  evaluation: the held-out examples of its stage-II config."""
  from skymoe_jax import recipe  # pylint: disable=import-outside-toplevel
  overrides = {'train.total_steps': 2, 'data.synthetic.cache_dir': str(tmp_path / 'cache'),
               'eval.max_samples': 4, 'eval.max_new_tokens': 4}
  result = recipe.run(str(REPO / 'configs' / 'tiny.py'), tmp_path / 'recipe', overrides)
  folder = tmp_path / 'recipe' / chat.EXAMPLES_DIR
  assert result['examples'] == str(folder / chat.QUESTIONS_FILE)
  rows = chat.read_examples(folder)
  assert sorted({r['image'].name for r in rows}) == [f'syn-validation-{i:06d}.png'
                                                     for i in range(6)]
  assert {r['task'] for r in rows} == set(tasks.TASKS)
