#!/bin/bash
# The input pipeline benchmark on an older checkout and on this one, alternately, in one run:
#   bash benchmarks/input_pipeline_before_after.sh BEFORE_TREE [ROUNDS]
# BEFORE_TREE: a checkout of the commit to compare with (git worktree add /tmp/before COMMIT).
# Writes benchmarks/results/input_pipeline_cpu_before_after.json: each run's samples/s and CPU
# seconds per sample at 504 px with both views and CDA (benchmarks/input_pipeline.py).
set -euo pipefail
before=$(cd "$1" && pwd); rounds=${2:-2}
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-$here/.venv/bin/python}
out=$(mktemp -d)
for r in $(seq "$rounds"); do
  (cd "$before" && PYTHONPATH="$before" "$py" benchmarks/input_pipeline.py --parallel=0,2 \
     --out="$out/before-$r.json")
  (cd "$here" && PYTHONPATH="$here" "$py" benchmarks/input_pipeline.py --parallel=0,2 \
     --out="$out/after-$r.json")
done
"$py" - "$out" "$before" "$here/benchmarks/results/input_pipeline_cpu_before_after.json" <<'PY'
import json, pathlib, subprocess, sys
out, before, dest = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])
def commit(tree):
  return subprocess.run(['git', '-C', tree, 'rev-parse', 'HEAD'], capture_output=True,
                        text=True).stdout.strip()
runs = []
for f in sorted(out.glob('*.json'), key=lambda p: (p.stem.split('-')[1], p.stem)):
  d = json.loads(f.read_text())
  for c in d['capacity']:
    runs.append({'tree': f.stem.split('-')[0], 'round': int(f.stem.split('-')[1]),
                 'num_parallel_batches': c['num_parallel_batches'],
                 'samples_per_s': c['samples_per_s'],
                 'cpu_seconds_per_sample': c['cpu_seconds_per_sample'],
                 'samples_per_s_per_core': 1 / c['cpu_seconds_per_sample'],
                 'loadavg_before': d['machine']['loadavg_before'][0]})
after = json.loads(sorted(out.glob('after-*.json'))[0].read_text())
need, host_cores = after['need']['samples_per_s_per_host'], after['host_cores']
for r in runs:  # the old tree's benchmark did not scale to a host; same need and cores for both
  r['host_capacity_over_need'] = r['samples_per_s_per_core'] * host_cores / need
dest.write_text(json.dumps({
    'benchmark': 'input_pipeline before/after', 'before_commit': commit(before),
    'after_commit': commit(str(dest.parents[2])) + ' + working tree',
    'need_samples_per_s_per_host': need, 'host_cores': host_cores, 'runs': runs},
    indent=1) + '\n')
for r in runs:
  print(f"{r['tree']:6s} round {r['round']} parallel={r['num_parallel_batches']}: "
        f"{r['samples_per_s']:.2f} samples/s, {r['samples_per_s_per_core']:.1f} per core")
PY
