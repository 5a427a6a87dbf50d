"""MoE layer forward + backward: each dispatch backend of ours against (1) a dense FFN of equal
active FLOPs, (2) HF transformers' Mixtral sparse MoE block in PyTorch and (3) the machine's
matmul peak, all measured in the same run on the same device kind (CPU here; CUDA for JAX and
torch on a GPU machine).

  python benchmarks/moe_layer.py --out=moe_layer.json [--dtypes=float32,bfloat16]
      [--shapes=demo,large] [--backends=ragged,capacity,dense]
      [--ragged_impls=blocks,batched,ragged_dot,triton,megablox]
      [--torch_impls=eager,grouped_mm] [--baseline_backends=old_backends.py]

One case = router (softmax top-2, renormalised as Mixtral does) + dispatch + 8 SwiGLU experts +
combine, forward and the gradient of sum(y) w.r.t. the input and every weight. Both frameworks
get the same weights and inputs, and the script checks that their outputs agree (`relative_diff`)
before it times anything (PARITY_TOLERANCE): a fast wrong layer is no result.

Per case the JSON holds the median step time, model FLOP/s (6 x tokens x k x 3 d f, the active
expert matmuls; router and dispatch are overhead), `overhead_vs_dense` (MoE time / equal-FLOPs
dense FFN time), `speedup_vs_torch` (the fastest torch experts implementation's time / ours;
every torch time is kept under `torch_seconds`) and `fraction_of_peak` (achieved / measured peak).
With --baseline_backends (an earlier backends.py), `speedup_vs_baseline` times that version of
the same backend in the same run: before / after for a change to the dispatch code. When
ragged/ragged_dot is among the cases, every other ragged case of its shape and dtype gets
`speedup_vs_ragged_dot` (ragged_dot's time / its own).

The kernel implementations (triton on GPU, megablox on TPU) only interpret on CPU: timing them
there measures Pallas' interpreter, not the kernel.
"""
import argparse
import importlib.util
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from skymoe_jax.model.mlp import swiglu
from skymoe_jax.model.moe import backends, router
from skymoe_jax.parallel import hardware

SHAPES = {
    # tokens, model dim, ffn dim, experts, top-k
    'demo': (2048, 192, 512, 8, 2),         # configs/demo.py: batch 16 x 128 tokens, d 192
    'large': (4096, 1024, 2816, 8, 2),
}

# Largest ||ours - HF Mixtral|| / ||HF Mixtral|| accepted before timing. In bf16 the two
# frameworks round in different places, and a token whose top-2 scores nearly tie can pick
# another expert: a few rows differ wholesale, so the check is on the norm, not the max.
PARITY_TOLERANCE = {'float32': 1e-5, 'bfloat16': 0.1}


def _median_seconds(fn, repeats):
  fn()  # compile / warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def make_weights(shape, seed=0):
  """fp32 numpy weights shared by both frameworks: x [N, D], experts, router [D, E]."""
  n, d, f, e, _ = shape
  rng = np.random.default_rng(seed)
  normal = lambda *s: rng.standard_normal(s, dtype=np.float32)
  return {'x': normal(n, d),
          'w_gate': normal(e, d, f) / np.sqrt(d), 'w_up': normal(e, d, f) / np.sqrt(d),
          'w_down': normal(e, f, d) / np.sqrt(f), 'w_router': normal(d, e) / np.sqrt(d)}


def jax_moe(shape, w, backend, dtype, ragged_impl='auto', backends_module=None):
  """(forward fn, fwd+bwd step fn, args) of our layer: routing in fp32, experts in `dtype`.
  backends_module: skymoe_jax.model.moe.backends unless another version is given."""
  n, d, f, e, k = shape
  valid = jnp.ones((n,), bool)
  dispatch = (backends_module or backends).get_backend(backend, capacity_factor=1.25,
                                                       ragged_impl=ragged_impl)

  def forward(x, experts, w_router):
    routing = router.route(x.astype(jnp.float32) @ w_router, k, True, valid)
    y, _ = dispatch(x, routing.ids, routing.weights.astype(dtype), valid, experts)
    return y

  loss = lambda *args: jnp.sum(forward(*args).astype(jnp.float32))
  args = (jnp.asarray(w['x'], dtype),
          {name: jnp.asarray(w[name], dtype) for name in ('w_gate', 'w_up', 'w_down')},
          jnp.asarray(w['w_router']))
  return jax.jit(forward), jax.jit(jax.grad(loss, argnums=(0, 1, 2))), args


def jax_dense(shape, w, dtype):
  """fwd+bwd of a dense SwiGLU FFN with hidden size k * f: the MoE's active FLOPs, no routing."""
  n, d, f, e, k = shape
  dense = {'w_gate': w['w_gate'][:k].transpose(1, 0, 2).reshape(d, k * f),
           'w_up': w['w_up'][:k].transpose(1, 0, 2).reshape(d, k * f),
           'w_down': w['w_down'][:k].reshape(k * f, d)}
  loss = lambda x, p: jnp.sum(swiglu(x, p['w_gate'], p['w_up'], p['w_down']).astype(jnp.float32))
  args = (jnp.asarray(w['x'], dtype), {name: jnp.asarray(v, dtype) for name, v in dense.items()})
  return jax.jit(jax.grad(loss, argnums=(0, 1))), args


def torch_moe(shape, w, dtype_name, impl, device):
  """HF Mixtral's sparse MoE block with our weights, experts implementation `impl`."""
  import torch
  from transformers import MixtralConfig
  from transformers.models.mixtral import modeling_mixtral
  n, d, f, e, k = shape
  config = MixtralConfig(hidden_size=d, intermediate_size=f, num_local_experts=e,
                         num_experts_per_tok=k, router_jitter_noise=0.0)
  config._experts_implementation = impl
  dtype = getattr(torch, dtype_name)
  block = modeling_mixtral.MixtralSparseMoeBlock(config)
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  with torch.no_grad():
    # HF stores [E, out, in]; gate and up stacked on the output axis.
    block.experts.gate_up_proj.copy_(torch.cat([t(w['w_gate']), t(w['w_up'])], 2).transpose(1, 2))
    block.experts.down_proj.copy_(t(w['w_down']).transpose(1, 2))
    block.gate.weight.copy_(t(w['w_router']).T)
  block = block.to(device=device, dtype=dtype)
  block.gate.weight.data = block.gate.weight.data.float()  # route in fp32, as ours does
  x = t(w['x']).to(device=device, dtype=dtype)[None]

  def forward(x):
    # The router runs on fp32 inputs, the experts in `dtype` (our layer does the same).
    _, weights, ids = block.gate(x[0].float())
    return block.experts(x[0], ids, weights.to(dtype))

  def step():
    xg = x.detach().requires_grad_(True)
    forward(xg).float().sum().backward()
    for p in block.parameters():
      p.grad = None
    if device != 'cpu':
      torch.cuda.synchronize()
  return forward, step, x


def load_backends(path):
  """A backends.py from elsewhere (e.g. `git show REV:skymoe_jax/model/moe/backends.py > old.py`;
  skymoe_jax/moe/backends.py before the package's layers), to time an earlier version of the
  dispatch code next to the current one in the same run."""
  spec = importlib.util.spec_from_file_location('baseline_backends', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def bench_case(shape_name, backend, dtype_name, torch_impls, device, repeats, ragged_impl='auto',
               baseline=None):
  shape = SHAPES[shape_name]
  n, d, f, e, k = shape
  if backend == 'ragged':  # name what 'auto' picks on this platform
    ragged_impl = backends.resolve_ragged_impl(ragged_impl, jax.default_backend())

  dtype = jnp.dtype(dtype_name)
  w = make_weights(shape)
  forward, step, args = jax_moe(shape, w, backend, dtype, ragged_impl)
  dense_step, dense_args = jax_dense(shape, w, dtype)
  ours = np.asarray(forward(*args).astype(jnp.float32))
  t_moe = _median_seconds(lambda: jax.block_until_ready(step(*args)), repeats)
  t_dense = _median_seconds(lambda: jax.block_until_ready(dense_step(*dense_args)), repeats)
  flops = 6 * n * k * 3 * d * f  # forward 2 FLOPs + backward 4 per active weight and token
  result = {'shape': shape_name, 'dtype': dtype_name, 'tokens': n, 'd_model': d, 'd_ff': f,
            'experts': e, 'top_k': k,
            'backend': backend if backend != 'ragged' else f'ragged/{ragged_impl}',
            'moe_seconds': t_moe, 'dense_seconds': t_dense, 'overhead_vs_dense': t_moe / t_dense,
            'model_flops_per_second': flops / t_moe, 'torch_seconds': {},
            'torch_relative_diff': {}}
  if baseline is not None and (backend != 'ragged' or ragged_impl in baseline.RAGGED_IMPLS):
    _, base_step, base_args = jax_moe(shape, w, backend, dtype, ragged_impl, baseline)
    result['baseline_seconds'] = _median_seconds(
        lambda: jax.block_until_ready(base_step(*base_args)), repeats)
    result['speedup_vs_baseline'] = result['baseline_seconds'] / t_moe
  for impl in torch_impls:
    import torch
    t_forward, t_step, x = torch_moe(shape, w, dtype_name, impl, device)
    with torch.no_grad():
      theirs = t_forward(x).float().cpu().numpy()
    diff = float(np.linalg.norm(theirs - ours) / np.linalg.norm(theirs))
    if diff > PARITY_TOLERANCE[dtype_name]:
      raise AssertionError(f'{shape_name} {backend} {dtype_name}: output differs from HF '
                           f'Mixtral ({impl}) by {diff:.3g} > {PARITY_TOLERANCE[dtype_name]} '
                           '(relative norm)')
    result['torch_relative_diff'][impl] = diff
    result['torch_seconds'][impl] = _median_seconds(t_step, repeats)
  if result['torch_seconds']:
    best = min(result['torch_seconds'], key=result['torch_seconds'].get)
    result['torch_best_impl'] = best
    result['speedup_vs_torch'] = result['torch_seconds'][best] / t_moe
  return result


def _add_speedup_vs_ragged_dot(results):
  """Each ragged case's speed-up over ragged/ragged_dot at the same shape and dtype."""
  reference = {(r['shape'], r['dtype']): r['moe_seconds'] for r in results
               if r['backend'] == 'ragged/ragged_dot'}
  for r in results:
    key = (r['shape'], r['dtype'])
    if r['backend'].startswith('ragged/') and key in reference:
      r['speedup_vs_ragged_dot'] = reference[key] / r['moe_seconds']


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='moe_layer.json')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--shapes', default='demo,large')
  parser.add_argument('--backends', default='ragged,capacity,dense')
  parser.add_argument('--ragged_impls', default='',
                      help="comma list of ragged implementations; default: 'auto' (blocks on "
                      "CPU, triton on GPU, megablox on TPU)")
  parser.add_argument('--torch_impls', default='eager,grouped_mm',
                      help='HF experts implementations to time ("" = skip torch)')
  parser.add_argument('--repeats', type=int, default=10)
  parser.add_argument('--baseline_backends', default='',
                      help='an earlier backends.py to time next to the current one (before/after)')
  args = parser.parse_args()
  baseline = load_backends(args.baseline_backends) if args.baseline_backends else None
  on_cpu = jax.default_backend() == 'cpu'
  device = 'cpu' if on_cpu else 'cuda'
  torch_impls = [i for i in args.torch_impls.split(',') if i]
  if torch_impls:
    import torch
    torch.manual_seed(0)
  results = []
  for dtype_name in args.dtypes.split(','):
    # The ceiling for everything else here: one large square matmul, measured.
    peak = hardware.matmul_flops_per_second(jnp.dtype(dtype_name))
    print(f'{dtype_name}: measured matmul peak {peak / 1e12:.2f} TFLOP/s', flush=True)
    for shape in args.shapes.split(','):
      for backend in args.backends.split(','):
        impls = args.ragged_impls.split(',') if backend == 'ragged' and args.ragged_impls else [
            'auto']
        for impl in impls:
          r = bench_case(shape, backend, dtype_name, torch_impls, device, args.repeats, impl,
                         baseline)
          r['matmul_peak_flops_per_second'] = peak
          r['fraction_of_peak'] = r['model_flops_per_second'] / peak
          results.append(r)
          _add_speedup_vs_ragged_dot(results)
          with open(args.out, 'w') as f:  # after every case: a run cut short keeps its results
            json.dump({'device': str(jax.devices()[0].device_kind), 'jax': jax.__version__,
                       'results': results}, f, indent=1)
          vs_torch = (f"  vs torch {r['torch_best_impl']} {r['speedup_vs_torch']:5.2f}x"
                      f" (diff {max(r['torch_relative_diff'].values()):.1e})"
                      if 'speedup_vs_torch' in r else '')
          vs_torch += (f"  vs baseline {r['speedup_vs_baseline']:5.2f}x"
                       if 'speedup_vs_baseline' in r else '')
          vs_torch += (f"  vs ragged_dot {r['speedup_vs_ragged_dot']:5.2f}x"
                       if 'speedup_vs_ragged_dot' in r else '')
          print(f"{dtype_name:9s} {shape:6s} {r['backend']:18s} moe {r['moe_seconds']*1e3:9.2f} ms"
                f"  dense {r['dense_seconds']*1e3:8.2f} ms  overhead {r['overhead_vs_dense']:5.2f}x"
                f"  {r['fraction_of_peak']*100:5.1f}% of peak{vs_torch}", flush=True)


if __name__ == '__main__':
  main()
