"""MoE layer forward + backward: each dispatch backend against a dense FFN of equal active FLOPs
and against the machine's matmul peak, all measured in the same run.

  python benchmarks/moe_layer.py --out=moe_layer.json [--dtypes=float32,bfloat16] [--shapes=demo,large]

Prints a table and writes JSON: per case the median step time, model FLOP/s, `overhead_vs_dense`
(MoE time / equal-active-FLOPs dense FFN time) and `fraction_of_peak` (achieved / measured peak).
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from skymoe_jax.model.mlp import swiglu
from skymoe_jax.moe import backends, router

SHAPES = {
    # tokens, model dim, ffn dim, experts, top-k
    'demo': (2048, 256, 688, 8, 2),
    'large': (4096, 1024, 2816, 8, 2),
}


def _time(fn, *args, repeats=10):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t)
  return float(np.median(times))


def matmul_peak(dtype, n=4096):
  """Measured FLOP/s of one large square matmul (the ceiling for everything else here)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda a: a @ a)
  return 2 * n ** 3 / _time(f, a)


def bench_case(name, backend, dtype, ragged_impl='auto'):
  n, d, f, e, k = SHAPES[name]
  keys = jax.random.split(jax.random.key(0), 5)
  x = jax.random.normal(keys[0], (n, d), dtype)
  experts = {'w_gate': jax.random.normal(keys[1], (e, d, f), dtype) / np.sqrt(d),
             'w_up': jax.random.normal(keys[2], (e, d, f), dtype) / np.sqrt(d),
             'w_down': jax.random.normal(keys[3], (e, f, d), dtype) / np.sqrt(f)}
  w_router = jax.random.normal(keys[4], (d, e), jnp.float32) / np.sqrt(d)
  valid = jnp.ones((n,), bool)
  dispatch = backends.get_backend(backend, capacity_factor=1.25, ragged_impl=ragged_impl)

  def moe_loss(x, experts, w_router):
    routing = router.route(x.astype(jnp.float32) @ w_router, k, False, valid)
    y, _ = dispatch(x, routing.ids, routing.weights.astype(dtype), valid, experts)
    return jnp.sum(y.astype(jnp.float32))

  # Dense FFN with the same active FLOPs: hidden size k * f.
  dense = {'w_gate': experts['w_gate'][:k].transpose(1, 0, 2).reshape(d, k * f),
           'w_up': experts['w_up'][:k].transpose(1, 0, 2).reshape(d, k * f),
           'w_down': experts['w_down'][:k].reshape(k * f, d)}

  def dense_loss(x, dense):
    return jnp.sum(swiglu(x, dense['w_gate'], dense['w_up'], dense['w_down']).astype(jnp.float32))

  moe_step = jax.jit(jax.grad(moe_loss, argnums=(0, 1, 2)))
  dense_step = jax.jit(jax.grad(dense_loss, argnums=(0, 1)))
  t_moe = _time(moe_step, x, experts, w_router)
  t_dense = _time(dense_step, x, dense)
  flops = 3 * 2 * n * k * 3 * d * f  # forward + backward (x3) of three matmuls per active expert
  return {'shape': name, 'backend': backend if backend != 'ragged' else f'ragged/{ragged_impl}',
          'dtype': jnp.dtype(dtype).name, 'tokens': n, 'd_model': d, 'd_ff': f, 'experts': e,
          'top_k': k, 'moe_seconds': t_moe, 'dense_seconds': t_dense,
          'overhead_vs_dense': t_moe / t_dense, 'model_flops_per_second': flops / t_moe}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument('--out', default='moe_layer.json')
  parser.add_argument('--dtypes', default='float32,bfloat16')
  parser.add_argument('--shapes', default='demo,large')
  parser.add_argument('--backends', default='dense,ragged,capacity')
  args = parser.parse_args()
  on_cpu = jax.default_backend() == 'cpu'
  results = []
  for dtype_name in args.dtypes.split(','):
    dtype = jnp.dtype(dtype_name)
    peak = matmul_peak(dtype)
    for shape in args.shapes.split(','):
      for backend in args.backends.split(','):
        impls = ['blocks', 'ragged_dot'] if backend == 'ragged' else ['auto']
        if backend == 'ragged' and on_cpu:
          impls = ['blocks']  # ragged_dot is ~9x slower on CPU; measured once, not worth the time
        for impl in impls:
          r = bench_case(shape, backend, dtype, impl)
          r['matmul_peak_flops_per_second'] = peak
          r['fraction_of_peak'] = r['model_flops_per_second'] / peak
          results.append(r)
          print(f"{r['dtype']:9s} {shape:6s} {r['backend']:18s} moe {r['moe_seconds']*1e3:9.2f} ms"
                f"  dense {r['dense_seconds']*1e3:9.2f} ms  overhead {r['overhead_vs_dense']:5.2f}x"
                f"  {r['fraction_of_peak']*100:5.1f}% of peak", flush=True)
  with open(args.out, 'w') as f:
    json.dump({'device': str(jax.devices()[0].device_kind), 'results': results}, f, indent=1)


if __name__ == '__main__':
  main()
