"""The native export: LLaVA with a LLaMA or Qwen2-MoE text model, loaded by transformers itself.

Oracles: our JAX model (transformers' LlavaForConditionalGeneration built from the folder with
trust_remote_code=False must reproduce its logits and its greedy tokens), transformers' own
loading report (no missing, unexpected or reshaped tensor), and the architecture transformers
builds (sparse blocks where ours are MoE, dense MLPs elsewhere).
"""
import json

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torch.set_num_threads(1)  # tiny models: threads only contend on a shared 2-core machine
transformers = pytest.importorskip('transformers')

from conftest import load_config  # noqa: E402
from test_export import TOL, inputs, jax_logits, num_image_tokens, random_params  # noqa: E402
from skymoe_jax.interop import from_hf, native_export, to_torch  # noqa: E402
from skymoe_jax.model import factory, lora  # noqa: E402
from skymoe_jax.evaluation import generate  # noqa: E402

IMAGE_TOKEN = 0  # no tokenizer: text tokens are drawn from 1.. (inputs(low_token=1))


def plain_router_config(renormalize):
  """The tiny MoE (LoRA, MoE layers 0 and 2) with the plain token router."""
  config = load_config('tiny')
  config.model.moe.update(adaptive=False, renormalize=renormalize, backend='dense')
  return config


def load_native(folder):
  """transformers' model of the folder, without remote code; its loading report must be clean."""
  model, info = transformers.AutoModelForImageTextToText.from_pretrained(
      folder, trust_remote_code=False, dtype=torch.float32, attn_implementation='eager',
      output_loading_info=True)
  assert type(model) is transformers.LlavaForConditionalGeneration
  assert not any(info[k] for k in ('missing_keys', 'unexpected_keys', 'mismatched_keys')), info
  return model.eval()


def hf_inputs(config, args):
  """input_ids with the image placeholders first (our layout), pixels, attention mask."""
  images, tokens, mask, _, _ = args
  nv, b = num_image_tokens(config), tokens.shape[0]
  ids = np.concatenate([np.full((b, nv), IMAGE_TOKEN), tokens], axis=1)
  full_mask = np.concatenate([np.ones((b, nv), bool), mask], axis=1)
  return (torch.from_numpy(ids).long(), torch.from_numpy(images).permute(0, 3, 1, 2),
          torch.from_numpy(full_mask).long())


def hf_text_logits(config, model, args):
  ids, pixels, mask = hf_inputs(config, args)
  with torch.no_grad():
    out = model(input_ids=ids, pixel_values=pixels, attention_mask=mask)
  return out.logits[:, num_image_tokens(config):].numpy()


@pytest.fixture(scope='module', params=[False, True], ids=['raw_topk', 'renormalized'])
def moe(request, tmp_path_factory):
  config = plain_router_config(request.param)
  params = random_params(config, seed=2)
  out = tmp_path_factory.mktemp('native_moe')
  native_export.export_native(params, config.model, out, image_token_index=IMAGE_TOKEN)
  return config, params, out


def test_moe_loads_natively_as_qwen2_moe_and_matches_jax(moe):
  config, params, out = moe
  cfg = json.loads((out / 'config.json').read_text())
  assert cfg['model_type'] == 'llava' and 'auto_map' not in cfg
  text = cfg['text_config']
  assert text['model_type'] == 'qwen2_moe' and text['mlp_only_layers'] == [1, 3]
  assert text['norm_topk_prob'] is config.model.moe.renormalize
  assert cfg['skymoe']['native'] == 'qwen2_moe'
  model = load_native(out)
  layers = model.model.language_model.layers
  assert [type(layer.mlp).__name__ for layer in layers] == [
      'Qwen2MoeSparseMoeBlock', 'Qwen2MoeMLP', 'Qwen2MoeSparseMoeBlock', 'Qwen2MoeMLP']
  args = inputs(config, seed=3, low_token=1)
  ours = jax_logits(config, params, args)  # LoRA unmerged: the merge is under test too
  theirs = hf_text_logits(config, model, args)
  mask = args[2]
  assert np.abs(ours).max() > 0.5
  assert np.abs(ours - theirs)[mask].max() <= TOL
  # verify_native (the command's --verify) runs the same comparison on its own inputs.
  assert native_export.verify_native(out, params, config) <= TOL
  # The weighting matters at these weights: the other renormalize setting is another model.
  other = plain_router_config(not config.model.moe.renormalize)
  assert np.abs(jax_logits(other, params, args) - ours)[mask].max() > 1e-3


def test_moe_greedy_tokens_match_jax_generation(moe):
  config, params, out = moe
  n = 6
  args = inputs(config, seed=4, low_token=1)
  fn = generate.make_generate_fn(factory.create_model(config), config, n, eos_id=-1, pad_id=0)
  want, _ = fn(params, *args)
  model = load_native(out)
  ids, pixels, mask = hf_inputs(config, args)
  for row in range(ids.shape[0]):
    real = mask[row].bool()
    prompt = ids[row][real][None]
    with torch.no_grad():
      got = model.generate(input_ids=prompt, pixel_values=pixels[row:row + 1],
                           attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                           do_sample=False)
    np.testing.assert_array_equal(got[0, prompt.shape[1]:].numpy(), np.asarray(want[row]))


def test_dense_native_export_is_llava_llama_and_matches_jax(tmp_path):
  config = load_config('tiny', 'stage1')  # dense, LoRA on q/v
  config.model.llm.rope_theta = 500.0
  params = random_params(config, seed=1)
  info = native_export.export_native(params, config.model, tmp_path, image_token_index=IMAGE_TOKEN)
  cfg = json.loads((tmp_path / 'config.json').read_text())
  assert cfg['text_config']['model_type'] == 'llama' and cfg['skymoe']['native'] == 'llama'
  assert cfg['text_config']['rope_theta'] == 500.0
  # Dense: the very tensors of our default export.
  assert info['num_tensors'] == len(to_torch.export_tensors(
      lora.merge_lora(params, config.model.lora.alpha), config.model))
  args = inputs(config, seed=3, low_token=1)
  theirs = hf_text_logits(config, load_native(tmp_path), args)
  assert np.abs(jax_logits(config, params, args) - theirs)[args[2]].max() <= TOL


def test_what_qwen2_moe_cannot_express_is_refused_naming_the_field(tmp_path):
  adaptive = load_config('tiny')  # the adaptive router: logits depend on task and granularity
  params = random_params(plain_router_config(False), seed=2)
  with pytest.raises(native_export.NotExpressibleError, match=r'model\.moe\.adaptive=True'):
    native_export.export_native(params, adaptive.model, tmp_path / 'a')
  predicted = load_config('tiny')  # the condition head: no module of LLaVA's holds it
  predicted.model.moe.condition = 'predicted'
  with pytest.raises(native_export.NotExpressibleError,
                     match=r"model\.moe\.condition='predicted'.*condition head"):
    native_export.export_native(params, predicted.model, tmp_path / 'p')
  novel = plain_router_config(False)
  novel.model.llm.qk_norm = True  # a field the mapping was not written for
  with pytest.raises(native_export.NotExpressibleError, match=r'model\.llm\.qk_norm'):
    native_export.export_native(params, novel.model, tmp_path / 'b')
  posemb = plain_router_config(False)
  posemb.model.vision.token_posemb = 'sincos2d'  # LLaVA's projector adds no table
  with pytest.raises(native_export.NotExpressibleError, match=r'model\.vision\.token_posemb'):
    native_export.export_native(params, posemb.model, tmp_path / 'c')
  grid = plain_router_config(False)
  grid.model.llm.image_rope = '2d'  # LLaMA's rotary positions are one index per token
  with pytest.raises(native_export.NotExpressibleError, match=r"model\.llm\.image_rope='2d'"):
    native_export.export_native(params, grid.model, tmp_path / 'd')
  assert not list(tmp_path.iterdir())  # refused before anything is written


def test_native_folder_rules_shards_and_overwrite(moe, tmp_path):
  """Sharded (index with the Qwen2-MoE names) and loadable; the out-folder rules are
  to_torch's: a foreign folder is refused, an earlier native export replaced only with
  overwrite."""
  config, params, _ = moe
  out = tmp_path / 'out'
  info = native_export.export_native(params, config.model, out, max_shard_bytes=40_000,
                                     image_token_index=IMAGE_TOKEN)
  assert len(info['files']) > 3
  index = json.loads((out / 'model.safetensors.index.json').read_text())
  names = set(index['weight_map'])
  assert 'language_model.model.layers.2.mlp.experts.3.down_proj.weight' in names
  assert 'language_model.model.layers.0.mlp.shared_expert_gate.weight' in names
  assert 'language_model.model.layers.1.self_attn.k_proj.bias' in names
  assert not any('block_sparse_moe' in n for n in names)
  with pytest.raises(to_torch.OutputFolderError, match='pass --overwrite'):
    native_export.export_native(params, config.model, out)
  native_export.export_native(params, config.model, out, overwrite=True,
                              image_token_index=IMAGE_TOKEN)
  assert not (out / 'model.safetensors.index.json').exists()  # the new one, in one file
  args = inputs(config, seed=5, low_token=1)
  assert np.abs(jax_logits(config, params, args) - hf_text_logits(config, load_native(out), args))[
      args[2]].max() <= TOL
  # bf16: the zero tensors take the export's dtype too, and the folder still loads cleanly.
  native_export.export_native(params, config.model, tmp_path / 'bf16', dtype='bf16')
  header = from_hf.SafetensorsFile(tmp_path / 'bf16' / 'model.safetensors')
  assert header['language_model.model.layers.0.mlp.shared_expert_gate.weight'].dtype == np.dtype(
      'bfloat16')
  load_native(tmp_path / 'bf16')
  foreign = tmp_path / 'foreign'
  foreign.mkdir()
  (foreign / 'notes.txt').write_text('mine')
  with pytest.raises(to_torch.OutputFolderError, match='not an export of ours'):
    native_export.export_native(params, config.model, foreign, overwrite=True)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['bf16', 'foreign', 'out']  # no staging
