"""The full config tree with its defaults, and the checks every config passes before use.

Config files in configs/ start from `base_config()` and change what they need; the command line
overrides any field (`--config.model.moe.num_experts=4`). Defaults are the paper's 7B model
(SPEC.md): CLIP ViT-L/14 at 504 px, Vicuna-7B, 8 experts top-2 in layers 0, 2, ..., 30.
"""
import importlib.util
import math
import re
import pathlib

import jax.numpy as jnp
import ml_collections

from skymoe_jax.data.tasks import GRANULARITIES, TASKS
from skymoe_jax.model import layers as model_layers
from skymoe_jax.model.vit import num_feature_layers
from skymoe_jax.moe import backends
from skymoe_jax.parallel import expert_parallel, mesh
from skymoe_jax.train import optimizer as optimizer_lib



class ConfigError(ValueError):
  """A config field has a bad value; the message names the field."""


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = m = ml_collections.ConfigDict()
  m.dtype = 'bfloat16'        # compute dtype
  m.param_dtype = 'float32'   # storage dtype of the parameters
  m.scan_layers = True        # scan repeated layers: compile time independent of depth
  m.remat_policy = 'none'     # see model.layers.REMAT_POLICIES

  m.vision = ml_collections.ConfigDict(dict(
      image_size=504, patch_size=14, width=1024, depth=24, num_heads=16, mlp_dim=4096,
      feature_layer=-2,  # HF hidden_states index: -2 = output of the penultimate block
      norm_eps=1e-5))

  m.llm = ml_collections.ConfigDict(dict(
      vocab_size=32000, embed_dim=4096, num_layers=32, num_heads=32, num_kv_heads=32,
      head_dim=128, mlp_dim=11008, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False,
      max_seq_len=2048))

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
      ragged_impl='auto',       # ragged_dot | blocks | batched | auto (blocks on CPU)
      ragged_block_size=128,
      adaptive=True,            # task + granularity bias on the router logits
      num_tasks=len(TASKS),
      num_granularities=len(GRANULARITIES),
      condition_dim=64,
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
      template='llava_v1',
      pad_to_square=True,         # LLaVA's pad before resizing (boxes.parse undoes it)
      local_views=False,          # a local crop per row (local_images) for the contrastive loss
      object_centred_prob=0.7,    # local crop around an object when the record has boxes
      local_scale=(0.25, 0.5),    # random local crop side, fraction of the short side
      cda=ml_collections.ConfigDict(dict(
          enabled=False, edit_fraction=0.25,   # rows of each batch that are edited copies
          cutout_weight=1.0, recolour_weight=1.0, move_weight=1.0)),
      synthetic=ml_collections.ConfigDict(dict(
          num_images=2000, seed=0, image_size=128, val_fraction=0.1,
          cache_dir='~/.cache/skymoe_jax')),
      num_parallel_batches=2,     # batches built concurrently by tf.data
      prefetch_batches=2))

  c.optimizer = optimizer_lib.optimizer_defaults()

  # Training (train/): steps, logging, checkpoints, the contrastive term of the loss.
  c.train = ml_collections.ConfigDict(dict(
      stage='',                    # a label for logs: 'I' (dense + LoRA) or 'II' (MoE)
      init_from='',                # stage II: a stage-I workdir whose last checkpoint is upcycled
      total_steps=1000,
      log_every=10,
      checkpoint_every=200,
      keep_checkpoints=3,
      eval_every=0,                # evaluate every N steps (evaluation/runner.py); 0 = never
      contrastive_weight=0.0,      # local/global InfoNCE (needs data.local_views)
      contrastive_temperature=0.07))

  # Evaluation (evaluation/runner.py): the eval split of every data source.
  c.eval = ml_collections.ConfigDict(dict(
      split='validation',
      batch_size=8,
      max_new_tokens=256,
      max_samples=0,               # per source; 0 = all
      temperature=0.0,             # 0 = greedy
      top_p=1.0))

  # Device mesh: axis sizes (-1 = the rest of the devices) and the logical-axis rule table.
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.mesh.rules = mesh.DEFAULT_RULES

  # Multi-process start-up (parallel/multihost.py); unset fields fall back to the environment
  # (SKYMOE_COORDINATOR, SKYMOE_NUM_PROCESSES, SKYMOE_PROCESS_ID); none at all = one process.
  placeholder = ml_collections.config_dict.placeholder
  c.distributed = ml_collections.ConfigDict(dict(
      coordinator_address=placeholder(str), num_processes=placeholder(int),
      process_id=placeholder(int), auto=False, cpu_collectives='gloo',
      initialization_timeout=placeholder(int)))
  return c


STAGES = ('stage1', 'stage2')


def apply_stage(c: ml_collections.ConfigDict, stage: str, lora_rank: int,
                stage2_learning_rate: float) -> ml_collections.ConfigDict:
  """Turns a config with its MoE settings into one of the paper's two stages (SPEC section 3).

  stage1: the dense model (no MoE layers), LoRA of `lora_rank` on W_q/W_v, LoRA + projector
  trained. stage2: the configured MoE, LoRA merged away (rank 0), experts + routers trained,
  initialised from the sibling workdir 'stage1' (train.init_from).
  """
  if stage not in STAGES:
    raise ConfigError(f'config argument {stage!r}: expected one of {STAGES}')
  if stage == 'stage1':
    c.model.moe.num_experts = 0
    c.model.lora.rank = lora_rank
    c.optimizer.trainable = optimizer_lib.STAGE_I_TRAINABLE
    c.train.stage = 'I'
  else:
    c.model.lora.rank = 0
    c.optimizer.trainable = optimizer_lib.STAGE_II_TRAINABLE
    c.optimizer.learning_rate = stage2_learning_rate
    c.train.stage = 'II'
    c.train.init_from = 'stage1'
  return c


def load_config_file(path, arg=None) -> ml_collections.ConfigDict:
  """get_config(arg) of a config file (e.g. configs/tiny.py), loaded as --config= loads it."""
  path = pathlib.Path(path)
  spec = importlib.util.spec_from_file_location(f'skymoe_config_{path.stem}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


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
  _check(m.remat_policy in model_layers.REMAT_POLICIES, 'model.remat_policy', m.remat_policy,
         f'must be one of {sorted(model_layers.REMAT_POLICIES)}')

  v = m.vision
  _check(v.patch_size > 0 and v.image_size % v.patch_size == 0, 'model.vision.image_size',
         v.image_size, f'must be a multiple of model.vision.patch_size={v.patch_size}')
  _check(v.width % v.num_heads == 0, 'model.vision.num_heads', v.num_heads,
         f'must divide model.vision.width={v.width}')
  try:
    num_feature_layers(v.depth, v.feature_layer)
  except ValueError as e:
    raise ConfigError(str(e)) from None

  llm = m.llm
  _check(llm.num_kv_heads > 0 and llm.num_heads % llm.num_kv_heads == 0,
         'model.llm.num_kv_heads', llm.num_kv_heads,
         f'must divide model.llm.num_heads={llm.num_heads}')
  _check(llm.head_dim % 2 == 0, 'model.llm.head_dim', llm.head_dim, 'RoPE needs an even size')
  _check(llm.max_seq_len > vision_tokens(m), 'model.llm.max_seq_len', llm.max_seq_len,
         f'must hold the {vision_tokens(m)} image tokens and some text')

  lora = m.lora
  _check(lora.rank >= 0, 'model.lora.rank', lora.rank, 'must be >= 0')
  bad = set(lora.targets) - {'query', 'key', 'value'}
  _check(not bad, 'model.lora.targets', tuple(lora.targets),
         f'{sorted(bad)} not among query, key, value')

  moe = m.moe
  if moe.num_experts > 0:
    _check(1 <= moe.top_k <= moe.num_experts, 'model.moe.top_k', moe.top_k,
           f'must be in [1, model.moe.num_experts={moe.num_experts}]')
    layers = tuple(moe.layers)
    _check(all(0 <= i < llm.num_layers for i in layers) and len(set(layers)) == len(layers),
           'model.moe.layers', layers,
           f'must be distinct layer indices below model.llm.num_layers={llm.num_layers}')
    _check(moe.backend in backends.BACKENDS, 'model.moe.backend', moe.backend,
           f'must be one of {backends.BACKENDS}')
    _check(moe.ragged_impl in backends.RAGGED_IMPLS, 'model.moe.ragged_impl', moe.ragged_impl,
           f'must be one of {backends.RAGGED_IMPLS}')
    _check(moe.ep_strategy in expert_parallel.EP_STRATEGIES, 'model.moe.ep_strategy',
           moe.ep_strategy, f'must be one of {expert_parallel.EP_STRATEGIES}')
    _check(moe.ep_strategy != 'all_to_all' or moe.backend == 'capacity', 'model.moe.backend',
           moe.backend, 'ep_strategy=all_to_all exchanges capacity buffers: use backend=capacity')
    _check(moe.capacity_factor > 0, 'model.moe.capacity_factor', moe.capacity_factor,
           'must be > 0')
    _check(moe.ragged_block_size > 0, 'model.moe.ragged_block_size', moe.ragged_block_size,
           'must be > 0')
    _check(moe.num_tasks >= 1 and moe.num_granularities >= 1, 'model.moe.num_tasks',
           (moe.num_tasks, moe.num_granularities), 'tasks and granularities must be >= 1')
  _validate_data(config)
  _validate_train(config)
  _validate_eval(config)


def _validate_train(config) -> None:
  t = config.train
  _check(t.total_steps > 0, 'train.total_steps', t.total_steps, 'must be > 0')
  o = config.optimizer
  _check(o.learning_rate > 0, 'optimizer.learning_rate', o.learning_rate, 'must be > 0')
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


def _validate_eval(config) -> None:
  e = config.eval
  _check(e.batch_size > 0, 'eval.batch_size', e.batch_size, 'must be > 0')
  _check(e.max_new_tokens > 0, 'eval.max_new_tokens', e.max_new_tokens, 'must be > 0')
  _check(e.temperature >= 0, 'eval.temperature', e.temperature, 'must be >= 0')
  _check(0 < e.top_p <= 1, 'eval.top_p', e.top_p, 'must be in (0, 1]')


def _validate_data(config) -> None:
  d = config.data
  _check(d.batch_size > 0, 'data.batch_size', d.batch_size, 'must be > 0')
  room = config.model.llm.max_seq_len - vision_tokens(config.model)
  _check(0 < d.text_len <= room, 'data.text_len', d.text_len,
         f'must be in [1, {room}]: model.llm.max_seq_len={config.model.llm.max_seq_len} minus '
         f'{vision_tokens(config.model)} image tokens')
  _check(0 <= d.cda.edit_fraction < 1, 'data.cda.edit_fraction', d.cda.edit_fraction,
         'must be in [0, 1)')
  _check(0 <= d.object_centred_prob <= 1, 'data.object_centred_prob', d.object_centred_prob,
         'must be in [0, 1]')
  lo, hi = d.local_scale
  _check(0 < lo <= hi <= 1, 'data.local_scale', tuple(d.local_scale), 'must be 0 < lo <= hi <= 1')
  for name, source in d.sources.items():
    for field in ('data_dir', 'split', 'weight'):
      _check(field in source, f'data.sources.{name}.{field}', None, 'missing')
    _check(source.weight >= 0, f'data.sources.{name}.weight', source.weight, 'must be >= 0')
    generate = source.get('generate', '')
    _check(generate in ('', 'synthetic'), f'data.sources.{name}.generate', generate,
           "must be '' or 'synthetic'")


def validate_for_mesh(config, mesh_shape: dict) -> None:
  """Checks that need the mesh's axis sizes ({'data': 2, 'expert': 4, ...})."""
  moe = config.model.moe
  expert_axes = dict(mesh.logical_rules(config)).get('exp') or ()
  expert_axes = expert_axes if isinstance(expert_axes, tuple) else (expert_axes,)
  ways = math.prod(mesh_shape[a] for a in expert_axes)
  if moe.num_experts > 0:
    _check(moe.num_experts % ways == 0, 'model.moe.num_experts', moe.num_experts,
           f'must be a multiple of the {ways} devices of mesh axes {expert_axes}')
