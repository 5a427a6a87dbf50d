"""Parity with Hugging Face PyTorch models built from tiny random configs (no downloads).

The converters in skymoe_jax.interop.from_hf load HF weights into our trees; our vision tower
must then reproduce CLIPVisionModel's hidden states (position interpolation included) and our
dense decoder LlamaForCausalLM's logits, in float32 with eager attention.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

from conftest import load_config  # noqa: E402
from skymoe_jax.interop import from_hf  # noqa: E402
from skymoe_jax.model import factory, vit  # noqa: E402

TOL = 1e-4


def _state_dict(model):
  return {k: v.detach().numpy() for k, v in model.state_dict().items()}


def _perturb_vectors(model, seed):
  """HF initialises norms to 1 / biases to 0; randomise every 1-D tensor so they are tested."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.ndim == 1:
        base = 1.0 if name.endswith('weight') and 'norm' in name else 0.0
        p.copy_(base + 0.2 * torch.randn(p.shape, generator=g))
  return model


def _assert_tree_matches_model(tree, config, part):
  """The converted tree has exactly the structure, shapes and dtypes of our model's params."""
  want = jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)),
                      jax.tree.map(lambda b: b.value, factory.abstract_params(config)[part],
                                   is_leaf=lambda b: hasattr(b, 'value')))
  got = jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), tree)
  assert got == want


# ----------------------------------------------------------------------------- vision tower


@pytest.fixture(scope='module')
def hf_clip():
  cfg = transformers.CLIPVisionConfig(
      hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
      image_size=32, patch_size=8, hidden_act='quick_gelu', layer_norm_eps=1e-5,
      attn_implementation='eager')
  torch.manual_seed(0)
  return _perturb_vectors(transformers.CLIPVisionModel(cfg).eval(), seed=1)


def _vision_config(image_size=32, scan_layers=True, feature_layer=-2):
  config = load_config('tiny')
  config.model.dtype = 'float32'
  config.model.scan_layers = scan_layers
  config.model.vision.update(image_size=image_size, patch_size=8, width=32, depth=3, num_heads=2,
                             mlp_dim=64, feature_layer=feature_layer, norm_eps=1e-5)
  config.data.text_len = 32  # room for the image tokens of larger test images
  return config


def _our_vision(config, tree, images_nhwc):
  model = factory.create_model(config)
  fn = jax.jit(lambda p, x: model.apply({'params': {'vision': p}}, x,
                                        method=lambda m, x: m.vision(x)))
  return np.asarray(fn(tree, images_nhwc))


def _hf_hidden(hf, images_nhwc, **kw):
  with torch.no_grad():
    out = hf(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy()),
             output_hidden_states=True, **kw)
  return [h.numpy() for h in out.hidden_states], out.last_hidden_state.numpy()


@pytest.mark.parametrize('scan_layers', [True, False])
@pytest.mark.parametrize('feature_layer', [-2, -1])
def test_vision_tower_matches_hf_clip(hf_clip, scan_layers, feature_layer):
  config = _vision_config(scan_layers=scan_layers, feature_layer=feature_layer)
  tree = from_hf.clip_vision_params(_state_dict(hf_clip), config.model, prefix='')
  _assert_tree_matches_model(tree, config, 'vision')
  images = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  hidden, last = _hf_hidden(hf_clip, images)
  assert len(hidden) == 3 + 1
  np.testing.assert_array_equal(hidden[-1], last)  # [-1] is the last block, before post-LN
  ours = _our_vision(config, tree, images)
  want = hidden[feature_layer][:, 1:]
  assert ours.shape == want.shape == (2, 16, 32)
  assert np.abs(ours - want).max() <= TOL


def test_resize_position_embedding_is_identity_at_native_grid():
  pos = np.random.default_rng(0).normal(size=(1 + 5 * 5, 7)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(vit.resize_position_embedding(pos, 5)), pos)


@pytest.mark.parametrize('in_hw,out_hw', [((4, 6), (9, 7)), ((9, 7), (5, 3)), ((3, 3), (3, 3))])
def test_cubic_resize_matrix_matches_torch_bicubic(in_hw, out_hw):
  grid = np.random.default_rng(0).normal(size=(5,) + in_hw).astype(np.float32)  # [C, H, W]
  mh = vit.cubic_resize_matrix(in_hw[0], out_hw[0])
  mw = vit.cubic_resize_matrix(in_hw[1], out_hw[1])
  ours = np.einsum('ih,jw,chw->cij', mh, mw, grid)
  want = torch.nn.functional.interpolate(torch.from_numpy(grid)[None], size=out_hw,
                                         mode='bicubic', align_corners=False)[0].numpy()
  assert np.abs(ours - want).max() <= 1e-5


@pytest.mark.parametrize('new_grid', [7, 3])
def test_resize_position_embedding_matches_torch(new_grid):
  pos = np.random.default_rng(1).normal(size=(1 + 5 * 5, 6)).astype(np.float32)
  ours = np.asarray(vit.resize_position_embedding(pos, new_grid))
  grid = torch.from_numpy(pos[1:].reshape(5, 5, 6)).permute(2, 0, 1)[None]
  want = torch.nn.functional.interpolate(grid, size=(new_grid, new_grid), mode='bicubic',
                                         align_corners=False)[0].permute(1, 2, 0).reshape(-1, 6)
  np.testing.assert_array_equal(ours[0], pos[0])  # the CLS position is kept
  assert np.abs(ours[1:] - want.numpy()).max() <= 1e-5


def test_vision_tower_interpolated_positions_match_hf(hf_clip):
  """HF at 32 px run on 48 px with interpolate_pos_encoding == ours on 48 px, two ways: our tower
  resizing its stored 4x4 grid at run time, and the converter resizing into a 48-px config."""
  images = np.random.default_rng(2).normal(size=(2, 48, 48, 3)).astype(np.float32)
  hidden, _ = _hf_hidden(hf_clip, images, interpolate_pos_encoding=True)
  want = hidden[-2][:, 1:]
  sd = _state_dict(hf_clip)
  for image_size in (32, 48):
    config = _vision_config(image_size=image_size)
    tree = from_hf.clip_vision_params(sd, config.model, prefix='')
    assert tree['pos_embed'].shape == (1 + (image_size // 8) ** 2, 32)
    ours = _our_vision(config, tree, images)
    assert ours.shape == want.shape == (2, 36, 32)
    assert np.abs(ours - want).max() <= TOL, image_size


def test_clip_vision_params_prefix_and_errors(hf_clip):
  config = _vision_config()
  sd = _state_dict(hf_clip)
  prefixed = from_hf.clip_vision_params({'vision_model.' + k: v for k, v in sd.items()},
                                        config.model)
  plain = from_hf.clip_vision_params(sd, config.model, prefix='')
  jax.tree.map(np.testing.assert_array_equal, prefixed, plain)
  missing = dict(sd)
  del missing['encoder.layers.1.mlp.fc2.bias']
  with pytest.raises(from_hf.ConversionError, match=r'encoder\.layers\.1\.mlp\.fc2\.bias'):
    from_hf.clip_vision_params(missing, config.model, prefix='')
  config.model.vision.mlp_dim = 48
  with pytest.raises(from_hf.ConversionError, match=r'encoder\.layers\.0\.mlp\.fc1\.weight'):
    from_hf.clip_vision_params(sd, config.model, prefix='')


# ----------------------------------------------------------------------------- decoder


@pytest.fixture(scope='module', params=[False, True], ids=['untied', 'tied'])
def hf_llama(request):
  cfg = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
      num_key_value_heads=2, intermediate_size=128, rms_norm_eps=1e-5, rope_theta=10000.0,
      max_position_embeddings=128, tie_word_embeddings=request.param, initializer_range=0.1,
      attn_implementation='eager')
  torch.manual_seed(3)
  model = _perturb_vectors(transformers.LlamaForCausalLM(cfg).eval(), seed=4)
  if request.param:
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
  return model


def _decoder_config(hf, scan_layers):
  config = load_config('tiny')
  config.model.dtype = 'float32'
  config.model.scan_layers = scan_layers
  config.model.moe.num_experts = 0
  config.model.lora.rank = 0
  c = hf.config
  config.model.llm.update(
      vocab_size=c.vocab_size, embed_dim=c.hidden_size, num_layers=c.num_hidden_layers,
      num_heads=c.num_attention_heads, num_kv_heads=c.num_key_value_heads,
      head_dim=c.hidden_size // c.num_attention_heads, mlp_dim=c.intermediate_size,
      rope_theta=10000.0, norm_eps=c.rms_norm_eps, tie_embeddings=c.tie_word_embeddings,
      max_seq_len=c.max_position_embeddings)
  return config


def _our_logits(config, tree, tokens, token_mask):
  model = factory.create_model(config)
  b, t = tokens.shape

  def fn(p, tokens, token_mask):
    return model.apply(
        {'params': {'decoder': p}}, tokens, token_mask,
        method=lambda m, x, mask: m.decode(
            m.embed_tokens(x), jnp.broadcast_to(jnp.arange(t), (b, t)), mask,
            jnp.zeros((b,), jnp.int32), jnp.zeros((b,), jnp.int32))[0])
  return np.asarray(jax.jit(fn)(tree, tokens, token_mask))


def _hf_logits(hf, tokens, token_mask):
  with torch.no_grad():
    return hf(input_ids=torch.from_numpy(tokens).long(),
              attention_mask=torch.from_numpy(token_mask).long()).logits.numpy()


@pytest.mark.parametrize('scan_layers', [True, False], ids=['scan', 'unrolled'])
def test_decoder_matches_hf_llama(hf_llama, scan_layers):
  config = _decoder_config(hf_llama, scan_layers)
  tree = from_hf.llama_params(_state_dict(hf_llama), config.model)
  _assert_tree_matches_model(tree, config, 'decoder')
  assert ('lm_head' in tree) == (not hf_llama.config.tie_word_embeddings)
  tokens = np.random.default_rng(5).integers(0, 256, size=(2, 12)).astype(np.int32)
  mask = np.ones(tokens.shape, bool)
  want = _hf_logits(hf_llama, tokens, mask)
  ours = _our_logits(config, tree, tokens, mask)
  assert ours.shape == want.shape == (2, 12, 256)
  assert np.abs(want).max() > 0.5  # logits far from zero, so the tolerance means something
  assert np.abs(ours - want).max() <= TOL


def test_decoder_right_padding_matches_hf_llama(hf_llama):
  if hf_llama.config.tie_word_embeddings:
    pytest.skip('one padding case is enough')
  config = _decoder_config(hf_llama, scan_layers=True)
  tree = from_hf.llama_params(_state_dict(hf_llama), config.model)
  tokens = np.random.default_rng(6).integers(0, 256, size=(3, 10)).astype(np.int32)
  mask = np.ones(tokens.shape, bool)
  mask[1, 6:] = False
  mask[2, 3:] = False
  want = _hf_logits(hf_llama, tokens, mask)
  ours = _our_logits(config, tree, tokens, mask)
  assert np.abs(ours[mask] - want[mask]).max() <= TOL
  # What is padding must not leak into real positions: change it and nothing real moves.
  tokens_changed = tokens.copy()
  tokens_changed[~mask] = (tokens[~mask] + 1) % 256  # padding content must not leak either
  ours_changed = _our_logits(config, tree, tokens_changed, mask)
  assert np.abs(ours_changed[mask] - want[mask]).max() <= TOL


def test_llama_params_errors(hf_llama):
  config = _decoder_config(hf_llama, scan_layers=True)
  sd = _state_dict(hf_llama)
  missing = {k: v for k, v in sd.items() if k != 'model.layers.2.mlp.up_proj.weight'}
  with pytest.raises(from_hf.ConversionError, match=r'model\.layers\.2\.mlp\.up_proj\.weight'):
    from_hf.llama_params(missing, config.model)
  config.model.llm.num_kv_heads = 4
  with pytest.raises(from_hf.ConversionError, match=r'model\.layers\.0\.self_attn\.k_proj\.weight'):
    from_hf.llama_params(sd, config.model)
  config.model.llm.num_kv_heads = 2
  config.model.moe.num_experts = 4
  with pytest.raises(ValueError, match='dense'):
    from_hf.llama_params(sd, config.model)
