"""The paper's claims at small scale: ablations of the demo model on synthetic scenes, a stage I
per seed.

  configs/ablations.py:stage1   stage I, the demo's (configs/demo.py:stage1) for STAGE1_STEPS
  configs/ablations.py          stage II (the full model: 8 experts top-2, adaptive router, CDA
                                cutout + recolour + move), upcycled from its seed's stage I, the
                                sibling workdir STAGE1_RUN.format(seed=<config.seed>) (resolved
                                against the run's parent folder), evaluated at its last step

The argument is a comma-separated list of: 'stage1' | 'stage2' (default), 'init=/abs/stage1'
(one shared stage-I workdir for every run and seed instead: the old layout, which get_sweep
then leaves out of the sweep), 'seeds=N' (seeds in get_sweep, default 1), 'steps=N' (stage-II
steps, default STAGE2_STEPS), 'eval=N' (evaluation questions per task of each source, default
EVAL_PER_TASK), 'claims' (get_sweep lists CLAIM_VARIANTS, the ones the claims compare), 'cda'
(CDA_VARIANTS, the CDA study) or 'experts' (EXPERT_VARIANTS, claims 3d and 1b).

  python launch/sweep.py --config=configs/ablations.py:claims,seeds=4,steps=100,eval=300 \
      --workdir_root=/tmp/skymoe_science --local
  python launch/sweep.py --config=configs/ablations.py:cda,seeds=2,steps=100,eval=300 \
      --workdir_root=/tmp/skymoe_science --local      # same root: reuses the stage Is
  python benchmarks/ablation_report.py --workdir_root=/tmp/skymoe_science
  python launch/sweep.py --config=configs/ablations.py:experts,seeds=4,steps=100,eval=300 \
      --workdir_root=/tmp/skymoe_experts --local   # claims 3d and 1b, on a root of its own

get_sweep() is seed-major: for seed 0 its stage-I run ({'config_arg': 'stage1', 'seed': 0}, the
workdir 'config_arg=stage1,seed=0': jobs/sweep.py trains it with this file's ':stage1'), then
seed 0's stage-II variants in priority order, then seed 1, ...: a sweep cut short still covers
the most important comparisons, and every stage-II run comes after the stage I it starts from.
Seeds change both stages (stage I's initialisation and batch order; stage II's routers and
batch order).
"""
import pathlib

from skymoe_jax import config as config_lib
from skymoe_jax.registry import ConfigError

# A seed's stage-I workdir, a sibling of its stage-II runs: the name jobs/sweep.py gives the
# sweep's run {'config_arg': 'stage1', 'seed': seed} (common.run_name; a test checks they agree).
STAGE1_RUN = 'config_arg=stage1,seed={seed}'
STAGE1_STEPS = 800        # each seed's stage I (the demo trains 850)
STAGE2_STEPS = 60          # sized for ~2 minutes per run on a 2-core CPU, evaluation included
EVAL_PER_TASK = 100        # evaluation questions per task (eval.max_per_task)
CONTRASTIVE_WEIGHT = 0.1
DEMO_MLP_DIM = 512         # configs/demo.py's model.llm.mlp_dim (a test checks they agree)
# Stage II's trainable set (optimizer.STAGE_II_TRAINABLE) plus the projector: the contrastive
# loss compares projector outputs, so without the projector it has no trainable path at all.
STAGE2_PLUS_PROJECTOR = ('.*/moe/(w_gate|w_up|w_down)',
                         '.*/moe/(router|condition_proj|task_embed|granularity_embed)',
                         'projector/.*')

FULL = 'full (MoE-8, adaptive, CDA both)'
SCALED_BIAS = 'adaptive router, bias x8'
PREDICTED_SCALED = 'predicted condition, bias x8'
# name -> stage-II overrides, in priority order (the report's table order); the full model is
# the config itself.
VARIANTS = {
    FULL: {},
    # Dense at equal active parameters: the MoE layers' FFN as one expert of twice the FFN's
    # width, i.e. the FFN parameters a token uses in top-2 of 8 (upcycling keeps the stage-I FFN
    # in its first half and starts the second half switched off; stages.upcycle). Same layers,
    # trainable set and losses as the full model; with one expert the router's weight is 1.
    'dense (equal active)': {'model.moe.num_experts': 1, 'model.moe.top_k': 1,
                             'model.moe.mlp_dim': 2 * DEMO_MLP_DIM},
    'plain router': {'model.moe.adaptive': False},
    # The adaptive bias U (e_task + e_gran) times 8: U starts at zero and, at 1x, moves too little
    # in a hundred steps at 3e-4 to change the routing (docs/results.md); 8x lets it move as fast
    # as the condition head's logits (model/skymoe.py CONDITION_LOGIT_SCALE).
    SCALED_BIAS: {'model.moe.condition_scale': 8.0},
    # The routing condition from the model's own prediction instead of the dataset's tags.
    'predicted condition': {'model.moe.condition': 'predicted'},
    PREDICTED_SCALED: {'model.moe.condition': 'predicted', 'model.moe.condition_scale': 8.0},
    'CDA off': {'data.cda.enabled': False},
    # Counterfactual scenes rendered again from the edited scene description instead of edited
    # pixels (data.cda.counterfactual, default 'pixel').
    'CDA re-rendered': {'data.cda.counterfactual': 'rerender'},
    'MoE-1': {'model.moe.num_experts': 1, 'model.moe.top_k': 1},
    'MoE-2': {'model.moe.num_experts': 2},
    'MoE-4': {'model.moe.num_experts': 4},
    # Dense at stage-I width: stage I's model trained further with every decoder FFN trainable
    # (half the active FFN parameters of top-2). Scanned layers stack all 4 FFNs in one array,
    # so the layers of the MoE (0, 2) alone cannot be picked.
    'dense (stage-I FFNs)': {'model.moe.num_experts': 0,
                             'optimizer.trainable': ('decoder/.*/mlp/.*',)},
    'CDA cutout only': {'data.cda.recolour_weight': 0.0, 'data.cda.move_weight': 0.0},
    'CDA recolour only': {'data.cda.cutout_weight': 0.0, 'data.cda.move_weight': 0.0},
    'CDA move only': {'data.cda.cutout_weight': 0.0, 'data.cda.recolour_weight': 0.0},
    'CDA attributes only': {'data.cda.cutout_weight': 0.0},
    # The control: the edit rows hold unedited copies of their originals (cda.copy), so what any
    # edit row costs (one original of the batch less) is told from what an edit's content does.
    'CDA copies (no edit)': {'data.cda.copy_weight': 1.0, 'data.cda.cutout_weight': 0.0,
                             'data.cda.recolour_weight': 0.0, 'data.cda.move_weight': 0.0},
    'CDA share 0.125': {'data.cda.edit_fraction': 0.125},
    'CDA share 0.5': {'data.cda.edit_fraction': 0.5},
    'contrastive': {'data.local_views': True, 'train.contrastive_weight': CONTRASTIVE_WEIGHT,
                    'optimizer.trainable': STAGE2_PLUS_PROJECTOR},
    'contrastive control (w=0)': {'data.local_views': True, 'train.contrastive_weight': 0.0,
                                  'optimizer.trainable': STAGE2_PLUS_PROJECTOR},
}
# The variants the claims compare (benchmarks/ablation_report.claims): the 'claims' sweep.
# Sized for this machine's 2 cores: 4 seeds x (stage I + 8) runs take about an hour and a half.
CLAIM_VARIANTS = (FULL, 'CDA off', 'plain router', 'predicted condition', 'dense (equal active)',
                  'CDA re-rendered', SCALED_BIAS, PREDICTED_SCALED)
# The CDA study, the 'cda' sweep: what CLAIM_VARIANTS does not already hold (full, CDA off and
# re-rendered are there), so it may run on the same root, at the same time as the claims sweep.
CDA_VARIANTS = ('CDA copies (no edit)', 'CDA cutout only', 'CDA recolour only', 'CDA move only',
                'CDA share 0.5', 'contrastive', 'contrastive control (w=0)')
# Claims 3d and 1b, the 'experts' sweep: the number of experts and the stage-I dense model
# trained further, each seed's full model among them (its own root: the full model is the claims
# sweep's too).
EXPERT_VARIANTS = (FULL, 'MoE-1', 'MoE-2', 'MoE-4', 'dense (stage-I FFNs)')
SELECTIONS = {'claims': CLAIM_VARIANTS, 'cda': CDA_VARIANTS, 'experts': EXPERT_VARIANTS}


def parse_arg(arg):
  """'claims,seeds=4,steps=300' -> fields stage ('stage1' | 'stage2'), seeds, init ('' = a
  stage I per seed), steps, eval, claims, cda (config.parse_arg reads the items; the checks
  here are this file's own)."""
  a = config_lib.parse_arg(arg, stage1=False, stage2=False, seeds=1, init='', steps=STAGE2_STEPS,
                           eval=EVAL_PER_TASK, **{name: False for name in SELECTIONS})
  where = f'configs/ablations.py argument {arg!r}'
  if a.stage1 and a.stage2:
    raise ConfigError(f'{where}: stage1 or stage2, not both')
  chosen = [name for name in SELECTIONS if a[name]]
  if len(chosen) > 1:
    raise ConfigError(f'{where}: one of {" or ".join(chosen)}, not both (one sweep per root)')
  for name in ('seeds', 'steps', 'eval'):
    if a[name] < 1:
      raise ConfigError(f"configs/ablations.py argument '{name}={a[name]}': must be >= 1")
  if a.init and not a.init.startswith('/'):
    raise ConfigError(f"configs/ablations.py argument 'init={a.init}': give an absolute path "
                      "(one shared stage-I workdir), or leave it out (a stage I per seed)")
  a.stage = 'stage1' if a.stage1 else 'stage2'
  return a


def _demo_config(stage):
  """configs/demo.py:<stage>, read as every command reads a config file."""
  return config_lib.load(f'{pathlib.Path(__file__).resolve().parent / "demo.py"}:{stage}')


def get_config(arg=None):
  a = parse_arg(arg)
  c = _demo_config(a['stage'])
  # The sweeps of docs/results.md were measured without the demo's token table: kept so that
  # their commands still give their numbers.
  c.model.vision.token_posemb = 'none'
  c.model.scan_layers = True  # the demo unrolls its layers; the initialisation follows the layout
  if a['stage'] == 'stage1':
    # The demo's stage I, shorter: four of them (a stage I per seed) must fit beside the
    # variants on a 2-core machine.
    c.train.update(total_steps=STAGE1_STEPS, checkpoint_every=STAGE1_STEPS)
    return c
  if a['init']:
    c.train.init_from = a['init']
  else:  # the seed's own stage I; follows config.seed, also when overridden (the sweep's seed)
    head, _, tail = STAGE1_RUN.partition('{seed}')
    c.train.init_from = head + c.get_ref('seed').to_str() + tail
  c.train.total_steps = a['steps']
  # Follow total_steps (also when overridden on the command line): one checkpoint and one
  # evaluation, both at the last step.
  c.train.eval_every = c.train.get_ref('total_steps')
  c.train.checkpoint_every = c.train.get_ref('total_steps')
  c.train.update(log_every=20, keep_checkpoints=1)
  c.eval.update(max_samples=0, max_per_task=a['eval'], max_new_tokens=24, batch_size=64)
  return c


def stage1_run(seed):
  """The sweep's stage-I run of one seed (jobs/sweep.py: 'config_arg' picks this file's
  argument for that run)."""
  return {'config_arg': 'stage1', 'seed': seed}


def get_sweep(arg=None):
  """Seed-major: per seed its stage-I run (unless 'init=' names a shared one), then the variants
  (the SELECTIONS list the argument names, or every one, in that list's order) as override
  dicts."""
  a = parse_arg(arg)
  names = next((SELECTIONS[n] for n in SELECTIONS if a[n]), tuple(VARIANTS))
  runs = []
  for s in range(a['seeds']):
    if not a['init']:
      runs.append(stage1_run(s))
    runs += [dict(VARIANTS[n], seed=s) for n in names]
  return runs


def variant_of(overrides):
  """The VARIANTS name whose overrides (seed aside) equal these, compared as the
  --config.FIELD=VALUE flags they make (values or their text alike)."""
  given = set(config_lib.override_flags({k: v for k, v in overrides.items() if k != 'seed'}))
  for name, variant in VARIANTS.items():
    if set(config_lib.override_flags(variant)) == given:
      return name
  return None
