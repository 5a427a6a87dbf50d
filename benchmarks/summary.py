"""One markdown table of every benchmark's headline figures against its target, read from the
JSON files the benchmarks wrote (nothing typed in by hand).

  python benchmarks/summary.py [--results=benchmarks/results] [--out=benchmarks/results/SUMMARY.md]

Reads, where present: moe_layer_*.json, train_step_*.json, generation_*.json,
input_pipeline_*.json, tpu_projection_v5p.json (and tpu_projection_v5p_before_*.json for the
before / after row). Each row names its file, so every figure can be traced to its run.
"""
import argparse
import glob
import json
import os

# Targets from the benchmark issue.
MOE_OVERHEAD_TARGET = 1.3       # MoE time / equal-active-FLOPs dense FFN time, at most
MOE_PEAK_TARGET = 0.60          # MoE model FLOP/s / measured matmul peak, at least
TRAIN_PEAK_TARGET = 0.45        # train step model FLOP/s / measured matmul peak, at least
GPU_1B_MFU_TARGET = 0.35        # configs/gpu_1b.py train step MFU (data-sheet bf16 peak), at least
TPU_RATIO_TARGET = 0.90         # skymoe_7b on v5p:4x4x4: model / compiled FLOPs, at least


def _load(path):
  with open(path) as f:
    return json.load(f)


def _yes(ok) -> str:
  return 'yes' if ok else 'no'


def moe_rows(path):
  """Per (dtype, shape): the backend with the lowest overhead, and every torch comparison."""
  data = _load(path)
  best = {}
  for r in data['results']:
    key = (r['dtype'], r['shape'])
    if key not in best or r['moe_seconds'] < best[key]['moe_seconds']:
      best[key] = r
  rows = []
  for (dtype, shape), r in sorted(best.items()):
    torch = (f"{r['speedup_vs_torch']:.2f}x vs HF Mixtral ({r['torch_best_impl']})"
             if 'speedup_vs_torch' in r else 'not timed')
    rows.append((f"MoE layer fwd+bwd, {shape} {dtype}, best backend {r['backend']}",
                 f"overhead vs dense {r['overhead_vs_dense']:.2f}x (<= {MOE_OVERHEAD_TARGET}); "
                 f"{100 * r['fraction_of_peak']:.0f}% of peak (>= {100 * MOE_PEAK_TARGET:.0f}%); "
                 f"{torch} (> 1)",
                 _yes(r['overhead_vs_dense'] <= MOE_OVERHEAD_TARGET
                      and r['fraction_of_peak'] >= MOE_PEAK_TARGET
                      and r.get('speedup_vs_torch', 0) > 1),
                 data['device'], os.path.basename(path)))
  return rows


def train_rows(path):
  data = _load(path)
  rows = []
  for r in data['results']:
    shares = r.get('profile', {}).get('shares', {})
    share_text = ', '.join(f'{k} {100 * v:.0f}%' for k, v in shares.items() if v >= 0.005)
    if r['config'] == 'gpu_1b' and 'mfu' in r:  # judged by MFU of the data-sheet peak
      text = (f"{r['tokens_per_second']:.0f} tokens/s; MFU {100 * r['mfu']:.1f}% of the "
              f"bf16 peak (>= {100 * GPU_1B_MFU_TARGET:.0f}%)")
      met = r['mfu'] >= GPU_1B_MFU_TARGET
    else:
      text = (f"{r['tokens_per_second']:.0f} tokens/s; {100 * r['fraction_of_peak']:.1f}% of "
              f"the measured matmul peak (>= {100 * TRAIN_PEAK_TARGET:.0f}%)")
      met = r['fraction_of_peak'] >= TRAIN_PEAK_TARGET
    rows.append((f"train step, {r['config']} ({r['dtype']}, batch {r['batch_size']})",
                 text + (f'; time: {share_text}' if share_text else ''), _yes(met),
                 data['device'], os.path.basename(path)))
  return rows


def generation_rows(path):
  data = _load(path)
  return [(f"generation, batch {r['batch']} ({r['max_new_tokens']} new tokens)",
           f"KV cache {r['kv_tokens_per_second']:.0f} tokens/s vs recompute "
           f"{r['recompute_tokens_per_second']:.0f}: {r['speedup_kv_vs_recompute']:.2f}x; "
           f"tokens match: {_yes(r['tokens_match'])}",
           _yes(r['speedup_kv_vs_recompute'] > 1 and r['tokens_match']), data['device'],
           os.path.basename(path)) for r in data['results']]


def pipeline_rows(path):
  data = _load(path)
  need = data['need']
  best = data['best_capacity_over_need']
  return [('input pipeline (504 px, local + global views, CDA)',
           f"capacity / need of one v5p host {best:.2f}x "
           f"(need {need['samples_per_s_per_host']:.1f} samples/s at {100 * need['mfu']:.0f}% "
           "MFU)",
           _yes(best >= 1), f"CPU ({data['machine']['cpu_count']} cores)",
           os.path.basename(path))]


def tpu_rows(path, before_paths=()):
  """One row per topology of the projection; each earlier projection (the file name's
  tpu_projection_v5p_before_<what>.json) adds its figures for the same topology."""
  data = _load(path)
  befores = [(os.path.basename(b)[len('tpu_projection_v5p_before_'):-len('.json')],
              {c['projection']['topology']: c['projection'] for c in _load(b)['cases']})
             for b in before_paths]
  low, high = data['maxtext']['mfu']
  rows = []
  for case in data['cases']:
    p = case['projection']
    mesh = 'x'.join(str(p['mesh'][a]) for a in ('data', 'fsdp', 'expert', 'tensor'))
    was_text = ''.join(
        f"; before {what.replace('_', ' ')}: {was[p['topology']]['memory_per_chip_gib']:.1f} "
        f"GiB, model/compiled {was[p['topology']]['model_over_compiled']:.2f}, "
        f"{100 * was[p['topology']]['projected_mfu']:.1f}%"
        for what, was in befores if p['topology'] in was)
    ratio_ok = p['model_over_compiled'] >= TPU_RATIO_TARGET or p['topology'] != 'v5p:4x4x4'
    remat = p.get('remat_policy') or case['aot_report'].get('remat_policy', '?')
    rows.append((f"skymoe_7b on {p['topology']} ({p['chips']} chips, mesh {mesh}, remat "
                 f"{remat}), roofline",
                 f"{p['memory_per_chip_gib']:.1f} GiB/chip (fits: {_yes(p['fits_hbm'])}); "
                 f"model/compiled FLOPs {p['model_over_compiled']:.2f}"
                 + (f" (>= {TPU_RATIO_TARGET})" if p['topology'] == 'v5p:4x4x4' else '')
                 + f"; projected MFU {100 * p['projected_mfu']:.1f}% "
                 f"({100 * p['projected_mfu_no_overlap']:.1f}% without overlap) vs MaxText "
                 f"Mixtral {100 * low:.1f}-{100 * high:.1f}%{was_text}",
                 # A roofline is an upper bound: met means "not ruled out by the compiled program".
                 _yes(p['fits_hbm'] and ratio_ok and p['projected_mfu'] >= low)
                 + ' (upper bound)',
                 data['peaks']['name'] + ' (AOT compile, projected)',
                 os.path.basename(path)))
  return rows


def table(results_dir) -> str:
  rows = []
  for path in sorted(glob.glob(os.path.join(results_dir, 'moe_layer_*.json'))):
    rows += moe_rows(path)
  for path in sorted(glob.glob(os.path.join(results_dir, 'train_step_*.json'))):
    rows += train_rows(path)
  for path in sorted(glob.glob(os.path.join(results_dir, 'generation_*.json'))):
    rows += generation_rows(path)
  for path in sorted(glob.glob(os.path.join(results_dir, 'input_pipeline_*.json'))):
    if not path.endswith('_before_after.json'):   # two trees side by side, not a capacity row
      rows += pipeline_rows(path)
  tpu = os.path.join(results_dir, 'tpu_projection_v5p.json')
  if os.path.exists(tpu):
    before = sorted(glob.glob(os.path.join(results_dir, 'tpu_projection_v5p_before_*.json')))
    rows += tpu_rows(tpu, before)
  lines = ['| benchmark | measured (target) | target met | device | file |',
           '|---|---|---|---|---|']
  lines += [f'| {" | ".join(r)} |' for r in rows]
  return '\n'.join(lines) + '\n'


def main():
  parser = argparse.ArgumentParser()
  here = os.path.dirname(os.path.abspath(__file__))
  parser.add_argument('--results', default=os.path.join(here, 'results'))
  parser.add_argument('--out', default=os.path.join(here, 'results', 'SUMMARY.md'))
  args = parser.parse_args()
  text = table(args.results)
  print(text)
  with open(args.out, 'w') as f:
    f.write(text)


if __name__ == '__main__':
  main()
