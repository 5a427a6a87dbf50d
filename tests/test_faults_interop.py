"""Reliability of interop: nothing a user has is ever lost or silently wrong.

Each test is a probe that once failed:
- export: an --out that holds anything (a model of someone else, an earlier export, a training
  workdir) was overwritten in place, and a crash left a half-written folder that looked complete;
- import: a safetensors or GGUF file whose tensors share bytes, an HF config.json or GGUF
  metadata that disagrees with the config (rope_theta, rms_norm_eps, heads), non-finite weights;
- a damaged or foreign export folder (config.json not JSON, fields missing) failed with a bare
  JSONDecodeError / KeyError / AttributeError instead of one message naming the file.
Tiny configs; workdirs on a one-device mesh (as tests/test_export.py).
"""
import json
import logging
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip('torch')
torch.set_num_threads(1)
transformers = pytest.importorskip('transformers')

from conftest import REPO, load_config  # noqa: E402
from test_export import _workdir_with_checkpoint, dense_config, random_params  # noqa: E402
from test_tokenizer import _corpus  # noqa: E402
from skymoe_jax import import_weights  # noqa: E402
from skymoe_jax.data import tokenizer as tokenizer_lib  # noqa: E402
from skymoe_jax.interop import export_format, from_hf, gguf, to_torch, torch_model  # noqa: E402

# What every export writes beside its weights and config.json: the code transformers runs and
# the generation config (the processor's files too when there is a tokenizer).
HF_FILES = [*export_format.SHIPPED_CODE, export_format.GENERATION_FILE]


@pytest.fixture(scope='module')
def dense():
  config = dense_config()
  return config, random_params(config, seed=1)


def _snapshot(folder):
  """{relative path: bytes} of every file under folder."""
  folder = pathlib.Path(folder)
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob('*'))
          if p.is_file()}


def _siblings(folder):
  """Names next to folder other than its own: staging leftovers would show here."""
  folder = pathlib.Path(folder)
  return sorted(p.name for p in folder.parent.iterdir() if p.name != folder.name)


# ----------------------------------------------------------------------------- 1. export


def test_export_refuses_a_folder_it_did_not_write(dense, tmp_path):
  """A folder holding someone else's model is never touched, with or without --overwrite."""
  config, params = dense
  theirs = tmp_path / 'theirs'
  theirs.mkdir()
  (theirs / 'model-00001-of-00002.safetensors').write_bytes(b'their weights')
  (theirs / 'config.json').write_text('{"model_type": "llama"}')
  (theirs / 'tokenizer.model').write_bytes(b'their tokenizer')
  (theirs / 'notes.txt').write_text('mine')
  before = _snapshot(theirs)
  for kw in ({}, {'overwrite': True}):
    with pytest.raises(to_torch.OutputFolderError, match=r'theirs.* not an export of ours'):
      to_torch.export_params(params, config.model, theirs, **kw)
    assert _snapshot(theirs) == before
  assert _siblings(theirs) == []
  # A file where the folder should be is refused too.
  (tmp_path / 'a_file').write_text('x')
  with pytest.raises(to_torch.OutputFolderError, match=r'a_file.* not a folder'):
    to_torch.export_params(params, config.model, tmp_path / 'a_file')
  assert (tmp_path / 'a_file').read_text() == 'x'


def test_earlier_export_is_replaced_only_with_overwrite(dense, tmp_path):
  config, params = dense
  out = tmp_path / 'out'
  to_torch.export_params(params, config.model, out, max_shard_bytes=40_000)  # sharded
  first = _snapshot(out)
  assert 'model.safetensors.index.json' in first
  other = random_params(config, seed=7)
  with pytest.raises(to_torch.OutputFolderError, match=r'out.* earlier export.*--overwrite'):
    to_torch.export_params(other, config.model, out)
  assert _snapshot(out) == first
  # An earlier export that also holds a file of the user's is never replaced.
  (out / 'README.md').write_text('my notes')
  with pytest.raises(to_torch.OutputFolderError, match=r'README\.md'):
    to_torch.export_params(other, config.model, out, overwrite=True)
  assert (out / 'README.md').read_text() == 'my notes'
  (out / 'README.md').unlink()
  # --overwrite replaces it as a whole: the old shards do not linger next to the new file.
  info = to_torch.export_params(other, config.model, out, overwrite=True)
  assert info['files'] == ['model.safetensors']
  assert sorted(p.name for p in out.iterdir()) == sorted(['config.json', 'model.safetensors',
                                                          *HF_FILES])
  assert _siblings(out) == []
  back, _ = to_torch.load_export(out)
  np.testing.assert_array_equal(back['projector']['fc1']['bias'],
                                other['projector']['fc1']['bias'])


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  """A stage-I training workdir with one checkpoint (step 3) and a small trained tokenizer."""
  config = dense_config()
  config.mesh.data = 1
  path = tmp_path_factory.mktemp('runs') / 'work'
  _workdir_with_checkpoint(config, random_params(config, seed=1), path)
  (path / 'tokenizer.model').write_bytes(tokenizer_lib.train(_corpus(), None, 256).model_bytes)
  return path


def test_export_never_writes_into_a_workdir(workdir, tmp_path):
  """The workdir itself, a folder inside it, a folder containing it, another workdir: refused
  before anything is read or written, --overwrite or not."""
  before = _snapshot(workdir)
  for out in (workdir, workdir / 'hf', workdir / 'checkpoints' / 'x', workdir.parent):
    for kw in ({}, {'overwrite': True}):
      with pytest.raises(to_torch.OutputFolderError, match=r'workdir'):
        to_torch.export_workdir(workdir, out, image_token_index=0, **kw)
  assert _snapshot(workdir) == before
  assert not (workdir / 'hf').exists()
  # Another training workdir (its config.json; or its checkpoints/) and a folder inside it.
  other = tmp_path / 'other_run'
  other.mkdir()
  (other / 'config.json').write_text((workdir / 'config.json').read_text())
  bare = tmp_path / 'bare_run'
  (bare / 'checkpoints').mkdir(parents=True)
  for out in (other, other / 'export', bare):
    with pytest.raises(to_torch.OutputFolderError, match=r'training workdir'):
      to_torch.export_workdir(workdir, out, image_token_index=0, overwrite=True)
  assert sorted(p.name for p in other.iterdir()) == ['config.json']
  assert sorted(p.name for p in bare.iterdir()) == ['checkpoints']


def test_export_appears_atomically(dense, workdir, tmp_path, monkeypatch):
  """A crash while writing leaves no folder at --out (or the earlier export untouched), and
  no staging folder behind; a finished export holds everything, the tokenizer included."""
  config, params = dense
  out = tmp_path / 'out'
  saves = []
  real_save = to_torch.save_file

  def crash_on_second(*args, **kwargs):
    saves.append(1)
    if len(saves) == 2:
      raise OSError('disk full (simulated)')
    return real_save(*args, **kwargs)
  monkeypatch.setattr(to_torch, 'save_file', crash_on_second)
  with pytest.raises(OSError, match='simulated'):
    to_torch.export_params(params, config.model, out, max_shard_bytes=40_000)
  assert not out.exists() and _siblings(out) == []
  # Over an earlier export: the crash leaves that one exactly as it was.
  monkeypatch.setattr(to_torch, 'save_file', real_save)
  to_torch.export_params(params, config.model, out)
  first = _snapshot(out)
  saves.clear()
  monkeypatch.setattr(to_torch, 'save_file', crash_on_second)
  with pytest.raises(OSError, match='simulated'):
    to_torch.export_params(random_params(config, seed=7), config.model, out,
                           max_shard_bytes=40_000, overwrite=True)
  assert _snapshot(out) == first and _siblings(out) == []
  # From a workdir: weights, config.json and the tokenizer appear together.
  monkeypatch.setattr(to_torch, 'save_file', real_save)
  fresh = tmp_path / 'from_workdir'
  info = to_torch.export_workdir(workdir, fresh, image_token_index=0)
  assert info['step'] == 3
  assert sorted(p.name for p in fresh.iterdir()) == sorted([
      'config.json', 'model.safetensors', 'tokenizer.model', *HF_FILES,
      *export_format.PROCESSOR_FILES])
  assert (fresh / 'tokenizer.model').read_bytes() == (workdir / 'tokenizer.model').read_bytes()
  assert _siblings(fresh) == ['out']
  # An empty folder made beforehand is fine (and replaced by the finished export).
  empty = tmp_path / 'empty'
  empty.mkdir()
  to_torch.export_params(params, config.model, empty)
  assert (empty / 'config.json').exists()


def _run(args):
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  return subprocess.run([sys.executable, '-m'] + args, cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=300, check=False)


def test_export_cli_refuses_the_workdir_as_out(workdir):
  before = _snapshot(workdir)
  for extra in ([], ['--overwrite']):
    r = _run(['skymoe_jax.export', f'--workdir={workdir}', f'--out={workdir}'] + extra)
    assert r.returncode != 0
    assert 'OutputFolderError' in r.stderr, r.stderr[-2000:]
    assert 'never writes into a training workdir' in r.stderr
    assert _snapshot(workdir) == before


# ----------------------------------------------------------------------------- 6. import


def _llama_config(llm, **overrides):
  """An HF LlamaConfig of exactly the config's decoder (overrides change it)."""
  kw = dict(vocab_size=llm.vocab_size, hidden_size=llm.embed_dim,
            num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
            num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim,
            intermediate_size=llm.mlp_dim, rms_norm_eps=llm.norm_eps, rope_theta=llm.rope_theta,
            tie_word_embeddings=bool(llm.tie_embeddings), initializer_range=0.1)
  kw.update(overrides)
  return transformers.LlamaConfig(**kw)


def _hf_llama(folder, llm, **overrides):
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(_llama_config(llm, **overrides)).eval()
  model.save_pretrained(folder)
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _header(path):
  data = pathlib.Path(path).read_bytes()
  n = int.from_bytes(data[:8], 'little')
  return json.loads(data[8:8 + n]), data[8 + n:]


def _write_with_header(path, header, body):
  raw = json.dumps(header).encode()
  pathlib.Path(path).write_bytes(len(raw).to_bytes(8, 'little') + raw + body)


def test_safetensors_with_overlapping_tensors_is_refused(tmp_path):
  """Layer 1's q_proj pointed at layer 0's bytes: the library refuses the header on opening;
  the error names the file, the tensor, and what is wrong with it."""
  config = load_config('tiny', 'stage1')
  _hf_llama(tmp_path / 'llama', config.model.llm)
  path = tmp_path / 'llama' / 'model.safetensors'
  header, body = _header(path)
  q0, q1 = (f'model.layers.{i}.self_attn.q_proj.weight' for i in (0, 1))
  header[q1]['data_offsets'] = list(header[q0]['data_offsets'])
  _write_with_header(path, header, body)
  with pytest.raises(from_hf.CheckpointFileError,
                     match=r'llama/model\.safetensors: .*invalid offset.*overlap'):
    import_weights.convert_pretrained(config.model, llm=tmp_path / 'llama')
  with pytest.raises(torch_model.LoadError, match=r'model\.safetensors: .*overlap'):
    torch_model.read_safetensors(path)
  # A partial overlap (the second tensor starts inside the first) the same.
  header, _ = _header(path)
  start, end = header[q0]['data_offsets']
  header[q1]['data_offsets'] = [start + 8, end + 8]
  _write_with_header(path, header, body)
  with pytest.raises(from_hf.CheckpointFileError, match=r'model\.safetensors: .*overlap'):
    from_hf.open_checkpoint(path)


def _gguf_lib():
  return pytest.importorskip('gguf')


# GGUF names of the HF LLaMA tensors (gguf.py reads them back).
_TO_GGUF = {v: k for k, v in gguf._GLOBAL_NAMES.items()}  # pylint: disable=protected-access


def _gguf_name(hf):
  if hf in _TO_GGUF:
    return _TO_GGUF[hf]
  i, rest = hf[len('model.layers.'):].split('.', 1)
  inverse = {v: k for k, v in gguf._LAYER_NAMES.items()}  # pylint: disable=protected-access
  return f'blk.{i}.{inverse[rest]}'


def _permute_rows(w, heads):
  """llama.cpp's q/k permutation (gguf.unpermute_rows undoes it)."""
  dim = w.shape[0] // heads // 2
  return w.reshape(heads, 2, dim, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_llama_gguf(path, llm, sd, **meta):
  """A float32 LLaMA GGUF of the HF state dict sd, with the config's metadata (meta: changes)."""
  lib = _gguf_lib()
  m = dict(heads=llm.num_heads, kv_heads=llm.num_kv_heads, freq_base=llm.rope_theta,
           eps=llm.norm_eps, head_dim=llm.head_dim)
  m.update(meta)
  writer = lib.GGUFWriter(path, 'llama')
  writer.add_block_count(llm.num_layers)
  writer.add_embedding_length(llm.embed_dim)
  writer.add_feed_forward_length(llm.mlp_dim)
  writer.add_head_count(m['heads'])
  writer.add_head_count_kv(m['kv_heads'])
  writer.add_rope_dimension_count(m['head_dim'])
  writer.add_rope_freq_base(m['freq_base'])
  writer.add_layer_norm_rms_eps(m['eps'])
  writer.add_context_length(llm.max_seq_len)
  for name, w in sd.items():
    if name.endswith('q_proj.weight'):
      w = _permute_rows(w, llm.num_heads)
    elif name.endswith('k_proj.weight'):
      w = _permute_rows(w, llm.num_kv_heads)
    writer.add_tensor(_gguf_name(name), np.ascontiguousarray(w, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_gguf_with_overlapping_tensors_is_refused(tmp_path):
  lib = _gguf_lib()
  writer = lib.GGUFWriter(tmp_path / 'ok.gguf', 'llama')
  writer.add_tensor('token_embd.weight', np.ones((16, 8), np.float32))
  writer.add_tensor('output_norm.weight', np.full((8,), 2, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  data = bytearray((tmp_path / 'ok.gguf').read_bytes())
  fields = {t.name: t.field for t in lib.GGUFReader(tmp_path / 'ok.gguf').tensors}

  def offset_at(field):  # where the tensor-info record keeps its data offset
    return field.offset + sum(int(p.nbytes) for p in field.parts[:-1])
  first = int(fields['token_embd.weight'].parts[-1][0])
  at = offset_at(fields['output_norm.weight'])
  data[at:at + 8] = (first + 16).to_bytes(8, 'little')  # inside token_embd's bytes
  (tmp_path / 'overlap.gguf').write_bytes(bytes(data))
  with pytest.raises(from_hf.CheckpointFileError,
                     match=r"overlap\.gguf: tensors 'token_embd\.weight' and "
                           r"'output_norm\.weight' overlap"):
    gguf.read_gguf(tmp_path / 'overlap.gguf')


def test_hf_config_json_that_disagrees_with_the_config_is_refused(tmp_path):
  """rope_theta / rms_norm_eps / the head split of config.json are invisible in the tensor
  shapes: a mismatch is refused naming the checkpoint's value, the config's and the field."""
  config = load_config('tiny', 'stage1')
  llm = config.model.llm
  cases = {
      'rope': (dict(rope_theta=500000.0), r'rope_theta.*500000\.0.*'
               r'config\.model\.llm\.rope_theta.*10000\.0.*--config\.model\.llm\.rope_theta='),
      'eps': (dict(rms_norm_eps=1e-6), r'rms_norm_eps.*1e-06.*config\.model\.llm\.norm_eps'),
      'heads': (dict(num_attention_heads=8, num_key_value_heads=4, head_dim=8),
                r'num_attention_heads.*8.*config\.model\.llm\.num_heads.*4'),
      'tied': (dict(tie_word_embeddings=True), r'config\.model\.llm\.tie_embeddings'),
      'scaling': (dict(rope_parameters={'rope_type': 'linear', 'factor': 2.0,
                                        'rope_theta': 10000.0}), r"rope_type 'linear'"),
      'deeper': (dict(num_hidden_layers=llm.num_layers + 2), r'config\.model\.llm\.num_layers'),
  }
  for name, (overrides, pattern) in cases.items():
    _hf_llama(tmp_path / name, llm, **overrides)
    with pytest.raises(from_hf.ConfigMismatchError, match=rf'{name}/config\.json.*{pattern}'):
      import_weights.convert_pretrained(config.model, llm=tmp_path / name)
  # Set as the checkpoint says, the same folder imports, and its RoPE base is the one used.
  config.model.llm.rope_theta = 500000.0
  assert 'decoder' in import_weights.convert_pretrained(config.model, llm=tmp_path / 'rope')
  # An older config.json (rope_theta at the top level, rope_scaling) is read the same way.
  old = json.loads((tmp_path / 'rope' / 'config.json').read_text())
  old.pop('rope_parameters', None)
  old.update(rope_theta=250000.0, rope_scaling=None)
  (tmp_path / 'rope' / 'config.json').write_text(json.dumps(old))
  with pytest.raises(from_hf.ConfigMismatchError, match=r'250000\.0.*500000\.0'):
    import_weights.convert_pretrained(config.model, llm=tmp_path / 'rope')


def test_hf_clip_config_json_that_disagrees_is_refused(tmp_path):
  config = load_config('tiny', 'stage1')
  v = config.model.vision
  torch.manual_seed(0)
  transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
      hidden_size=v.width, num_hidden_layers=v.depth, num_attention_heads=2 * v.num_heads,
      intermediate_size=v.mlp_dim, image_size=v.image_size, patch_size=v.patch_size,
      hidden_act='quick_gelu', layer_norm_eps=v.norm_eps)).save_pretrained(tmp_path / 'clip')
  with pytest.raises(from_hf.ConfigMismatchError,
                     match=r'clip/config\.json.*num_attention_heads.*4.*'
                           r'config\.model\.vision\.num_heads.*2'):
    import_weights.convert_pretrained(config.model, clip=tmp_path / 'clip')


def test_gguf_metadata_that_disagrees_with_the_config_is_refused(tmp_path):
  _gguf_lib()
  config = load_config('tiny', 'stage1')
  llm = config.model.llm
  sd = _hf_llama(tmp_path / 'hf', llm)
  _write_llama_gguf(tmp_path / 'rope.gguf', llm, sd, freq_base=500000.0)
  with pytest.raises(from_hf.ConfigMismatchError,
                     match=r'rope\.gguf.*freq_base.*500000\.0.*config\.model\.llm\.rope_theta'):
    import_weights.convert_pretrained(config.model, llm=tmp_path / 'rope.gguf')
  _write_llama_gguf(tmp_path / 'eps.gguf', llm, sd, eps=1e-6)
  with pytest.raises(from_hf.ConfigMismatchError, match=r'eps\.gguf.*config\.model\.llm\.norm_eps'):
    import_weights.convert_pretrained(config.model, llm=tmp_path / 'eps.gguf')
  # Matching metadata imports, to exactly the HF checkpoint's decoder.
  _write_llama_gguf(tmp_path / 'ok.gguf', llm, sd)
  got = import_weights.convert_pretrained(config.model, llm=tmp_path / 'ok.gguf')['decoder']
  dense = load_config('tiny', 'stage1').model
  dense.lora.rank = 0
  want = from_hf.llama_params(sd, dense)
  np.testing.assert_array_equal(got['blocks']['layer_0']['attn']['query']['kernel'],
                                want['blocks']['layer_0']['attn']['query']['kernel'])


def test_non_finite_weights_are_logged_by_name(tmp_path, caplog):
  config = load_config('tiny', 'stage1')
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(_llama_config(config.model.llm)).eval()
  with torch.no_grad():
    model.model.layers[2].mlp.up_proj.weight[3, 5] = float('nan')
    model.model.embed_tokens.weight[0, 0] = float('inf')
  model.save_pretrained(tmp_path / 'llama')
  with caplog.at_level(logging.WARNING):
    import_weights.convert_pretrained(config.model, llm=tmp_path / 'llama')
  text = caplog.text
  assert "'model.layers.2.mlp.up_proj.weight'" in text and '1 of 8192' in text
  assert "'model.embed_tokens.weight'" in text
  assert 'model.layers.1.mlp.up_proj.weight' not in text  # finite tensors are not named


def test_missing_hf_config_json_is_warned_about(tmp_path, caplog):
  config = load_config('tiny', 'stage1')
  sd = _hf_llama(tmp_path / 'llama', config.model.llm)
  (tmp_path / 'llama' / 'config.json').unlink()
  del sd
  with caplog.at_level(logging.WARNING):
    import_weights.convert_pretrained(config.model, llm=tmp_path / 'llama')
  assert 'no config.json' in caplog.text and 'rope_theta' in caplog.text


# ----------------------------------------------------------------------------- damaged exports


@pytest.fixture(scope='module')
def good_export(dense, tmp_path_factory):
  config, params = dense
  out = tmp_path_factory.mktemp('exports') / 'good'
  to_torch.export_params(params, config.model, out)
  return out


def _edit(cfg, path, value=None, delete=False):
  cfg = json.loads(json.dumps(cfg))
  node = cfg
  for key in path[:-1]:
    node = node[key]
  if delete:
    del node[path[-1]]
  else:
    node[path[-1]] = value
  return json.dumps(cfg)


_DAMAGED = {
    'not_json': (lambda c: '{"skymoe": ', r'config\.json: not JSON'),
    'a_list': (lambda c: '[1, 2]', r'config\.json: .*list, not an object'),
    'a_string': (lambda c: '"skymoe"', r'config\.json: .*str, not an object'),
    'not_ours': (lambda c: _edit(c, ('skymoe',), delete=True), r'config\.json.* no skymoe section'),
    'no_model': (lambda c: _edit(c, ('skymoe', 'model'), delete=True),
                 r'config\.json: skymoe\.model is missing'),
    'no_llm': (lambda c: _edit(c, ('skymoe', 'model', 'llm'), delete=True),
               r'config\.json: skymoe\.model lacks llm\b'),
    'no_heads': (lambda c: _edit(c, ('skymoe', 'model', 'llm', 'num_heads'), delete=True),
                 r'config\.json: skymoe\.model lacks llm\.num_heads'),
    'llm_a_number': (lambda c: _edit(c, ('skymoe', 'model', 'llm'), 3),
                     r'config\.json: skymoe\.model\.llm is not an object'),
    'newer': (lambda c: _edit(c, ('skymoe', 'format_version'), 99),
              r'config\.json: skymoe\.format_version 99'),
}


@pytest.mark.parametrize('name', sorted(_DAMAGED))
def test_damaged_export_config_names_the_file(good_export, tmp_path, name):
  make, pattern = _DAMAGED[name]
  folder = tmp_path / name
  folder.mkdir()
  (folder / 'model.safetensors').symlink_to(good_export / 'model.safetensors')
  cfg = json.loads((good_export / 'config.json').read_text())
  (folder / 'config.json').write_text(make(cfg))
  pattern = rf'{name}/' + pattern
  with pytest.raises(from_hf.CheckpointFileError, match=pattern):
    to_torch.load_export(folder)
  with pytest.raises(torch_model.LoadError, match=pattern):
    torch_model.SkyMoEForConditionalGeneration.from_pretrained(folder)


def test_export_folder_without_config_or_index_names_it(good_export, tmp_path):
  with pytest.raises(from_hf.CheckpointFileError, match=r'empty: no config\.json'):
    to_torch.load_export(tmp_path / 'empty')
  (tmp_path / 'bad_index').mkdir()
  (tmp_path / 'bad_index' / 'config.json').write_text((good_export / 'config.json').read_text())
  (tmp_path / 'bad_index' / 'model.safetensors.index.json').write_text('[]')
  with pytest.raises(torch_model.LoadError, match=r'bad_index/model\.safetensors\.index\.json'):
    torch_model.SkyMoEForConditionalGeneration.from_pretrained(tmp_path / 'bad_index')
  with pytest.raises(from_hf.CheckpointFileError,
                     match=r'bad_index/model\.safetensors\.index\.json'):
    to_torch.load_export(tmp_path / 'bad_index')
