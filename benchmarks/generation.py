"""Greedy generation speed: the KV cache (skymoe_jax.evaluation.generate) against recomputing
the full forward pass over the whole sequence for every new token, at several batch sizes.

  python benchmarks/generation.py --out=generation.json [--config=configs/demo.py:stage2]
      [--batches=1,8] [--prompt_len=32] [--max_new_tokens=32] [--repeats=3]

The model is built from the config with freshly initialised parameters (speed does not depend
on trained weights). Prompts are full length (no padding), so both paths see the same sequence:
the image tokens, then `prompt_len` text tokens. Every row generates exactly `max_new_tokens`
tokens (the eos id is -1, which no token equals).

Recompute baseline: one jitted function; a `jax.lax.fori_loop` calls `model.apply` (vision tower
and decoder) on the images and the token sequence padded to its final length prompt_len +
max_new_tokens (one shape, one compilation) and writes the argmax at the current position. The
loop lives inside the jit like generate's while_loop, so both paths are one dispatch per call and
the comparison measures the computation, not Python's per-step overhead.

Prints a table and writes JSON: per batch size the median seconds per generate call (after one
compile + warm-up call), new tokens per second for each path, `speedup_kv_vs_recompute`, and
`tokens_match` (both paths must give the same greedy tokens; a mismatch is printed and the
script exits with status 1 after writing the JSON).
"""
import argparse
import json
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from skymoe_jax import config as config_lib
from skymoe_jax.evaluation import generate as generate_lib
from skymoe_jax.model import factory

NEVER_EOS = -1  # no token id equals it: the while_loop always runs max_new_tokens steps
PAD_ID = 0


def init_model(config, seed: int = 0):
  """(model, unboxed fresh parameters) for `config`."""
  model = factory.create_model(config)
  params = jax.jit(lambda: nn.unbox(model.init(jax.random.key(seed), *factory.example_inputs(
      config))['params']))()
  return model, params


def make_inputs(config, batch: int, prompt_len: int, seed: int = 1):
  """Random images, full-length prompts (mask all True), task and granularity ids, on device."""
  rng = np.random.default_rng(seed)
  m = config.model
  images = rng.normal(size=(batch, m.vision.image_size, m.vision.image_size, 3))
  tokens = rng.integers(1, m.llm.vocab_size, (batch, prompt_len))
  task = rng.integers(0, m.moe.num_tasks, batch)
  gran = rng.integers(0, m.moe.num_granularities, batch)
  return (jnp.asarray(images, jnp.float32), jnp.asarray(tokens, jnp.int32),
          jnp.ones((batch, prompt_len), bool), jnp.asarray(task, jnp.int32),
          jnp.asarray(gran, jnp.int32))


def make_recompute_fn(model, max_new_tokens: int):
  """recompute(params, images, prompt_tokens, task_id, granularity_id) -> tokens [B, N].

  No cache: each step runs the ordinary full forward pass over the sequence padded to its final
  length and takes the argmax at the last real position.
  """
  # The same routing generate uses (a capacity model would drop tokens depending on the batch).
  model = generate_lib.dropless_model(model)

  @jax.jit
  def recompute(params, images, prompt_tokens, task_id, granularity_id):
    b, p = prompt_tokens.shape
    total = p + max_new_tokens
    seq = jnp.concatenate([prompt_tokens, jnp.full((b, max_new_tokens), PAD_ID, jnp.int32)], 1)

    def step(i, seq):
      # Slots not written yet are padding; causal attention hides them from the current
      # position anyway, the mask keeps them out of the MoE routing as well.
      mask = jnp.broadcast_to(jnp.arange(total) < p + i, (b, total))
      logits, _ = model.apply({'params': params}, images, seq, mask, task_id, granularity_id)
      # Text logits: position t predicts token t + 1.
      last = jax.lax.dynamic_index_in_dim(logits, p + i - 1, axis=1, keepdims=False)
      token = jnp.argmax(last, axis=-1).astype(jnp.int32)
      return jax.lax.dynamic_update_slice_in_dim(seq, token[:, None], p + i, axis=1)

    return jax.lax.fori_loop(0, max_new_tokens, step, seq)[:, p:]

  return recompute


def _time(fn, *args, repeats: int):
  """(first call seconds, including compilation; median of `repeats` calls after it; output)."""
  t = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  first = time.perf_counter() - t
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return first, float(np.median(times)), out


def bench(config, batch: int, prompt_len: int, max_new_tokens: int, repeats: int,
          model=None, params=None) -> dict:
  """Both paths at one batch size: timings, throughput, speedup and whether the tokens agree."""
  if model is None:
    model, params = init_model(config)
  nv = config_lib.vision_tokens(config.model)
  seq_len = nv + prompt_len + max_new_tokens
  if seq_len > config.model.llm.max_seq_len:
    raise ValueError(f'{nv} image + {prompt_len} prompt + {max_new_tokens} new tokens = {seq_len}'
                     f' > model.llm.max_seq_len={config.model.llm.max_seq_len}')
  images, prompt, mask, task, gran = make_inputs(config, batch, prompt_len)
  generate = generate_lib.make_generate_fn(model, config, max_new_tokens, eos_id=NEVER_EOS,
                                           pad_id=PAD_ID)
  recompute = make_recompute_fn(model, max_new_tokens)
  kv_first, kv_s, (kv_tokens, kv_lengths) = _time(
      generate, params, images, prompt, mask, task, gran, repeats=repeats)
  re_first, re_s, re_tokens = _time(recompute, params, images, prompt, task, gran,
                                    repeats=repeats)
  kv_tokens, re_tokens = np.asarray(kv_tokens), np.asarray(re_tokens)
  differ = kv_tokens != re_tokens
  new_tokens = batch * max_new_tokens
  moe = generate_lib.dropless_model(model).config.moe  # what both paths ran
  return {
      'batch': batch, 'prompt_len': prompt_len, 'image_tokens': nv,
      'max_new_tokens': max_new_tokens, 'seq_len': seq_len, 'repeats': repeats,
      'dtype': config.model.dtype, 'moe_backend': moe.backend if moe.num_experts else None,
      'moe_ragged_block_size': moe.ragged_block_size if moe.num_experts else None,
      'kv_seconds': kv_s, 'recompute_seconds': re_s,
      'kv_first_call_seconds': kv_first, 'recompute_first_call_seconds': re_first,
      'kv_tokens_per_second': new_tokens / kv_s,
      'recompute_tokens_per_second': new_tokens / re_s,
      'speedup_kv_vs_recompute': re_s / kv_s,
      # Every row must run to max_new_tokens (eos never produced) and agree token for token.
      'all_rows_full_length': bool(np.all(np.asarray(kv_lengths) == max_new_tokens)),
      'tokens_match': bool(not differ.any()),
      'mismatched_rows': int(differ.any(axis=1).sum()),
      'first_mismatch_step': int(np.argmax(differ.any(axis=0))) if differ.any() else None,
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--config', default='configs/demo.py:stage2', help='path[:arg]')
  parser.add_argument('--batches', default='1,8')
  parser.add_argument('--prompt_len', type=int, default=32, help='text tokens after the image')
  parser.add_argument('--max_new_tokens', type=int, default=32)
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--out', default='generation.json')
  args = parser.parse_args()
  config = config_lib.load(args.config)
  model, params = init_model(config)
  device = str(jax.devices()[0].device_kind)
  print(f'{args.config} on {device}: {config_lib.vision_tokens(config.model)} image + '
        f'{args.prompt_len} prompt tokens, {args.max_new_tokens} new, greedy, '
        f'{config.model.dtype}', flush=True)
  print(f"{'batch':>5}  {'kv s/call':>10}  {'kv tok/s':>9}  {'recompute s/call':>16}  "
        f"{'recompute tok/s':>15}  {'speedup':>7}  tokens match", flush=True)
  results = []
  for batch in (int(b) for b in args.batches.split(',')):
    r = bench(config, batch, args.prompt_len, args.max_new_tokens, args.repeats, model, params)
    r['config'] = args.config
    results.append(r)
    match = 'yes' if r['tokens_match'] else (
        f"NO ({r['mismatched_rows']} rows, from step {r['first_mismatch_step']})")
    print(f"{batch:5d}  {r['kv_seconds']:10.4f}  {r['kv_tokens_per_second']:9.1f}  "
          f"{r['recompute_seconds']:16.4f}  {r['recompute_tokens_per_second']:15.1f}  "
          f"{r['speedup_kv_vs_recompute']:6.2f}x  {match}", flush=True)
  with open(args.out, 'w') as f:
    json.dump({'device': device, 'jax_version': jax.__version__, 'results': results}, f, indent=1)
  bad = [r['batch'] for r in results if not (r['tokens_match'] and r['all_rows_full_length'])]
  if bad:
    print(f'ERROR: KV-cache and recompute tokens differ (or a row stopped early) at batch '
          f'{bad}; see {args.out}', file=sys.stderr)
    sys.exit(1)


if __name__ == '__main__':
  main()
