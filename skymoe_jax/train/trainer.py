"""The training loop: data, sharded state, checkpoints, metrics, preemption, NaN guard.

  train(config, workdir) -> summary dict

A workdir holds one stage of one run:
  config.json          the resolved config (stage II reads its stage-I workdir's)
  tokenizer.model      the run's tokenizer (trained on the data when config.data.tokenizer='')
  checkpoints/<step>/  orbax: the train state and the input pipeline's position
  metrics.jsonl        one JSON object per logged step; TensorBoard events next to it

Re-running on the same workdir resumes from the latest checkpoint; a larger total_steps
continues training (the cosine schedule then stretches to the new total, so the learning rate
jumps up at the resume point); a fresh stage-II workdir starts from its stage-I workdir's last checkpoint,
upcycled (stages.py). SIGTERM saves a checkpoint and returns; a non-finite loss or gradient
leaves the parameters untouched (the update is skipped inside the step), saves the last good
state and raises NonFiniteError naming the step.
"""
import json
import os
import pathlib
import shutil
import signal
import time
from typing import Dict, Optional

from absl import logging
from clu import metric_writers
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from skymoe_jax import config_defaults
from skymoe_jax.data import pipeline, records, synthetic, tokenizer as tokenizer_lib
from skymoe_jax.evaluation import runner
from skymoe_jax.model import factory
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.parallel import multihost, sharded_state
from skymoe_jax.train import checkpoint as checkpoint_lib
from skymoe_jax.train import optimizer as optimizer_lib
from skymoe_jax.train import stages
from skymoe_jax import summary as summary_lib

CONFIG_FILE = 'config.json'
TOKENIZER = 'tokenizer'     # workdir/tokenizer.model
METRICS_FILE = 'metrics.jsonl'

# Peak dense bf16 FLOP/s per device by jax device_kind prefix (vendor data sheets), for MFU.
PEAK_FLOPS = {'TPU v4': 275e12, 'TPU v5 lite': 197e12, 'TPU v5e': 197e12, 'TPU v5p': 459e12,
              'TPU v5': 459e12, 'TPU v6 lite': 918e12, 'TPU v6e': 918e12,
              'NVIDIA H100': 989e12, 'NVIDIA H200': 989e12, 'NVIDIA A100': 312e12}


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN/Inf; the message names the step."""


def quiet_library_logs():
  """INFO logs of this project only: orbax and the data libraries log every file they touch."""
  logging.set_verbosity(logging.INFO)
  noisy = ('/orbax/', '/clu/', '/jax/_src/', '/tensorflow/')
  keep = lambda r: r.levelno >= logging.WARNING or not any(n in r.pathname for n in noisy)
  # ABSLHandler hands records to its python_handler without filtering them itself.
  logging.get_absl_handler().python_handler.addFilter(keep)


# -- data ---------------------------------------------------------------------------------------

def synthetic_dir(config) -> pathlib.Path:
  s = config.data.synthetic
  return (pathlib.Path(os.path.expanduser(s.cache_dir)) /
          f'synthetic-n{s.num_images}-s{s.seed}-i{s.image_size}-v{s.val_fraction}')


def _sync(name: str) -> None:
  """All processes wait here (no-op in one process): files process 0 wrote are then ready."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def resolve_sources(config) -> None:
  """Fills in data_dir of generated sources (making the data if missing); checks the rest."""
  for name, source in config.data.sources.items():
    if source.get('generate', '') == 'synthetic':
      s = config.data.synthetic
      path = synthetic_dir(config)
      if jax.process_index() == 0:
        synthetic.ensure(path, s.num_images, s.seed, s.image_size, s.val_fraction)
      _sync('synthetic data')
      source.data_dir = str(path)
    records.read_info(source.data_dir)  # fails early, naming the folder, if there is no data
    logging.info('data source %s: %s split %s weight %s', name, source.data_dir, source.split,
                 source.weight)


def load_tokenizer(config, workdir: pathlib.Path) -> tokenizer_lib.Tokenizer:
  """The run's tokenizer, copied into the workdir so later stages and evaluation use the same."""
  local = workdir / f'{TOKENIZER}.model'
  if local.exists() or jax.process_index() != 0:
    _sync('tokenizer')  # process 0 makes it; the others wait, then read the same file
    return tokenizer_lib.Tokenizer(local)
  d = config.data
  if d.tokenizer:
    shutil.copyfile(os.path.expanduser(d.tokenizer), local)
  elif config.train.init_from:
    shutil.copyfile(init_workdir(config, workdir) / f'{TOKENIZER}.model', local)
  else:
    vocab = d.tokenizer_vocab_size or config.model.llm.vocab_size
    dirs = [s.data_dir for s in d.sources.values()]
    tokenizer_lib.ensure(workdir / TOKENIZER, dirs, vocab)
  _sync('tokenizer')
  return tokenizer_lib.Tokenizer(local)


def init_workdir(config, workdir: pathlib.Path) -> pathlib.Path:
  """config.train.init_from: absolute, or relative to the workdir's parent (a sibling stage)."""
  path = pathlib.Path(os.path.expanduser(config.train.init_from))
  return path if path.is_absolute() else workdir.parent / path


# -- state --------------------------------------------------------------------------------------

def initial_state(config, model, tx, mesh, workdir: pathlib.Path):
  """A fresh state, or for stage II the upcycled stage-I parameters with a fresh optimizer."""
  rng = jax.random.key(config.seed)
  state = sharded_state.create_train_state(config, model, tx, mesh, rng)
  if not config.train.init_from:
    return state
  source = init_workdir(config, workdir)
  stage1 = ml_collections.ConfigDict(json.loads((source / CONFIG_FILE).read_text()))
  stage1_model = factory.create_model(stage1)
  abstract1, shardings1 = sharded_state.state_shardings(stage1, stage1_model,
                                                        optimizer_lib.for_run(stage1), mesh)
  with checkpoint_lib.Checkpointer(source / 'checkpoints') as ckpt:
    step = ckpt.latest_step()
    if step is None:
      raise FileNotFoundError(f'config.train.init_from={config.train.init_from!r}: no checkpoint '
                              f'in {source / "checkpoints"}')
    state1, _ = ckpt.restore(step, checkpoint_lib.abstract_like(abstract1, shardings1))
  logging.info('stage II: upcycling %s step %d', source, step)
  _, shardings = sharded_state.state_shardings(config, model, tx, mesh)
  with mesh_lib.activate(mesh, config):
    params = jax.jit(lambda p1, p2: stages.upcycle(p1, stage1.model, p2, config.model),
                     out_shardings=shardings['params'])(state1['params'], state['params'])
    opt_state = jax.jit(tx.init, out_shardings=shardings['opt_state'])(params)
  return {'step': state['step'], 'params': params, 'opt_state': opt_state}


# -- metrics ------------------------------------------------------------------------------------

def peak_flops_per_device() -> float:
  """Peak FLOP/s of one device: the data-sheet table, or on CPU a measured fp32 matmul rate."""
  kind = jax.devices()[0].device_kind
  for prefix, flops in PEAK_FLOPS.items():
    if kind.startswith(prefix):
      return flops
  n = 1024
  a = jnp.ones((n, n), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  start, reps = time.perf_counter(), 10
  for _ in range(reps):
    a = matmul(a)
  a.block_until_ready()
  return 2 * n ** 3 * reps / (time.perf_counter() - start) / jax.local_device_count()


def flops_per_step(config) -> float:
  """Model FLOPs of one training step at the config's batch and sequence (summary.model_flops:
  6 x active parameters x tokens + attention, vision tower included)."""
  seq = config_defaults.vision_tokens(config.model) + config.data.text_len
  return float(summary_lib.model_flops(config, config.data.batch_size, seq)['model_flops'])


class MetricsLog:
  """metrics.jsonl (one object per logged step) + clu writers (TensorBoard) + a progress line."""

  def __init__(self, workdir: pathlib.Path, total_steps: int):
    self.primary = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(str(workdir), just_logging=not self.primary)
    self.path = workdir / METRICS_FILE
    self.total_steps = total_steps

  def write(self, step: int, scalars: Dict, expert_load: Optional[np.ndarray]):
    record = {'step': step, **{k: float(v) for k, v in scalars.items()}}
    if expert_load is not None:
      record['expert_load'] = np.asarray(expert_load).round(5).tolist()
    if self.primary:
      with open(self.path, 'a') as f:
        f.write(json.dumps(record) + '\n')
    self.writer.write_scalars(step, scalars)
    self.writer.flush()
    rate = scalars.get('steps_per_s', 0.0)
    eta = (self.total_steps - step) / rate if rate else float('nan')
    logging.info('step %d/%d loss %.4f ce %.4f  %.2f steps/s  ETA %.0f s', step,
                 self.total_steps, scalars['loss'], scalars['ce_loss'], rate, eta)

  def close(self):
    self.writer.close()


# -- the loop -----------------------------------------------------------------------------------

def _save_config(config, workdir: pathlib.Path):
  if jax.process_index() == 0:
    (workdir / CONFIG_FILE).write_text(config.to_json_best_effort(indent=1) + '\n')


def train(config, workdir) -> Dict:
  """Trains config.train.total_steps steps in workdir; returns a summary of the run."""
  config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
  config_defaults.validate(config)
  workdir = pathlib.Path(workdir).expanduser().resolve()
  workdir.mkdir(parents=True, exist_ok=True)
  multihost.initialize(config)
  resolve_sources(config)
  _save_config(config, workdir)
  tokenizer = load_tokenizer(config, workdir)

  mesh = mesh_lib.create_mesh(config)
  model = factory.create_model(config)
  tx = optimizer_lib.for_run(config)
  abstract, shardings = sharded_state.state_shardings(config, model, tx, mesh)
  step_fn = sharded_state.make_train_step(config, model, tx, mesh)
  builder = pipeline.BatchBuilder(config, tokenizer, jax.process_index(), jax.process_count(),
                                  palette=synthetic.COLORS)
  t = config.train
  ckpt = checkpoint_lib.Checkpointer(workdir / 'checkpoints', t.checkpoint_every,
                                     t.keep_checkpoints)
  start = ckpt.latest_step()
  # Skip counts cover the whole run: they travel in the checkpoint with the data position.
  counters = np.zeros(len(pipeline.COUNTERS), np.int64)
  if start is not None:
    state, saved = ckpt.restore(start, checkpoint_lib.abstract_like(abstract, shardings))
    data = pipeline.DataIterator.restore(builder, saved)
    counters += np.asarray(saved.get('counters', counters), np.int64)
    logging.info('resumed from %s step %d', ckpt.directory, start)
  else:
    state = initial_state(config, model, tx, mesh, workdir)
    data = pipeline.DataIterator(builder, 0)
    start = 0

  def data_state(next_step=None):
    s = data.state()
    if next_step is not None:
      s['next_step'] = next_step
    return dict(s, counters=counters.tolist())

  step, last_log, last_time, last_tokens, tokens = start, start, time.perf_counter(), 0, 0
  preempted = []
  previous = signal.signal(signal.SIGTERM, lambda *_: preempted.append(True))
  log = None
  try:
    log = MetricsLog(workdir, t.total_steps)
    flops = flops_per_step(config)
    peak = peak_flops_per_device() * jax.device_count()
    while step < t.total_steps and not preempted:
      batch = next(data)
      counters += batch.pop('counters')
      tokens += int(batch['token_mask'].sum()) + batch['images'].shape[0] * (
          config_defaults.vision_tokens(config.model))
      if jax.process_count() > 1:
        batch = multihost.make_global_batch(batch, mesh, config)
      state, metrics = step_fn(state, batch)
      step += 1
      if not bool(metrics['finite']):
        ckpt.save(step - 1, state, data_state(next_step=step - 1), force=True)
        ckpt.wait()
        raise NonFiniteError(
            f'step {step}: loss {float(metrics["loss"])} / gradient norm '
            f'{float(metrics["grad_norm"])} is not finite; the parameters of step {step - 1} '
            f'are saved in {ckpt.directory}')
      if step % t.log_every == 0 or step == t.total_steps:
        now = time.perf_counter()
        rate = (step - last_log) / (now - last_time)
        scalars = {k: v for k, v in jax.device_get(metrics).items()
                   if np.ndim(v) == 0 and k != 'finite'}
        scalars.update(steps_per_s=rate, tokens_per_s=(tokens - last_tokens) / (now - last_time),
                       mfu=flops * rate / peak,
                       **{f'skipped/{name}': int(c) for name, c in zip(pipeline.COUNTERS,
                                                                         counters)})
        log.write(step, scalars, jax.device_get(metrics.get('expert_load')))
        last_log, last_time, last_tokens = step, now, tokens
      ckpt.save(step, state, data_state())
      if t.eval_every and step % t.eval_every == 0:
        runner.evaluate(config, workdir, step, params=state['params'])
    ckpt.save(step, state, data_state(), force=True)  # the last step, or a preemption
    ckpt.wait()
  finally:
    signal.signal(signal.SIGTERM, previous)
    if log is not None:
      log.close()
    ckpt.close()
  if preempted:
    logging.warning('SIGTERM: saved step %d in %s and stopped', step, workdir / 'checkpoints')
  return {'workdir': str(workdir), 'step': step, 'preempted': bool(preempted),
          'skipped': {n: int(c) for n, c in zip(pipeline.COUNTERS, counters)}}
