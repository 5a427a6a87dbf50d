"""The paper's claims at small scale: stage-II ablations of the demo model on synthetic scenes.

  configs/ablations.py:stage1   stage I, exactly the demo's (configs/demo.py:stage1); trained once
                                into the shared stage-I workdir that every ablation starts from
  configs/ablations.py          stage II (the full model: 8 experts top-2, adaptive router, CDA
                                cutout + recolour + move), upcycled from that stage-I workdir,
                                evaluated at its last step (WORKDIR/eval/<step>/)

The argument is a comma-separated list of: 'stage1' | 'stage2' (default), 'init=/abs/stage1'
(the stage-I workdir, default STAGE1_DIR), 'seeds=N' (runs per variant in get_sweep, default 1).

  python launch/prepare.py --config=configs/ablations.py:stage1 --workdir=/tmp/skymoe_ablations/stage1
  python -m skymoe_jax.train --config=configs/ablations.py:stage1 --workdir=/tmp/skymoe_ablations/stage1
  python launch/sweep.py --config=configs/ablations.py:seeds=3 \
      --workdir_root=/tmp/skymoe_ablations/runs --local
  python benchmarks/ablation_report.py --workdir_root=/tmp/skymoe_ablations/runs

get_sweep() lists VARIANTS in priority order, all of seed 0 first, then seed 1, ...: a sweep cut
short still covers the most important comparisons. Every run of one seed shares the stage-I
model; seeds change the stage-II router initialisation and the batch order.
"""
import importlib.util
import pathlib

STAGE1_DIR = '/tmp/skymoe_ablations/stage1'   # the shared stage-I workdir (absolute)
STAGE2_STEPS = 60          # sized for ~2 minutes per run on a 2-core CPU, evaluation included
CONTRASTIVE_WEIGHT = 0.1
# Stage II's trainable set (optimizer.STAGE_II_TRAINABLE) plus the projector: the contrastive
# loss compares projector outputs, so without the projector it has no trainable path at all.
STAGE2_PLUS_PROJECTOR = ('.*/moe/(w_gate|w_up|w_down)',
                         '.*/moe/(router|condition_proj|task_embed|granularity_embed)',
                         'projector/.*')

# name -> stage-II overrides; the full model is the config itself.
VARIANTS = {
    'full (MoE-8, adaptive, CDA both)': {},
    # Dense stage II: stage I's model trained further with every decoder FFN trainable (4
    # FFNs; the full model trains 2 layers x 8 experts). Scanned layers stack all 4 FFNs in one
    # array, so the layers of the MoE (0, 2) alone cannot be picked; unscanning would change the
    # vision tower's layout too, which upcycling does not convert.
    'dense': {'model.moe.num_experts': 0, 'optimizer.trainable': ('decoder/.*/mlp/.*',)},
    'plain router': {'model.moe.adaptive': False},
    'CDA off': {'data.cda.enabled': False},
    'MoE-1': {'model.moe.num_experts': 1, 'model.moe.top_k': 1},
    'MoE-2': {'model.moe.num_experts': 2},
    'MoE-4': {'model.moe.num_experts': 4},
    'CDA cutout only': {'data.cda.recolour_weight': 0.0, 'data.cda.move_weight': 0.0},
    'CDA attributes only': {'data.cda.cutout_weight': 0.0},
    'contrastive': {'data.local_views': True, 'train.contrastive_weight': CONTRASTIVE_WEIGHT,
                    'optimizer.trainable': STAGE2_PLUS_PROJECTOR},
    'contrastive control (w=0)': {'data.local_views': True, 'train.contrastive_weight': 0.0,
                                  'optimizer.trainable': STAGE2_PLUS_PROJECTOR},
}


def parse_arg(arg):
  """'stage1,seeds=3,init=/x' -> {'stage': 'stage1', 'seeds': 3, 'init': '/x'}."""
  out = {'stage': 'stage2', 'seeds': 1, 'init': STAGE1_DIR}
  for item in filter(None, (arg or '').split(',')):
    key, eq, value = item.partition('=')
    if not eq and key in ('stage1', 'stage2'):
      out['stage'] = key
    elif key == 'seeds' and value.isdigit() and int(value) > 0:
      out['seeds'] = int(value)
    elif key == 'init' and value.startswith('/'):
      out['init'] = value
    else:
      raise ValueError(f'configs/ablations.py argument {item!r}: expected stage1, stage2, '
                       'seeds=N or init=/absolute/path')
  return out


def _demo_config(stage):
  path = pathlib.Path(__file__).resolve().parent / 'demo.py'
  spec = importlib.util.spec_from_file_location('skymoe_config_demo_for_ablations', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(stage)


def get_config(arg=None):
  a = parse_arg(arg)
  c = _demo_config(a['stage'])
  if a['stage'] == 'stage1':
    return c  # the demo's stage I, unchanged
  c.train.init_from = a['init']
  c.train.total_steps = STAGE2_STEPS
  # Follow total_steps (also when overridden on the command line): one checkpoint and one
  # evaluation, both at the last step.
  c.train.eval_every = c.train.get_ref('total_steps')
  c.train.checkpoint_every = c.train.get_ref('total_steps')
  c.train.update(log_every=20, keep_checkpoints=1)
  c.eval.update(max_samples=100, max_new_tokens=24, batch_size=24)
  return c


def get_sweep(arg=None):
  """Every variant x seed as override dicts (seed-major, VARIANTS' priority order)."""
  seeds = parse_arg(arg)['seeds']
  return [dict(overrides, seed=s) for s in range(seeds) for overrides in VARIANTS.values()]


def variant_of(overrides):
  """The VARIANTS name whose overrides (seed aside) equal these, compared as override text."""
  def text(v):
    return repr(tuple(v)) if isinstance(v, (list, tuple)) else v if isinstance(v, str) else repr(v)
  given = {k: text(v) for k, v in overrides.items() if k != 'seed'}
  for name, variant in VARIANTS.items():
    if {k: text(v) for k, v in variant.items()} == given:
      return name
  return None
