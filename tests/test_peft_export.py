"""Stage I's LoRA as a PEFT adapter: base (LoRA left out) + adapter == the merged export.

Oracles: peft itself (PeftModel.from_pretrained on transformers' LlavaForConditionalGeneration
of the base, no remote code) must give the logits of the merged export loaded the same way and
of our JAX model on the unmerged tree; the adapter must matter (the base alone differs).
"""
import json

import numpy as np
import pytest
from safetensors.numpy import load_file

torch = pytest.importorskip('torch')
torch.set_num_threads(1)  # tiny models: threads only contend on a shared 2-core machine
transformers = pytest.importorskip('transformers')
peft = pytest.importorskip('peft')

from conftest import load_config  # noqa: E402
from test_export import (  # noqa: E402
    TOL, _run, _workdir_with_checkpoint, inputs, jax_logits, random_params)
from test_native_export import (  # noqa: E402
    IMAGE_TOKEN, hf_text_logits, load_native, plain_router_config)
from skymoe_jax.interop import native_export, peft_export, to_torch  # noqa: E402


def stage1_config():
  return load_config('tiny', 'stage1')  # dense, LoRA rank 4 on query/value


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
  """(config, params, adapter export, merged export); random params: LoRA B is not zero."""
  config = stage1_config()
  params = random_params(config, seed=1)
  root = tmp_path_factory.mktemp('peft')
  peft_export.export_adapter(params, config.model, root / 'base', image_token_index=IMAGE_TOKEN)
  to_torch.export_params(params, config.model, root / 'merged', image_token_index=IMAGE_TOKEN)
  return config, params, root / 'base', root / 'merged'


def load_with_adapter(base):
  model = peft.PeftModel.from_pretrained(load_native(base), base / peft_export.ADAPTER_FOLDER)
  return model.eval()


def test_base_plus_adapter_equals_the_merged_export(exported):
  config, params, base, merged = exported
  args = inputs(config, seed=3, low_token=1)
  mask = args[2]
  adapted = load_with_adapter(base)
  got = hf_text_logits(config, adapted, args)
  want = hf_text_logits(config, load_native(merged), args)
  assert np.abs(want).max() > 0.5
  assert np.abs(got - want)[mask].max() <= TOL
  assert np.abs(got - jax_logits(config, params, args))[mask].max() <= TOL
  # The adapter matters: the base alone is another model.
  assert np.abs(hf_text_logits(config, load_native(base), args) - want)[mask].max() > 1e-2
  assert native_export.verify_native(base, params, config,
                                     adapter=base / peft_export.ADAPTER_FOLDER) <= TOL
  # transformers' own adapter loading (base_model_name_or_path) gives the same model.
  auto = transformers.LlavaForConditionalGeneration.from_pretrained(
      base / peft_export.ADAPTER_FOLDER, dtype=torch.float32, attn_implementation='eager')
  assert np.abs(hf_text_logits(config, auto.eval(), args) - want)[mask].max() <= TOL
  # PEFT put LoRA on exactly our projections: q/v of every decoder layer, none in the vision tower.
  adapted_names = sorted(n for n, m in adapted.named_modules() if isinstance(
      m, peft.tuners.lora.LoraLayer))
  llm = config.model.llm
  assert len(adapted_names) == 2 * llm.num_layers
  assert all('language_model' in n and n.endswith(('q_proj', 'v_proj')) for n in adapted_names)


def test_adapter_folder_holds_our_rank_alpha_and_layout(exported):
  config, params, base, _ = exported
  folder = base / peft_export.ADAPTER_FOLDER
  assert sorted(p.name for p in folder.iterdir()) == ['adapter_config.json',
                                                      'adapter_model.safetensors']
  lc = peft.LoraConfig.from_pretrained(folder)
  assert (lc.r, lc.lora_alpha, lc.use_rslora) == (4, 8.0, False)
  cfg = json.loads((base / 'config.json').read_text())
  assert cfg['skymoe']['lora_merged_from_rank'] == 0 and cfg['skymoe']['model']['lora']['rank'] == 0
  assert cfg['skymoe']['lora_adapter'] == {'folder': 'adapter', 'rank': 4, 'alpha': 8.0,
                                           'targets': ['query', 'value']}
  # lora_A = our A transposed, lora_B = our B [r, heads, head_dim] flattened and transposed.
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  sd = load_file(folder / 'adapter_model.safetensors')
  assert len(sd) == 4 * config.model.llm.num_layers
  name = 'base_model.model.language_model.model.layers.2.self_attn.q_proj.lora_'
  ours = params['decoder']['blocks']['layer_0']['attn']['query_lora']  # layer 2 = block 2, index 2
  np.testing.assert_array_equal(sd[name + 'A.weight'], ours['a'][2].T)
  np.testing.assert_array_equal(sd[name + 'B.weight'], ours['b'][2].reshape(4, -1).T)


def test_adapter_on_a_qwen2_moe_base(tmp_path):
  """LoRA beside a plain-router MoE: the base is the native LLaVA + Qwen2-MoE export (whose
  q/k/v projections carry zero biases); base + adapter still compute our model."""
  config = plain_router_config(True)
  params = random_params(config, seed=2)
  peft_export.export_adapter(params, config.model, tmp_path, image_token_index=IMAGE_TOKEN)
  assert json.loads((tmp_path / 'config.json').read_text())['text_config']['model_type'] == (
      'qwen2_moe')
  assert native_export.verify_native(tmp_path, params, config,
                                     adapter=tmp_path / peft_export.ADAPTER_FOLDER) <= TOL


def test_what_has_no_adapter_or_no_native_base_is_refused(tmp_path):
  params = random_params(stage1_config(), seed=1)
  merged = load_config('tiny', 'stage2')  # LoRA merged away
  with pytest.raises(to_torch.ExportError, match=r'model\.lora\.rank=0'):
    peft_export.export_adapter(params, merged.model, tmp_path / 'a')
  adaptive = load_config('tiny')  # LoRA on an adaptive-router MoE: no native base
  with pytest.raises(native_export.NotExpressibleError, match=r'model\.moe\.adaptive'):
    peft_export.export_adapter(random_params(adaptive, seed=1), adaptive.model, tmp_path / 'b')
  # A condition head has no native base to sit in, with LoRA or merged (stage II, rank 0).
  for arg in (None, 'stage2'):
    predicted = load_config('tiny', arg)
    predicted.model.moe.condition = 'predicted'
    with pytest.raises(native_export.NotExpressibleError,
                       match=r"model\.moe\.condition='predicted'.*no condition head"):
      peft_export.export_adapter(random_params(predicted, seed=1), predicted.model,
                                 tmp_path / 'c')
  assert not list(tmp_path.iterdir())


def test_adapter_export_from_a_workdir(exported, tmp_path):
  """A stage-I workdir's checkpoint (params-only restore): the same two folders, the step
  recorded; a second export onto it is refused and leaves it as it was."""
  config, params, _, merged = exported
  _workdir_with_checkpoint(config, params, tmp_path / 'work')
  out = tmp_path / 'out'
  info = peft_export.export_workdir(tmp_path / 'work', out, image_token_index=IMAGE_TOKEN)
  assert info['step'] == 3 and info['adapter_bytes'] > 0
  assert json.loads((out / 'config.json').read_text())['skymoe']['step'] == 3
  args = inputs(config, seed=5, low_token=1)
  got = hf_text_logits(config, load_with_adapter(out), args)
  want = hf_text_logits(config, load_native(merged), args)
  assert np.abs(got - want)[args[2]].max() <= TOL
  before = sorted(p.relative_to(out) for p in out.rglob('*'))
  with pytest.raises(to_torch.OutputFolderError, match=str(out)):
    peft_export.export_workdir(tmp_path / 'work', out)
  assert sorted(p.relative_to(out) for p in out.rglob('*')) == before
  # --overwrite replaces it (the adapter folder is a file of ours), with the same adapter.
  adapter = load_file(out / 'adapter' / 'adapter_model.safetensors')
  peft_export.export_workdir(tmp_path / 'work', out, image_token_index=IMAGE_TOKEN,
                             overwrite=True)
  again = load_file(out / 'adapter' / 'adapter_model.safetensors')
  assert sorted(again) == sorted(adapter)
  assert all(np.array_equal(again[k], adapter[k]) for k in adapter)
  assert json.loads((out / 'generation_config.json').read_text())['do_sample'] is False


@pytest.mark.slow
def test_export_cli_native_layout_and_adapter(exported, tmp_path):
  """The command: --layout=native --lora=adapter --verify prints transformers + PEFT against
  JAX; --lora=adapter without --layout=native is a one-line usage error."""
  config, params, _, _ = exported
  _workdir_with_checkpoint(config, params, tmp_path / 'work')
  work, out = tmp_path / 'work', tmp_path / 'out'
  r = _run(['skymoe_jax.export', f'--workdir={work}', f'--out={out}', '--layout=native',
            '--lora=adapter', '--verify'])
  assert r.returncode == 0, r.stderr[-3000:]
  diff = float(r.stdout.split('+ PEFT adapter vs JAX = ')[1].split()[0])
  assert diff <= TOL and (out / 'adapter' / 'adapter_config.json').exists()
  r = _run(['skymoe_jax.export', f'--workdir={work}', f'--out={tmp_path / "b"}', '--lora=adapter'])
  assert r.returncode == 2 and 'add --layout=native' in r.stderr
  assert not (tmp_path / 'b').exists()
