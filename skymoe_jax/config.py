"""The full config tree with its defaults, one loader for config files, and the checks every
config passes before use.

Config files in configs/ define `get_config(arg)`, start from `base_config()` and change what
they need; every command overrides any field as `--config.FIELD=VALUE`
(`--config.model.moe.num_experts=4`), and `load` reads a file with overrides exactly as the
command line does. Defaults are the paper's 7B model (docs/design.md): CLIP ViT-L/14 at 504 px,
Vicuna-7B, 8 experts top-2 in layers 0, 2, ..., 30.

This module is plain data: it imports nothing of the project but the data layer's task
vocabulary. Named choices (MoE backend, expert-parallel strategy, remat policy, ...) are checked
by the registries that own them (model.factory.validate checks the model's).
"""
import importlib.util
import pathlib
import re
from typing import Dict, Optional

from absl import flags
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_flags

from skymoe_jax.data.tasks import GRANULARITIES, TASKS
from skymoe_jax.registry import ConfigError

OVERRIDE_PREFIX = '--config.'

# Logical name -> mesh axis (or axes); a name absent here is replicated. config.mesh.rules holds
# this table: the only place where a logical axis name (embed, mlp, heads, exp, ...) meets a mesh
# axis ('data', 'fsdp', 'expert', 'tensor'); model code only ever names logical axes.
DEFAULT_RULES = (
    ('activation_batch', ('data', 'fsdp', 'expert')),
    ('activation_length', None),
    ('activation_embed', None),
    ('activation_mlp', 'tensor'),
    ('activation_vocab', 'tensor'),
    ('embed', 'fsdp'),
    ('mlp', 'tensor'),
    ('heads', 'tensor'),
    ('kv_heads', 'tensor'),
    ('vocab', 'tensor'),
    ('exp', 'expert'),
)

# Trainable parameters (full-match regexes over '/'-joined parameter paths) of the two stages.
# Stage I: LoRA adapters on W_q, W_v and the projector (CLIP and the LLM frozen).
STAGE_I_TRAINABLE = ('.*_lora/.*', 'projector/.*')
# Stage II: the experts and the (adaptive) routers of the MoE layers; everything else frozen.
# condition_head/.*: the head that predicts the router's condition from the prompt
# (model.moe.condition='predicted'; stage I has none, so it starts fresh like the routers). It
# shares the routers' pattern: a pattern that matches no parameter is an error
# (training/optimizer.py trainable_mask), and a tag-routed model has no head.
STAGE_II_TRAINABLE = ('.*/moe/(w_gate|w_up|w_down)',
                      '.*/moe/(router|condition_proj|task_embed|granularity_embed)'
                      '|condition_head/.*')


def optimizer_defaults() -> ml_collections.ConfigDict:
  """config.optimizer: the paper's stage-I AdamW recipe (training/optimizer.py builds it)."""
  return ml_collections.ConfigDict(dict(
      learning_rate=2e-4,    # peak; stage II uses 2e-5
      warmup_fraction=0.03,  # of the optimizer steps
      min_lr_ratio=0.0,      # cosine ends at min_lr_ratio * learning_rate
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      grad_clip_norm=1.0,    # global norm; 0 = no clipping
      grad_accum_steps=1,    # micro-batches (train-step calls) per optimizer step
      trainable=(),          # full-match regexes over parameter paths; empty = all trainable
  ))


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.dtype = 'bfloat16'        # compute dtype
  m.param_dtype = 'float32'   # storage dtype of the parameters
  m.scan_layers = True        # scan repeated layers: compile time independent of depth
  m.remat_policy = 'none'     # see model/layers.py REMAT_POLICIES; 'auto': by remat_auto
  # remat_policy='auto': ((max tokens per device, policy), ...); the first entry whose limit
  # holds the activations one device keeps per layer (batch x sequence over the batch shards and
  # tensor ways, parallel/mesh.py tokens_per_device) wins, 'full' past the last.
  m.remat_auto = ()
  m.attention_impl = 'auto'   # see model/attention_kernels.py; auto: by the mesh's platform

  m.vision = ml_collections.ConfigDict(dict(
      image_size=504, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
      feature_layer=-2,  # HF hidden_states index: -2 = output of the penultimate block
      norm_eps=1e-5,
      # start of the learned position embeddings: 'normal' (CLIP's) | 'sincos2d' (a tower
      # trained from scratch: the 2-D sin-cos table, model/vit.py)
      posemb_init='normal',
      # 'sincos2d': a fixed 2-D sin-cos table (unit RMS) added to the image tokens after the
      # projector, so each token says where it is in the LLM's own width. A tower trained from
      # scratch keeps no linear trace of position in its output (docs/results.md), and the LLM's
      # RoPE positions reach attention scores only, never the values an answer is read from.
      token_posemb='none'))

  m.llm = ml_collections.ConfigDict(dict(
      vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32,
      head_dim=128, mlp_dim=11008, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
      max_seq_len=2048,
      # The image tokens' rotary positions: '1d' (LLaVA's: the row-major sequence, so a column's
      # tokens lie a row apart) | '2d' (row and column on interleaved frequencies, text after
      # them; model/rope.py). docs/results.md: under '1d' box answers follow rows, not columns.
      image_rope='1d'))

  # LoRA on the named attention projections; rank 0 = no adapters (stage II, merged).
  m.lora = ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets=('query', 'value')))

  m.moe = ml_collections.ConfigDict(dict(
      num_experts=8,            # 0 = dense model (stage I)
      top_k=2,
      layers=tuple(range(0, 32, 2)),
      mlp_dim=0,                # 0 = the dense FFN's size (upcycling copies it)
      renormalize=False,        # False: the paper's raw softmax weights of the top k
      backend='ragged',         # loop | dense | ragged | capacity
      ep_strategy='ring',       # expert parallelism over the mesh: ring | all_to_all | none
      capacity_factor=1.25,     # capacity backend only
      # ragged_dot | blocks | batched | triton (GPU kernel) | megablox (TPU kernel) |
      # auto (blocks on CPU, triton on GPU, megablox on TPU); model/moe/grouped_matmul.py
      ragged_impl='auto',
      ragged_block_size=128,
      adaptive=True,            # task + granularity bias on the router logits
      num_tasks=len(TASKS),
      num_granularities=len(GRANULARITIES),
      condition_dim=64,
      # Multiplies the adaptive bias U (e_task + e_gran). U starts at zero and Adam moves it by
      # about the learning rate per step, so at stage II's 3e-4 a factor of 1 leaves it near zero
      # for hundreds of steps; a larger factor lets the condition steer routing sooner.
      condition_scale=1.0,
      # Where the adaptive router's task and granularity come from: 'tags' = the sample's tags
      # (task_id, granularity_id); 'predicted' = a head on the mean prompt token embedding
      # predicts them (soft distributions), so inference needs no tag (model/skymoe.py).
      condition='tags',
      load_balance_weight=0.01,
      z_loss_weight=0.0))

  # Input pipeline (data/pipeline.py). Sources: name -> {data_dir, split, weight, generate};
  # generate='synthetic' creates the dataset from data.synthetic when it is missing.
  c.data = ml_collections.ConfigDict(dict(
      sources=ml_collections.ConfigDict(),
      batch_size=144,             # global, over all hosts
      text_len=2048 - 1296,       # text tokens after the image tokens, padded to this
      tokenizer='',               # sentencepiece model; '' = train one on the sources' text
      tokenizer_vocab_size=0,     # when training one: 0 = model.llm.vocab_size
      # When training one: a box dialect whose coordinates become one token each ('geochat':
      # '<0>' ... '<100>'; '' = none, digits one per token). A box is then four choices of a
      # place rather than a digit string to spell (docs/data.md). Checked where the tokenizer is
      # trained (workdir.prepare_tokenizer): the dialects are the data layer's.
      tokenizer_coordinates='',
      template='llava_v1',
      pad_to_square=True,         # LLaVA's pad before resizing (boxes.parse undoes it)
      max_image_pixels=8192 * 8192,  # larger images are refused when decoded (and converted)
      local_views=False,          # a local crop per row (local_images) for the contrastive loss
      object_centred_prob=0.7,    # local crop around an object when the record has boxes
      local_scale=(0.25, 0.5),    # random local crop side, fraction of the short side
      # Times each record of a task appears in its source's epoch (0 leaves the task out): a task
      # mixture inside one dataset, e.g. grounding x4 for a model that must learn boxes.
      task_repeats=ml_collections.ConfigDict({t: 1 for t in TASKS}),
      cda=ml_collections.ConfigDict(dict(
          enabled=False, edit_fraction=0.25,   # rows of each batch that are edited copies
          cutout_weight=1.0, recolour_weight=1.0, move_weight=1.0,
          copy_weight=0.0,   # a control: unedited copies in the edit rows (cda.copy)
          # pixel: the edit painted over the picture (any source); rerender: the synthetic
          # scene drawn again from its description with the edit made (a perfect counterfactual)
          counterfactual='pixel')),
      synthetic=ml_collections.ConfigDict(dict(
          num_images=2000, seed=0, image_size=128, val_fraction=0.1,
          # difficulty (data/synthetic.py Difficulty): object sizes x object_scale, at most
          # max_objects per scene, backgrounds blended with another scene's up to scene_mix,
          # local_questions per image of the refer and colour kinds
          object_scale=1.0, max_objects=8, scene_mix=0.0, local_questions=1,
          cache_dir='~/.cache/skymoe_jax')),
      num_parallel_batches=2,     # batches built concurrently by tf.data
      prefetch_batches=2))

  c.optimizer = optimizer_defaults()

  # Training (train/): steps, logging, checkpoints, the contrastive term of the loss.
  c.train = ml_collections.ConfigDict(dict(
      stage='',                    # the recipe stage: 'stage1' (dense + LoRA) or 'stage2' (MoE)
      init_from='',                # stage II: a stage-I workdir whose last checkpoint is upcycled
      total_steps=1000,
      log_every=10,
      # TensorBoard event files in the workdir (clu -> tf.summary, which writes gs:// through
      # TensorFlow's GCS client). False: metrics.jsonl and the log alone (a GCS emulator: tf's
      # client cannot be pointed at one).
      tensorboard=True,
      checkpoint_every=200,
      # Orbax's OCDBT layout (a few large files per host). False: one zarr folder per array; a
      # restore reads either. The GCS emulator tests use False: OCDBT's conditional writes need
      # GCS's generation headers, which gcp-storage-emulator does not send.
      checkpoint_ocdbt=True,
      keep_checkpoints=3,
      eval_every=0,                # evaluate every N steps (evaluation/runner.py); 0 = never
      contrastive_weight=0.0,      # local/global InfoNCE (needs data.local_views)
      contrastive_temperature=0.07,
      # model.moe.condition='predicted': weight of the condition head's cross-entropy against
      # the sample's task and granularity tags (unused otherwise).
      condition_loss_weight=1.0))

  # Evaluation (evaluation/runner.py): the eval split of every data source.
  c.eval = ml_collections.ConfigDict(dict(
      split='validation',
      batch_size=8,
      max_new_tokens=256,
      max_samples=0,               # per source; 0 = all
      max_per_task=0,              # per (source, task), the first in split order; 0 = all
      # The routing condition of each question under model.moe.condition='tags': 'given' = its
      # tags; 'stripped' = tasks.classify's keyword guess from its text (what an untagged
      # question gets). Metrics and routing.json stay keyed by the true tags.
      tags='given',
      temperature=0.0,             # 0 = greedy
      top_p=1.0))

  # Device mesh: axis sizes and the logical-axis rule table. -1 on one axis: the rest of the
  # devices. -1 on one batch axis (data, fsdp, expert) and on tensor: the batch axis takes the
  # largest share of the rest that data.batch_size divides over the batch axes, tensor what is
  # left (parallel/mesh.py mesh_shape).
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.mesh.rules = DEFAULT_RULES
  # Several slices (multislice over the data-centre network): the sizes above are per slice;
  # dcn_data x dcn_fsdp lay the slices along data and fsdp (-1 on one: the slices the other
  # leaves); expert and tensor stay inside a slice. The default: slices only split the batch.
  # num_slices: the slices the devices must be in (the launcher sets it); 0 = from the devices.
  c.mesh.dcn_data = -1
  c.mesh.dcn_fsdp = 1
  c.mesh.num_slices = 0

  # Multi-process start-up (parallel/multihost.py); unset fields fall back to the environment
  # (SKYMOE_COORDINATOR, SKYMOE_NUM_PROCESSES, SKYMOE_PROCESS_ID); none at all = one process.
  # The timeouts bound a failure: a process silent for heartbeat_timeout_seconds is dead and the
  # others are aborted (no hang in a collective; rerun to resume); an exiting process waits at
  # most shutdown_timeout_seconds for the others. initialization_timeout: jax's (300 s) if unset.
  placeholder = ml_collections.config_dict.placeholder
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address=placeholder(str), num_processes=placeholder(int),
      process_id=placeholder(int), auto=False, cpu_collectives='gloo',
      initialization_timeout=placeholder(int), heartbeat_timeout_seconds=60,
      shutdown_timeout_seconds=120))
  return c


CONDITIONS = ('tags', 'predicted')  # model.moe.condition
TOKEN_POSEMB = ('none', 'sincos2d')  # model.vision.token_posemb
IMAGE_ROPE = ('1d', '2d')  # model.llm.image_rope (model/rope.py)
EVAL_TAGS = ('given', 'stripped')    # eval.tags
STAGES = ('stage1', 'stage2')  # the recipe's two stages: config arguments and train.stage


def apply_stage(c: ml_collections.ConfigDict, stage: str, lora_rank: int,
                stage2_learning_rate: float) -> ml_collections.ConfigDict:
  """Turns a config with its MoE settings into one of the paper's two stages (docs/design.md).

  stage1: the dense model (no MoE layers), LoRA of `lora_rank` on W_q/W_v, LoRA + projector
  trained. stage2: the configured MoE, LoRA merged away (rank 0), experts + routers trained,
  initialised from the sibling workdir 'stage1' (train.init_from).
  """
  if stage not in STAGES:
    raise ConfigError(f'config argument {stage!r}: expected one of {STAGES}')
  if stage == 'stage1':
    c.model.moe.num_experts = 0
    c.model.lora.rank = lora_rank
    c.optimizer.trainable = STAGE_I_TRAINABLE
    c.train.stage = 'stage1'
  else:
    c.model.lora.rank = 0
    c.optimizer.trainable = STAGE_II_TRAINABLE
    c.optimizer.learning_rate = stage2_learning_rate
    c.train.stage = 'stage2'
    c.train.init_from = 'stage1'
  return c


def override_flags(overrides: Dict) -> list:
  """{field: value or text} -> ['--config.FIELD=VALUE', ...] as the command line writes them."""
  def text(value):
    if isinstance(value, str):
      return value
    if isinstance(value, (list, tuple)):
      return repr(tuple(value))  # config fields hold tuples; the parser reads a tuple literal
    return repr(value)
  return [f'{OVERRIDE_PREFIX}{field}={text(v)}' for field, v in (overrides or {}).items()]


def load(config_arg: str, overrides: Optional[Dict] = None) -> ml_collections.ConfigDict:
  """The config of `--config=FILE[:ARG] --config.FIELD=VALUE ...`: get_config(ARG) of FILE.

  Parsed by ml_collections' own flag machinery (on a private FlagValues), so field types, tuples
  and strings are read exactly as every command's --config flag reads them. overrides:
  {field: value}, values as Python objects or as the command-line text.
  """
  argv = ['load', f'--config={config_arg}', *override_flags(overrides)]
  values = flags.FlagValues()
  # The override flags are defined from the argv given at definition time, not sys.argv's.
  config_flags.DEFINE_config_file('config', None, 'Config file.', flag_values=values,
                                  lock_config=False, sys_argv=argv)
  values(argv)
  return values.config


def load_sweep(config_arg: str) -> list:
  """get_sweep(ARG) of `FILE[:ARG]`: the runs of a sweep as [{field: value}, ...], checked to be
  dicts of field names. (load reads get_config through ml_collections; get_sweep is read from
  the file itself, the one other function a config file may define.)"""
  path, _, arg = config_arg.partition(':')
  spec = importlib.util.spec_from_file_location(f'skymoe_sweep_{pathlib.Path(path).stem}', path)
  if spec is None or not pathlib.Path(path).is_file():
    raise ConfigError(f'--config={config_arg}: no config file {path}')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, 'get_sweep'):
    raise ConfigError(f'{path} defines no get_sweep(): nothing to sweep')
  runs = module.get_sweep(arg) if arg else module.get_sweep()
  if not isinstance(runs, (list, tuple)) or not all(
      isinstance(r, dict) and all(isinstance(k, str) for k in r) for r in runs):
    raise ConfigError(f'{path}: get_sweep() must return a list of {{field: value}} dicts')
  return [dict(r) for r in runs]


def parse_arg(arg: Optional[str], **defaults) -> ml_collections.ConfigDict:
  """A config file's ':ARG' as fields: 'stage2,seeds=4' -> {stage2: True, seeds: 4, ...}.

  Each comma-separated item is NAME=VALUE (VALUE typed like the default of NAME) or a bare NAME
  (True). Only names given as defaults are accepted, so a typo fails naming the item.
  """
  out = ml_collections.ConfigDict(defaults)
  for item in filter(None, (arg or '').split(',')):
    name, eq, value = item.partition('=')
    if name not in defaults:
      raise ConfigError(f'config argument {item!r}: expected one of {sorted(defaults)}')
    default = defaults[name]
    if not eq:
      out[name] = True
    elif isinstance(default, bool):
      if value.lower() not in ('true', 'false'):
        raise ConfigError(f'config argument {item!r}: {name} must be true or false')
      out[name] = value.lower() == 'true'
    elif default is None:
      out[name] = value
    else:
      try:
        out[name] = type(default)(value)
      except ValueError:
        raise ConfigError(f'config argument {item!r}: {name} must be {type(default).__name__}, '
                          f'like its default {default!r}') from None
  return out


def num_feature_layers(depth: int, feature_layer: int) -> int:
  """How many vision blocks run to produce the hidden state `feature_layer` (HF hidden_states
  index: -2 = the output of the penultimate block)."""
  n = depth + 1 + feature_layer if feature_layer < 0 else feature_layer
  if not 1 <= n <= depth:
    raise ConfigError(f'config.model.vision.feature_layer={feature_layer} is outside a '
                      f'{depth}-layer tower')
  return n


def _check(ok: bool, field: str, value, why: str):
  if not ok:
    raise ConfigError(f'config.{field}={value!r}: {why}')


def vision_tokens(model_cfg) -> int:
  v = model_cfg.vision
  return (v.image_size // v.patch_size) ** 2


def validate(config) -> None:
  """Raises ConfigError naming the first bad field. Called before anything is built."""
  m = config.model
  for field in ('dtype', 'param_dtype'):
    try:
      jnp.dtype(m[field])
    except TypeError:
      _check(False, f'model.{field}', m[field], 'not a dtype name')

  v = m.vision
  _check(v.patch_size > 0 and v.image_size % v.patch_size == 0, 'model.vision.image_size',
         v.image_size, f'must be a multiple of model.vision.patch_size={v.patch_size}')
  _check(v.width % v.num_heads == 0, 'model.vision.num_heads', v.num_heads,
         f'must divide model.vision.width={v.width}')
  num_feature_layers(v.depth, v.feature_layer)
  token_posemb = v.get('token_posemb', 'none')
  _check(token_posemb in TOKEN_POSEMB, 'model.vision.token_posemb', token_posemb,
         f'must be one of {TOKEN_POSEMB}')
  _check(token_posemb == 'none' or m.llm.embed_dim % 4 == 0, 'model.vision.token_posemb',
         token_posemb, f'a 2-D sin-cos table needs model.llm.embed_dim={m.llm.embed_dim} '
         'divisible by 4')

  llm = m.llm
  _check(llm.num_kv_heads > 0 and llm.num_heads % llm.num_kv_heads == 0,
         'model.llm.num_kv_heads', llm.num_kv_heads,
         f'must divide model.llm.num_heads={llm.num_heads}')
  _check(llm.head_dim % 2 == 0, 'model.llm.head_dim', llm.head_dim, 'RoPE needs an even size')
  image_rope = llm.get('image_rope', '1d')
  _check(image_rope in IMAGE_ROPE, 'model.llm.image_rope', image_rope,
         f'must be one of {IMAGE_ROPE}')
  _check(image_rope == '1d' or llm.head_dim >= 4, 'model.llm.image_rope', image_rope,
         f'2-D positions need model.llm.head_dim={llm.head_dim} >= 4 (a frequency per axis)')
  _check(llm.max_seq_len > vision_tokens(m), 'model.llm.max_seq_len', llm.max_seq_len,
         f'must hold the {vision_tokens(m)} image tokens and some text')

  lora = m.lora
  _check(lora.rank >= 0, 'model.lora.rank', lora.rank, 'must be >= 0')
  bad = set(lora.targets) - {'query', 'key', 'value'}
  _check(not bad, 'model.lora.targets', tuple(lora.targets),
         f'{sorted(bad)} not among query, key, value')

  moe = m.moe
  _check(moe.num_experts >= 0, 'model.moe.num_experts', moe.num_experts,
         'must be >= 0 (0 = a dense model)')
  if moe.num_experts > 0:
    _check(1 <= moe.top_k <= moe.num_experts, 'model.moe.top_k', moe.top_k,
           f'must be in [1, model.moe.num_experts={moe.num_experts}]')
    layers = tuple(moe.layers)
    _check(all(0 <= i < llm.num_layers for i in layers) and len(set(layers)) == len(layers),
           'model.moe.layers', layers,
           f'must be distinct layer indices below model.llm.num_layers={llm.num_layers}')
    _check(moe.ep_strategy != 'all_to_all' or moe.backend == 'capacity', 'model.moe.backend',
           moe.backend, 'ep_strategy=all_to_all exchanges capacity buffers: use backend=capacity')
    _check(moe.capacity_factor > 0, 'model.moe.capacity_factor', moe.capacity_factor,
           'must be > 0')
    _check(moe.ragged_block_size > 0, 'model.moe.ragged_block_size', moe.ragged_block_size,
           'must be > 0')
    _check(moe.num_tasks >= 1 and moe.num_granularities >= 1, 'model.moe.num_tasks',
           (moe.num_tasks, moe.num_granularities), 'tasks and granularities must be >= 1')
  condition_scale = moe.get('condition_scale', 1.0)
  _check(condition_scale > 0, 'model.moe.condition_scale', condition_scale, 'must be > 0')
  condition = moe.get('condition', 'tags')
  _check(condition in CONDITIONS, 'model.moe.condition', condition,
         f'must be one of {CONDITIONS}')
  # A dense model (stage I) has no router: the setting waits for stage II's MoE.
  _check(condition != 'predicted' or moe.num_experts == 0 or moe.adaptive,
         'model.moe.condition', condition,
         'predicts the adaptive router\'s condition: needs model.moe.adaptive=True')
  for entry in m.get('remat_auto', ()):
    _check(len(entry) == 2 and isinstance(entry[0], int) and entry[0] > 0
           and isinstance(entry[1], str), 'model.remat_auto', tuple(m.remat_auto),
           'expected ((max tokens per device > 0, policy name), ...)')
  _validate_data(config)
  _validate_train(config)
  _validate_eval(config)
  _validate_distributed(config)


def _validate_train(config) -> None:
  t = config.train
  _check(t.total_steps > 0, 'train.total_steps', t.total_steps, 'must be > 0')
  o = config.optimizer
  _check(o.learning_rate > 0, 'optimizer.learning_rate', o.learning_rate, 'must be > 0')
  for field in ('learning_rate', 'weight_decay'):
    with np.errstate(over='ignore'):  # 1e39 is inf in float32: the step would make NaN params
      in_dtype = np.asarray(o[field], jnp.dtype(config.model.param_dtype))
    _check(bool(np.isfinite(in_dtype)), f'optimizer.{field}', o[field],
           f'is not finite in model.param_dtype={config.model.param_dtype}')
  _check(0 <= o.warmup_fraction < 1, 'optimizer.warmup_fraction', o.warmup_fraction,
         'must be in [0, 1)')
  _check(o.grad_accum_steps >= 1, 'optimizer.grad_accum_steps', o.grad_accum_steps,
         'must be >= 1')
  for pattern in o.trainable:
    try:
      re.compile(pattern)
    except re.error as e:
      _check(False, 'optimizer.trainable', pattern, f'not a regular expression ({e})')
  _check(t.log_every > 0, 'train.log_every', t.log_every, 'must be > 0')
  _check(t.checkpoint_every > 0, 'train.checkpoint_every', t.checkpoint_every, 'must be > 0')
  _check(t.keep_checkpoints > 0, 'train.keep_checkpoints', t.keep_checkpoints, 'must be > 0')
  _check(t.contrastive_weight >= 0, 'train.contrastive_weight', t.contrastive_weight,
         'must be >= 0')
  _check(t.contrastive_weight == 0 or config.data.local_views, 'train.contrastive_weight',
         t.contrastive_weight, 'needs data.local_views=True (the local crops)')
  _check(t.contrastive_temperature > 0, 'train.contrastive_temperature',
         t.contrastive_temperature, 'must be > 0')
  weight = t.get('condition_loss_weight', 1.0)
  _check(weight >= 0, 'train.condition_loss_weight', weight, 'must be >= 0')


def _validate_eval(config) -> None:
  e = config.eval
  _check(e.batch_size > 0, 'eval.batch_size', e.batch_size, 'must be > 0')
  _check(e.max_new_tokens > 0, 'eval.max_new_tokens', e.max_new_tokens, 'must be > 0')
  _check(e.temperature >= 0, 'eval.temperature', e.temperature, 'must be >= 0')
  _check(0 < e.top_p <= 1, 'eval.top_p', e.top_p, 'must be in (0, 1]')
  _check(e.get('max_per_task', 0) >= 0, 'eval.max_per_task', e.get('max_per_task', 0),
         'must be >= 0 (0 = all)')
  _check(e.get('tags', 'given') in EVAL_TAGS, 'eval.tags', e.get('tags', 'given'),
         f'must be one of {EVAL_TAGS}')


def _validate_distributed(config) -> None:
  dist = config.get('distributed') or {}
  for field in ('initialization_timeout', 'heartbeat_timeout_seconds',
                'shutdown_timeout_seconds'):
    value = dist.get(field)
    _check(value is None or (isinstance(value, int) and not isinstance(value, bool) and value > 0),
           f'distributed.{field}',
           value, 'must be a whole number of seconds > 0')


def _validate_data(config) -> None:
  d = config.data
  _check(d.batch_size > 0, 'data.batch_size', d.batch_size, 'must be > 0')
  _check(d.max_image_pixels > 0, 'data.max_image_pixels', d.max_image_pixels, 'must be > 0')
  room = config.model.llm.max_seq_len - vision_tokens(config.model)
  _check(0 < d.text_len <= room, 'data.text_len', d.text_len,
         f'must be in [1, {room}]: model.llm.max_seq_len={config.model.llm.max_seq_len} minus '
         f'{vision_tokens(config.model)} image tokens')
  _check(0 <= d.cda.edit_fraction < 1, 'data.cda.edit_fraction', d.cda.edit_fraction,
         'must be in [0, 1)')
  _check(d.cda.counterfactual in ('pixel', 'rerender'), 'data.cda.counterfactual',
         d.cda.counterfactual, "must be 'pixel' or 'rerender'")
  syn = d.synthetic
  _check(syn.object_scale > 0, 'data.synthetic.object_scale', syn.object_scale, 'must be > 0')
  _check(0 <= syn.max_objects <= 32, 'data.synthetic.max_objects', syn.max_objects,
         'must be in [0, 32]')
  _check(0 <= syn.scene_mix < 1, 'data.synthetic.scene_mix', syn.scene_mix, 'must be in [0, 1)')
  _check(1 <= syn.local_questions <= 8, 'data.synthetic.local_questions', syn.local_questions,
         'must be in [1, 8]')
  _check(0 <= d.object_centred_prob <= 1, 'data.object_centred_prob', d.object_centred_prob,
         'must be in [0, 1]')
  _check(set(d.task_repeats) == set(TASKS), 'data.task_repeats', sorted(d.task_repeats),
         f'must name each task once: {list(TASKS)}')
  for task, n in d.task_repeats.items():
    _check(isinstance(n, int) and n >= 0, f'data.task_repeats.{task}', n, 'must be an int >= 0')
  _check(any(d.task_repeats.values()), 'data.task_repeats', dict(d.task_repeats),
         'leaves every task out')
  lo, hi = d.local_scale
  _check(0 < lo <= hi <= 1, 'data.local_scale', tuple(d.local_scale), 'must be 0 < lo <= hi <= 1')
  for name, source in d.sources.items():
    for field in ('data_dir', 'split', 'weight'):
      _check(field in source, f'data.sources.{name}.{field}', None, 'missing')
    _check(source.weight >= 0, f'data.sources.{name}.weight', source.weight, 'must be >= 0')
    generate = source.get('generate', '')
    _check(generate in ('', 'synthetic'), f'data.sources.{name}.generate', generate,
           "must be '' or 'synthetic'")
