"""KV-cache generation: a no-cache oracle, batch invariance with ragged prompts, eos, sampling,
dropless routing for capacity models, and sharded == unsharded."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from skymoe_jax.evaluation import generate as gen_lib
from skymoe_jax.model import factory
from skymoe_jax.parallel import mesh as mesh_lib

P = 7  # prompt width as the pipeline pads it (right padding)
NEW = 5
LENGTHS = np.array([7, 3, 5, 1, 6, 2, 4, 7])
PAD = 0
NEVER = -1  # an eos id that no token equals: every row runs to NEW tokens


def _perturb(params, key):
  """Random LoRA B and router condition projections (both start at zero), so that adapters and
  task / granularity ids really change the answers."""
  def visit(path, leaf):
    names = [getattr(k, 'key', '') for k in path]
    if names[-1] == 'condition_proj' or (names[-1] == 'b' and names[-2].endswith('_lora')):
      sub = jax.random.fold_in(key, hash(jax.tree_util.keystr(path)) % (2 ** 31))
      return 0.5 * jax.random.normal(sub, leaf.shape, leaf.dtype)
    return leaf
  return jax.tree_util.tree_map_with_path(visit, params)


def _init(config):
  model = factory.create_model(config)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(0), *factory.example_inputs(
      config))['params']))()
  return model, _perturb(params, jax.random.key(5))


def _inputs(config, lengths=LENGTHS, seed=1):
  rng = np.random.default_rng(seed)
  n, v = len(lengths), config.model.vision
  images = rng.normal(size=(n, v.image_size, v.image_size, 3)).astype(np.float32)
  mask = np.arange(P)[None, :] < np.asarray(lengths)[:, None]
  tokens = np.where(mask, rng.integers(1, config.model.llm.vocab_size, (n, P)), PAD)
  task = rng.integers(0, config.model.moe.num_tasks, n).astype(np.int32)
  gran = rng.integers(0, config.model.moe.num_granularities, n).astype(np.int32)
  return images, tokens.astype(np.int32), mask, task, gran


def _rows(inputs, rows):
  return tuple(a[rows] for a in inputs)


@pytest.fixture(scope='module')
def setup():
  """The tiny model on the `loop` backend (the reference dispatch), its greedy answers."""
  config = load_config('tiny')
  config.model.moe.backend = 'loop'
  model, params = _init(config)
  inputs = _inputs(config)
  greedy = gen_lib.make_generate_fn(model, config, NEW, eos_id=NEVER, pad_id=PAD)
  tokens, lengths = greedy(params, *inputs)
  return config, model, params, inputs, greedy, np.asarray(tokens), np.asarray(lengths)


def _reference_greedy(model, params, inputs, steps):
  """No cache: the full forward pass on [prompt + tokens so far] (right-padded to one width),
  argmax at each row's last real position."""
  images, prompt, mask, task, gran = inputs
  n, lengths = len(prompt), mask.sum(1)
  seq = np.full((n, P + steps), PAD, np.int32)
  seq[:, :P] = prompt
  seq_mask = np.zeros(seq.shape, bool)
  seq_mask[:, :P] = mask
  apply = jax.jit(model.apply)
  out = []
  for i in range(steps):
    logits, _ = apply({'params': params}, images, seq, seq_mask, task, gran)
    nxt = np.asarray(logits)[np.arange(n), lengths + i - 1].argmax(-1)
    seq[np.arange(n), lengths + i] = nxt
    seq_mask[np.arange(n), lengths + i] = True
    out.append(nxt)
  return np.stack(out, axis=1)


def test_greedy_equals_full_forward_reference(setup):
  _, model, params, inputs, _, tokens, lengths = setup
  np.testing.assert_array_equal(tokens, _reference_greedy(model, params, inputs, NEW))
  np.testing.assert_array_equal(lengths, NEW)
  assert tokens.dtype == np.int32 and tokens.shape == (len(LENGTHS), NEW)
  # Not a degenerate model: rows and steps differ.
  assert len(np.unique(tokens)) > NEW


def test_batch_composition_never_changes_an_answer(setup):
  config, _, params, inputs, greedy, tokens, _ = setup
  images, prompt, mask, task, gran = inputs
  # Each row alone (batch of 1), with 3 more padding columns than in the batch.
  wider = lambda a: np.pad(a, ((0, 0), (0, 3)))
  for r in range(len(LENGTHS)):
    alone, _ = greedy(params, images[r:r + 1], wider(prompt[r:r + 1]), wider(mask[r:r + 1]),
                      task[r:r + 1], gran[r:r + 1])
    np.testing.assert_array_equal(alone[0], tokens[r], err_msg=f'row {r}')
  # Shuffled batch.
  perm = np.random.default_rng(0).permutation(len(LENGTHS))
  shuffled, _ = greedy(params, *_rows(inputs, perm))
  np.testing.assert_array_equal(shuffled, tokens[perm])
  # Prompts padded on the left instead (any mask pattern is right-aligned inside).
  shift = P - LENGTHS
  left = np.stack([np.roll(row, s) for row, s in zip(prompt, shift)])
  left_mask = np.stack([np.roll(row, s) for row, s in zip(mask, shift)])
  out, _ = greedy(params, images, left, left_mask, task, gran)
  np.testing.assert_array_equal(out, tokens)
  # The task ids matter (the test would be weak if they did not).
  other_task, _ = greedy(params, images, prompt, mask, (task + 1) % config.model.moe.num_tasks,
                         gran)
  assert (np.asarray(other_task) != tokens).any()


def test_eos_stops_the_row_and_pads_after(setup):
  config, model, params, inputs, _, tokens, _ = setup
  eos = int(tokens[2, 2])
  gen = gen_lib.make_generate_fn(model, config, NEW, eos_id=eos, pad_id=PAD)
  out, lengths = map(np.asarray, gen(params, *inputs))
  for r in range(len(LENGTHS)):
    hits = np.flatnonzero(tokens[r] == eos)
    stop = hits[0] if len(hits) else NEW
    assert lengths[r] == stop, r
    np.testing.assert_array_equal(out[r, :stop + 1], tokens[r, :stop + 1])
    np.testing.assert_array_equal(out[r, stop + 1:], PAD)
  assert lengths[2] <= 2 and out[2, lengths[2]] == eos


def test_sampling(setup):
  config, model, params, inputs, _, tokens, _ = setup
  sample = gen_lib.make_generate_fn(model, config, NEW, eos_id=NEVER, pad_id=PAD,
                                    temperature=1.0)
  a, _ = sample(params, *inputs, jax.random.key(1))
  b, _ = sample(params, *inputs, jax.random.key(1))
  c, _ = sample(params, *inputs, jax.random.key(2))
  np.testing.assert_array_equal(a, b)
  assert (np.asarray(a) != np.asarray(c)).any()
  assert (np.asarray(a) != tokens).any()
  # One key per row: a row's sample does not depend on the rest of the batch.
  keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(3), i))(jnp.arange(len(LENGTHS)))
  perm = np.random.default_rng(1).permutation(len(LENGTHS))
  d, _ = sample(params, *inputs, keys)
  e, _ = sample(params, *_rows(inputs, perm), keys[perm])
  np.testing.assert_array_equal(np.asarray(e), np.asarray(d)[perm])
  # A tiny nucleus keeps only the most likely token: greedy.
  nucleus = gen_lib.make_generate_fn(model, config, NEW, eos_id=NEVER, pad_id=PAD,
                                     temperature=1.0, top_p=1e-6)
  f, _ = nucleus(params, *inputs, jax.random.key(1))
  np.testing.assert_array_equal(f, tokens)


def test_nucleus_filter_keeps_the_smallest_top_set():
  logits = jnp.log(jnp.array([[0.1, 0.5, 0.15, 0.25]]))
  kept = np.isfinite(np.asarray(gen_lib.nucleus_filter(logits, 0.7)))
  np.testing.assert_array_equal(kept, [[False, True, False, True]])
  kept = np.isfinite(np.asarray(gen_lib.nucleus_filter(logits, 0.76)))
  np.testing.assert_array_equal(kept, [[False, True, True, True]])


def test_sharded_capacity_model_equals_unsharded_dropless(setup):
  """A capacity / all_to_all model generates dropless (ragged, ring) on data x fsdp x expert
  and gives the unsharded loop-backend answers; a tight capacity would have dropped tokens."""
  _, _, params, inputs, _, tokens, _ = setup
  config = load_config('tiny')
  config.mesh.update(dict(data=2, fsdp=2, expert=2, tensor=1))
  config.model.moe.update(backend='capacity', ep_strategy='all_to_all', capacity_factor=0.1)
  model = factory.create_model(config)
  dropless = gen_lib.dropless_model(model)
  assert (dropless.config.moe.backend, dropless.config.moe.ep_strategy) == ('ragged', 'ring')
  mesh = mesh_lib.create_mesh(config)
  gen = gen_lib.make_generate_fn(model, config, NEW, eos_id=NEVER, pad_id=PAD, mesh=mesh)
  out, lengths = gen(jax.device_get(params), *inputs)
  assert out.sharding.spec[0] == ('data', 'fsdp', 'expert')
  np.testing.assert_array_equal(out, tokens)
  np.testing.assert_array_equal(lengths, NEW)
  # 6 rows do not divide the 8 devices: padded inside, same answers.
  out6, _ = gen(params, *_rows(inputs, slice(0, 6)))
  np.testing.assert_array_equal(out6, tokens[:6])
