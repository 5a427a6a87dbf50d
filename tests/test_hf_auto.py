"""The export folder as a Hugging Face repository: transformers' auto classes load it.

Real transformers, no downloads: a tiny MoE with the adaptive router and a tiny dense model are
exported with a tokenizer trained here, then loaded with AutoProcessor /
AutoModelForImageTextToText (trust_remote_code) and, dense, the native
LlavaForConditionalGeneration. Oracles: our input pipeline (pixel values, prompt ids and router
ids from data/ and evaluation/prompts.py), our JAX model's logits and its greedy tokens, and
batch-of-one generation for the ragged batch.
"""
import copy
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torch.set_num_threads(1)
transformers = pytest.importorskip('transformers')

from conftest import REPO  # noqa: E402
from test_export import (TOL, _workdir_with_checkpoint, dense_config, jax_logits,  # noqa: E402
                         moe_config, predicted_config, random_params)
from test_tokenizer import _conversation, _corpus  # noqa: E402
from skymoe_jax import workdir as workdir_lib  # noqa: E402
from skymoe_jax.data import image_ops, tasks  # noqa: E402
from skymoe_jax.data import template as template_lib  # noqa: E402
from skymoe_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from skymoe_jax.evaluation import generate as generate_lib  # noqa: E402
from skymoe_jax.evaluation import prompts  # noqa: E402
from skymoe_jax.interop import export_format, hf_repo, to_torch, torch_model  # noqa: E402
from skymoe_jax.model import factory  # noqa: E402

T = template_lib.LLAVA_V1
QUESTIONS = ('[refer] Where is the storage tank?', 'How many ships are there in the image?')


def _png(h, w, seed):
  rng = np.random.default_rng(seed)
  return image_ops.encode_png((rng.random((h, w, 3)) * 255).astype(np.uint8))


@pytest.fixture(scope='module')
def tok(tmp_path_factory):
  path = tmp_path_factory.mktemp('tok') / 'tokenizer'
  return tokenizer_lib.train(_corpus(), str(path), 256)  # fits the tiny model's 256 ids


def _export(config, params, tok, out):
  to_torch.export_params(params, config.model, out, copies={'tokenizer.model': tok.path},
                         image_token_index=to_torch.image_token_id(tok.path),
                         data_cfg=config.data)
  return config, params, out


@pytest.fixture(scope='module')
def moe(tok, tmp_path_factory):
  config = moe_config(False)
  assert config.model.moe.adaptive
  return _export(config, random_params(config, seed=2), tok, tmp_path_factory.mktemp('moe_hf'))


@pytest.fixture(scope='module')
def dense(tok, tmp_path_factory):
  config = dense_config()
  return _export(config, random_params(config, seed=1), tok, tmp_path_factory.mktemp('dense_hf'))


@pytest.fixture(scope='module')
def predicted(tok, tmp_path_factory):
  """The tiny MoE whose condition head routes (model.moe.condition='predicted')."""
  config = predicted_config()
  return _export(config, random_params(config, seed=3), tok,
                 tmp_path_factory.mktemp('predicted_hf'))


def _processor(out):
  return transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)


def _model(out):
  return transformers.AutoModelForImageTextToText.from_pretrained(
      out, trust_remote_code=True).eval()


def _num_image_tokens(config):
  v = config.model.vision
  return (v.image_size // v.patch_size) ** 2


def _jax_args(config, inputs, length=None):
  """Our model's inputs for the processor's: NHWC pixels, the text ids right-padded to
  `length` (the image placeholders dropped: our model puts the image first itself), and the
  router ids (zeros when the processor gives none: the condition head routes)."""
  nv = _num_image_tokens(config)
  ids, keep = inputs['input_ids'].numpy(), inputs['attention_mask'].numpy().astype(bool)
  rows = [ids[i][keep[i]][nv:] for i in range(len(ids))]
  length = length or max(len(r) for r in rows)
  tokens = np.zeros((len(rows), length), np.int32)
  mask = np.zeros((len(rows), length), bool)
  for i, r in enumerate(rows):
    tokens[i, :len(r)], mask[i, :len(r)] = r, True
  zeros = torch.zeros(len(rows), dtype=torch.long)
  return (inputs['pixel_values'].permute(0, 2, 3, 1).numpy(), tokens, mask,
          inputs.get('task_ids', zeros).numpy().astype(np.int32),
          inputs.get('granularity_ids', zeros).numpy().astype(np.int32))


def _jax_greedy(config, params, inputs, n):
  """Greedy tokens of our JAX model, one full forward per token (no cache); a condition head
  pools the prompt alone, as in generation."""
  images, tokens, mask, task, gran = _jax_args(config, inputs)
  lengths = mask.sum(1)
  tokens = np.concatenate([tokens, np.zeros((len(tokens), n), np.int32)], axis=1)
  mask = np.concatenate([mask, np.zeros((len(mask), n), bool)], axis=1)
  prompt = () if config.model.moe.get('condition', 'tags') == 'tags' else (mask.copy(),)
  out = []
  for _ in range(n):
    logits = jax_logits(config, params, (images, tokens, mask, task, gran) + prompt)
    new = logits[np.arange(len(tokens)), lengths - 1].argmax(-1)
    tokens[np.arange(len(tokens)), lengths], mask[np.arange(len(tokens)), lengths] = new, True
    lengths = lengths + 1
    out.append(new)
  return np.stack(out, 1)


# ----------------------------------------------------------------------------- the folder


def test_export_folder_is_a_hugging_face_repository(moe, dense, tok):
  for config, _, out in (moe, dense):
    names = {p.name for p in out.iterdir()}
    assert set(export_format.SHIPPED_CODE) | set(export_format.PROCESSOR_FILES) <= names
    assert all(export_format.is_export_file(n) for n in names)
    for name in export_format.SHIPPED_CODE:  # the very files of the repository, not copies
      assert (out / name).read_bytes() == (REPO / 'skymoe_jax' / 'interop' / name).read_bytes()
    cfg = json.loads((out / 'config.json').read_text())
    assert cfg['auto_map']['AutoModelForImageTextToText'] == (
        'modeling_skymoe.SkyMoEForImageTextToText')
    generation = json.loads((out / 'generation_config.json').read_text())
    assert (generation['eos_token_id'], generation['pad_token_id'], generation['bos_token_id'],
            generation['do_sample']) == (tok.eos_id, tok.pad_id, tok.bos_id, False)
  # MoE: our config class; dense: LLaVA's own (so LlavaForConditionalGeneration still loads it).
  assert json.loads((moe[2] / 'config.json').read_text())['model_type'] == 'skymoe_llava'
  dense_cfg = transformers.AutoConfig.from_pretrained(dense[2], trust_remote_code=True)
  assert type(dense_cfg).__name__ == 'LlavaConfig' and dense_cfg.skymoe['model']
  moe_cfg = transformers.AutoConfig.from_pretrained(moe[2], trust_remote_code=True)
  assert type(moe_cfg).__name__ == 'SkyMoEConfig'
  assert moe_cfg.skymoe['moe_layers'] == list(moe[0].model.moe.layers)


def test_shipped_code_runs_with_torch_and_transformers_only(moe, tmp_path):
  """A fresh process in which neither jax nor skymoe_jax can be imported loads the export with
  the auto classes and generates (the remote code is self-contained)."""
  script = f'''
import sys
for name in ('jax', 'jaxlib', 'flax', 'skymoe_jax'):
  sys.modules[name] = None  # any import of them raises ImportError
import numpy as np, transformers
out = {str(moe[2])!r}
processor = transformers.AutoProcessor.from_pretrained(out, trust_remote_code=True)
model = transformers.AutoModelForImageTextToText.from_pretrained(out, trust_remote_code=True)
image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
inputs = processor(images=image, text='How many ships are there?', return_tensors='pt')
print(model.generate(**inputs, max_new_tokens=3).shape[1] - inputs['input_ids'].shape[1])
'''
  env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / 'modules'), PYTHONPATH='')
  r = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, capture_output=True,
                     text=True, timeout=300, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.split()[-1] == '3'


# ----------------------------------------------------------------------------- the processor


def test_processor_reproduces_our_pipeline(moe, tok):
  """Pixels, prompt ids and router ids equal evaluation/prompts.py + data/tasks.py's, for
  questions and multi-turn conversations (through the processor's chat template)."""
  config, _, out = moe
  config = copy.deepcopy(config)
  config.data.text_len = 512  # long conversations: the oracle must not refuse them
  processor = _processor(out)
  nv, rng = _num_image_tokens(config), np.random.default_rng(0)
  convs = [[{'from': 'human', 'value': '<image>\n' + q}] for q in QUESTIONS]
  for k in range(4):  # multi-turn, tags, boxes and counts, ending on a human turn
    convs.append(_conversation(random.Random(k), turns=2 + k % 2)[:-1])
  for k, conv in enumerate(convs):
    png = _png(int(rng.integers(20, 80)), int(rng.integers(20, 80)), k)
    want = prompts.prepare(png, conv, config, tok, T)
    messages = [{'role': 'user' if t['from'] == 'human' else 'assistant', 'content': t['value']}
                for t in conv]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    question = conv[0]['value'][len('<image>\n'):]
    for given in ([text] if len(conv) > 1 else [text, question]):
      got = processor(images=png, text=given, return_tensors='np')
      ids = got['input_ids'][0]
      assert ids[:nv].tolist() == [processor.image_token_id] * nv
      assert ids[nv:].tolist() == want['prompt'].tolist(), given
      np.testing.assert_array_equal(got['pixel_values'][0], want['image'].transpose(2, 0, 1))
      assert (int(got['task_ids'][0]), int(got['granularity_ids'][0])) == tasks.classify(
          conv[0]['value'])[:2]


def test_router_ids_follow_the_task_tags_as_in_chat(moe):
  processor = _processor(moe[2])
  png = _png(32, 32, 0)
  questions = ([f'{tag} Where is the ship?' for tag in tasks.TAGS] +
               ['{cls} Classify the scene.', '[GROUNDING] the ship', 'Describe the image.',
                'What colour is the car?', 'Is there a bridge?', 'Output the box of the ship.',
                'What land use is this?'])
  got = processor(images=[png] * len(questions), text=questions)
  for i, q in enumerate(questions):
    assert (int(got['task_ids'][i]), int(got['granularity_ids'][i])) == tasks.classify(q)[:2], q
  with pytest.raises(tasks.UnknownTagError):
    tasks.classify('[nonsense] Where?')
  with pytest.raises(ValueError, match=r"unknown task tag '\[nonsense\]'"):
    processor(images=png, text='[nonsense] Where?')
  given = processor(images=[png] * 2, text=list(QUESTIONS), task_ids=['captioning', 0],
                    granularity_ids=2)
  assert given['task_ids'].tolist() == [3, 0] and given['granularity_ids'].tolist() == [2, 2]
  with pytest.raises(ValueError, match=r"task_ids: 'nope' is not one of"):
    processor(images=png, text=QUESTIONS[0], task_ids='nope')


# ----------------------------------------------------------------------------- the model


def _inputs(processor, seed=0):
  images = [_png(40, 60, seed), _png(64, 48, seed + 1)]
  return processor(images=images, text=list(QUESTIONS))  # ragged: left-padded


@pytest.mark.parametrize('which', ['moe', 'dense'])
def test_auto_model_logits_match_jax(which, moe, dense):
  config, params, out = {'moe': moe, 'dense': dense}[which]
  processor, model = _processor(out), _model(out)
  inputs = _inputs(processor)
  nv = _num_image_tokens(config)
  args = _jax_args(config, inputs)
  ours = jax_logits(config, params, args)
  with torch.no_grad():
    logits = model(**inputs).logits.numpy()
  keep = inputs['attention_mask'].numpy().astype(bool)
  theirs = np.zeros_like(ours)
  for i in range(len(ours)):  # the text positions of each left-padded row
    theirs[i, :args[2][i].sum()] = logits[i][keep[i]][nv:]
  assert np.abs(ours).max() > 0.5
  diff = np.abs(ours - theirs)[args[2]].max()
  assert diff <= TOL, diff
  if which == 'moe':  # the adaptive router reads the task ids
    other = dict(inputs, task_ids=(inputs['task_ids'] + 1) % config.model.moe.num_tasks)
    with torch.no_grad():
      assert np.abs(model(**other).logits.numpy() - logits)[keep].max() > 1e-3
    with pytest.raises(ValueError, match='needs task_ids and granularity_ids'):
      model(input_ids=inputs['input_ids'], pixel_values=inputs['pixel_values'])
  else:  # transformers' own LLaVA on the same inputs (positions from the mask)
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(
        out, attn_implementation='eager').eval()
    positions = (inputs['attention_mask'].cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
      native = llava(input_ids=inputs['input_ids'], pixel_values=inputs['pixel_values'],
                     attention_mask=inputs['attention_mask'], position_ids=positions).logits
    assert np.abs(native.numpy() - logits)[keep].max() <= TOL


@pytest.mark.parametrize('which', ['moe', 'dense'])
def test_generate_is_jax_greedy_and_a_ragged_batch_equals_batch_one(which, moe, dense):
  config, params, out = {'moe': moe, 'dense': dense}[which]
  processor, model = _processor(out), _model(out)
  inputs = _inputs(processor, seed=3)
  n, width = 6, inputs['input_ids'].shape[1]
  eos = model.generation_config.eos_token_id
  with torch.no_grad():
    # eos off: every row runs n steps (random weights may say eos at any step).
    batch = model.generate(**inputs, max_new_tokens=n, eos_token_id=None)[:, width:]
  want = _jax_greedy(config, params, inputs, n)
  np.testing.assert_array_equal(batch.numpy(), want)
  for i, (image, question) in enumerate(zip([_png(40, 60, 3), _png(64, 48, 4)], QUESTIONS)):
    one = processor(images=image, text=question)
    with torch.no_grad():
      alone = model.generate(**one, max_new_tokens=n, eos_token_id=None)
    np.testing.assert_array_equal(alone[0, one['input_ids'].shape[1]:].numpy(), batch[i].numpy())
  # Stopping at eos (generation_config's, here a token row 0 emits): pad after it.
  stop = int(batch[0, 2])
  with torch.no_grad():
    stopped = model.generate(**inputs, max_new_tokens=n, eos_token_id=stop)[:, width:]
  first = int((batch[0] == stop).nonzero()[0, 0])
  assert stopped[0, :first + 1].tolist() == batch[0, :first + 1].tolist()
  assert set(stopped[0, first + 1:].tolist()) <= {model.generation_config.pad_token_id}
  assert eos == 2  # our tokenizer's </s>
  if which == 'dense':  # transformers' LLaVA generates the same tokens from the same files
    llava = transformers.LlavaForConditionalGeneration.from_pretrained(out).eval()
    assert llava.generation_config.eos_token_id == eos
    with torch.no_grad():
      native = llava.generate(input_ids=inputs['input_ids'], pixel_values=inputs['pixel_values'],
                              attention_mask=inputs['attention_mask'], max_new_tokens=n,
                              eos_token_id=None)
    np.testing.assert_array_equal(native[:, width:].numpy(), want)


def test_predicted_condition_auto_model_matches_jax(predicted):
  """model.moe.condition='predicted': the processor gives no router ids, the model's head
  predicts them from the prompt's text tokens (left padding and image placeholders left out):
  logits and generate() as our JAX model's (one prediction from the prompt routes every new
  token); ids given both route as tags (ours with condition=(task, granularity))."""
  config, params, out = predicted
  processor, model = _processor(out), _model(out)
  inputs = _inputs(processor, seed=6)
  assert 'task_ids' not in inputs and 'granularity_ids' not in inputs
  nv, keep = _num_image_tokens(config), inputs['attention_mask'].numpy().astype(bool)
  args = _jax_args(config, inputs)

  def text_logits(out_logits):
    theirs = np.zeros(args[1].shape + out_logits.shape[-1:], np.float32)
    for i in range(len(theirs)):  # the text positions of each left-padded row
      theirs[i, :args[2][i].sum()] = out_logits[i][keep[i]][nv:]
    return theirs

  ours = jax_logits(config, params, args)
  with torch.no_grad():
    output = model(**inputs)
  theirs = text_logits(output.logits.numpy())
  assert np.abs(ours).max() > 0.5
  assert np.abs(ours - theirs)[args[2]].max() <= TOL
  assert [c.shape for c in output.condition] == [
      (2, config.model.moe.num_tasks), (2, config.model.moe.num_granularities)]
  # Tags given (names or ids, as to a tag-routed export's processor) route instead.
  tagged = processor(images=[_png(40, 60, 6), _png(64, 48, 7)], text=list(QUESTIONS),
                     task_ids=['grounding', 'counting'], granularity_ids=[2, 0])
  model_jax = factory.create_model(config)
  task, gran = tagged['task_ids'].numpy(), tagged['granularity_ids'].numpy()
  by_tags = np.asarray(model_jax.apply({'params': params}, *args[:3], task, gran,
                                       condition=(task, gran))[0])
  with torch.no_grad():
    theirs_tags = text_logits(model(**tagged).logits.numpy())
    assert model(**tagged).condition is None
  assert np.abs(by_tags - theirs_tags)[args[2]].max() <= TOL
  assert np.abs(theirs_tags - theirs)[args[2]].max() > 1e-3
  n, width = 6, inputs['input_ids'].shape[1]
  with torch.no_grad():
    generated = model.generate(**inputs, max_new_tokens=n, eos_token_id=None)[:, width:]
  np.testing.assert_array_equal(generated.numpy(), _jax_greedy(config, params, inputs, n))
  # A step on a filled cache must be told the prompt's condition (generate passes it on).
  with torch.no_grad():
    first = model(**inputs, use_cache=True)
    step = dict(input_ids=generated[:, :1], cache=first.cache,
                attention_mask=torch.cat([inputs['attention_mask'],
                                          torch.ones(2, 1, dtype=torch.long)], dim=1))
    with pytest.raises(ValueError, match="needs the condition the prompt's forward returned"):
      model(**step)
    logits = model(**step, condition=first.condition).logits
  assert logits.argmax(-1)[:, 0].tolist() == generated[:, 1].tolist()


# ----------------------------------------------------------------------------- from a workdir


def test_export_workdir_writes_the_runs_processor(tok, tmp_path):
  config = moe_config(False)
  config.data.pad_to_square = False
  params = random_params(config, seed=4)
  work = tmp_path / 'work'
  _workdir_with_checkpoint(config, params, work)
  (work / 'tokenizer.model').write_bytes(tok.model_bytes)
  assert workdir_lib.tokenizer_path(work).exists()
  out = tmp_path / 'out'
  to_torch.export_workdir(work, out)
  processor = _processor(out)
  png = _png(30, 50, 7)
  want = prompts.prepare(png, [{'from': 'human', 'value': '<image>\nIs it a port?'}], config,
                         tok, T)
  got = processor(images=png, text='Is it a port?', return_tensors='np')
  np.testing.assert_array_equal(got['pixel_values'][0], want['image'].transpose(2, 0, 1))
  assert got['input_ids'][0, _num_image_tokens(config):].tolist() == want['prompt'].tolist()
  # A tokenizer.model sentencepiece cannot read fails the export naming it; nothing written.
  (work / 'tokenizer.model').write_bytes(b'not a sentencepiece model')
  with pytest.raises(to_torch.ExportError, match=r'tokenizer\.model: not a sentencepiece'):
    to_torch.export_workdir(work, tmp_path / 'out2')
  assert not (tmp_path / 'out2').exists()
  assert not [p for p in tmp_path.iterdir() if p.name.startswith('.out2')]


def test_chat_template_renders_as_our_template():
  """The Jinja template's text, piece ends aside, is template.render_text's."""
  import jinja2  # pylint: disable=import-outside-toplevel
  env = jinja2.Environment()
  env.globals['raise_exception'] = lambda m: (_ for _ in ()).throw(ValueError(m))
  jinja = env.from_string(hf_repo.chat_template(T))
  conv = _conversation(random.Random(5), turns=3)[:-1]
  messages = [{'role': 'user' if t['from'] == 'human' else 'assistant', 'content': t['value']}
              for t in conv]
  want = template_lib.render_text(T, tokenizer_lib.strip_image_placeholder(T, conv))
  assert jinja.render(messages=messages) == want
  with pytest.raises(ValueError, match='alternate'):
    jinja.render(messages=messages[1:])


@pytest.mark.slow
def test_generate_equals_our_kv_cache_generator(moe, dense):
  """HF generate with generation_config.json's eos and pad == our JAX generator (the chat
  command's), tokens and stopping, for the ragged batch."""
  for config, params, out in (moe, dense):
    processor, model = _processor(out), _model(out)
    inputs = _inputs(processor, seed=5)
    n, width = 8, inputs['input_ids'].shape[1]
    gen = model.generation_config
    with torch.no_grad():
      free = model.generate(**inputs, max_new_tokens=n, eos_token_id=None)[:, width:]
    eos = int(free[0, 3])  # a token row 0 says, so that stopping is exercised
    fn = generate_lib.make_generate_fn(factory.create_model(config), config, n, eos_id=eos,
                                       pad_id=gen.pad_token_id)
    want, _ = fn(params, *_jax_args(config, inputs))
    with torch.no_grad():
      got = model.generate(**inputs, max_new_tokens=n, eos_token_id=eos)[:, width:]
    got = torch.nn.functional.pad(got, (0, n - got.shape[1]), value=gen.pad_token_id)
    np.testing.assert_array_equal(got.numpy(), np.asarray(want))


def test_a_bad_moe_layer_list_names_the_field(moe, tmp_path):
  """The torch model (in the repository and shipped) builds its decoder from skymoe.moe_layers;
  a list that does not fit the model config is refused naming the file and the field."""
  cfg = json.loads((moe[2] / 'config.json').read_text())
  for bad in ([0, 9], 'all', [], [True]):
    cfg['skymoe']['moe_layers'] = bad
    (tmp_path / 'config.json').write_text(json.dumps(cfg))
    with pytest.raises(torch_model.LoadError, match=r'config\.json: skymoe\.moe_layers'):
      torch_model.export_files(tmp_path)
