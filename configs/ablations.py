"""The paper's claims at small scale: stage-II ablations of the demo model on synthetic scenes.

  configs/ablations.py:stage1   stage I, exactly the demo's (configs/demo.py:stage1); trained once
                                into the shared stage-I workdir that every ablation starts from
  configs/ablations.py          stage II (the full model: 8 experts top-2, adaptive router, CDA
                                cutout + recolour + move), upcycled from that stage-I workdir,
                                evaluated at its last step (WORKDIR/eval/<step>/)

The argument is a comma-separated list of: 'stage1' | 'stage2' (default), 'init=/abs/stage1'
(the stage-I workdir, default STAGE1_DIR), 'seeds=N' (runs per variant in get_sweep, default 1),
'steps=N' (stage-II steps, default STAGE2_STEPS), 'eval=N' (evaluation questions per source,
default EVAL_SAMPLES), 'claims' (get_sweep lists only CLAIM_VARIANTS, the ones the claims
compare).

  python launch/prepare.py --config=configs/ablations.py:stage1 --workdir=/tmp/skymoe_ablations/stage1
  python -m skymoe_jax.train --config=configs/ablations.py:stage1 --workdir=/tmp/skymoe_ablations/stage1
  python launch/sweep.py --config=configs/ablations.py:seeds=3 \
      --workdir_root=/tmp/skymoe_ablations/runs --local
  python launch/sweep.py --config=configs/ablations.py:claims,seeds=4,steps=300,eval=300 \
      --workdir_root=/tmp/skymoe_ablations/long --local
  python benchmarks/ablation_report.py --workdir_root=/tmp/skymoe_ablations/runs

get_sweep() lists VARIANTS in priority order, all of seed 0 first, then seed 1, ...: a sweep cut
short still covers the most important comparisons. Every run of one seed shares the stage-I
model; seeds change the stage-II router initialisation and the batch order.
"""
import pathlib

from skymoe_jax import config as config_lib
from skymoe_jax.registry import ConfigError

STAGE1_DIR = '/tmp/skymoe_ablations/stage1'   # the shared stage-I workdir (absolute)
STAGE2_STEPS = 60          # sized for ~2 minutes per run on a 2-core CPU, evaluation included
EVAL_SAMPLES = 100         # questions per source: 14-32 per task of the synthetic scenes
CONTRASTIVE_WEIGHT = 0.1
DEMO_MLP_DIM = 512         # configs/demo.py's model.llm.mlp_dim (a test checks they agree)
# Stage II's trainable set (optimizer.STAGE_II_TRAINABLE) plus the projector: the contrastive
# loss compares projector outputs, so without the projector it has no trainable path at all.
STAGE2_PLUS_PROJECTOR = ('.*/moe/(w_gate|w_up|w_down)',
                         '.*/moe/(router|condition_proj|task_embed|granularity_embed)',
                         'projector/.*')

# name -> stage-II overrides; the full model is the config itself.
VARIANTS = {
    'full (MoE-8, adaptive, CDA both)': {},
    # Dense at equal active parameters: the MoE layers' FFN as one expert of twice the FFN's
    # width, i.e. the FFN parameters a token uses in top-2 of 8 (upcycling keeps the stage-I FFN
    # in its first half and starts the second half switched off; stages.upcycle). Same layers,
    # trainable set and losses as the full model; with one expert the router's weight is 1.
    'dense (equal active)': {'model.moe.num_experts': 1, 'model.moe.top_k': 1,
                             'model.moe.mlp_dim': 2 * DEMO_MLP_DIM},
    'plain router': {'model.moe.adaptive': False},
    'CDA off': {'data.cda.enabled': False},
    'MoE-1': {'model.moe.num_experts': 1, 'model.moe.top_k': 1},
    'MoE-2': {'model.moe.num_experts': 2},
    'MoE-4': {'model.moe.num_experts': 4},
    # Dense at stage-I width: stage I's model trained further with every decoder FFN trainable
    # (half the active FFN parameters of top-2). Scanned layers stack all 4 FFNs in one array,
    # so the layers of the MoE (0, 2) alone cannot be picked.
    'dense (stage-I FFNs)': {'model.moe.num_experts': 0,
                             'optimizer.trainable': ('decoder/.*/mlp/.*',)},
    'CDA cutout only': {'data.cda.recolour_weight': 0.0, 'data.cda.move_weight': 0.0},
    'CDA attributes only': {'data.cda.cutout_weight': 0.0},
    'contrastive': {'data.local_views': True, 'train.contrastive_weight': CONTRASTIVE_WEIGHT,
                    'optimizer.trainable': STAGE2_PLUS_PROJECTOR},
    'contrastive control (w=0)': {'data.local_views': True, 'train.contrastive_weight': 0.0,
                                  'optimizer.trainable': STAGE2_PLUS_PROJECTOR},
}
# The variants the claims compare (benchmarks/ablation_report.claims): the 'claims' sweep.
CLAIM_VARIANTS = ('full (MoE-8, adaptive, CDA both)', 'dense (equal active)', 'plain router',
                  'CDA off', 'MoE-1', 'MoE-2', 'MoE-4')


def parse_arg(arg):
  """'stage1,seeds=3,init=/x' -> fields stage ('stage1' | 'stage2'), seeds, init, steps, eval,
  claims (config.parse_arg reads the items; the checks here are this file's own)."""
  a = config_lib.parse_arg(arg, stage1=False, stage2=False, claims=False, seeds=1,
                           init=STAGE1_DIR, steps=STAGE2_STEPS, eval=EVAL_SAMPLES)
  if a.stage1 and a.stage2:
    raise ConfigError(f'configs/ablations.py argument {arg!r}: stage1 or stage2, not both')
  for name in ('seeds', 'steps', 'eval'):
    if a[name] < 1:
      raise ConfigError(f"configs/ablations.py argument '{name}={a[name]}': must be >= 1")
  if not a.init.startswith('/'):
    raise ConfigError(f"configs/ablations.py argument 'init={a.init}': give an absolute path "
                      '(the stage-I workdir)')
  a.stage = 'stage1' if a.stage1 else 'stage2'
  return a


def _demo_config(stage):
  """configs/demo.py:<stage>, read as every command reads a config file."""
  return config_lib.load(f'{pathlib.Path(__file__).resolve().parent / "demo.py"}:{stage}')


def get_config(arg=None):
  a = parse_arg(arg)
  c = _demo_config(a['stage'])
  if a['stage'] == 'stage1':
    return c  # the demo's stage I, unchanged
  c.train.init_from = a['init']
  c.train.total_steps = a['steps']
  # Follow total_steps (also when overridden on the command line): one checkpoint and one
  # evaluation, both at the last step.
  c.train.eval_every = c.train.get_ref('total_steps')
  c.train.checkpoint_every = c.train.get_ref('total_steps')
  c.train.update(log_every=20, keep_checkpoints=1)
  c.eval.update(max_samples=a['eval'], max_new_tokens=24, batch_size=24)
  return c


def get_sweep(arg=None):
  """Every variant (or CLAIM_VARIANTS) x seed as override dicts (seed-major, VARIANTS' order)."""
  a = parse_arg(arg)
  names = [n for n in VARIANTS if n in CLAIM_VARIANTS or not a['claims']]
  return [dict(VARIANTS[n], seed=s) for s in range(a['seeds']) for n in names]


def variant_of(overrides):
  """The VARIANTS name whose overrides (seed aside) equal these, compared as the
  --config.FIELD=VALUE flags they make (values or their text alike)."""
  given = set(config_lib.override_flags({k: v for k, v in overrides.items() if k != 'seed'}))
  for name, variant in VARIANTS.items():
    if set(config_lib.override_flags(variant)) == given:
      return name
  return None
