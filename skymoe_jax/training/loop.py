"""The training loop: data, sharded state, checkpoints, metrics, preemption, NaN guard.

  train(config, workdir, evaluate=None) -> summary dict

The workdir's layout is workdir.py's. Re-running on the same workdir resumes from the newest
checkpoint that verifies (newer damaged ones are named in a warning and set aside as
<step>.damaged); a larger total_steps continues training (the cosine schedule then stretches to
the new total, so the learning rate jumps up at the resume point); a fresh stage-II workdir
starts from its stage-I workdir's last checkpoint, upcycled (stages.py).

A resume may change only workdir.RESUMABLE_FIELDS of the saved config (each change logged and
kept in config_history.jsonl); anything else is refused before anything is built or written.
metrics.jsonl rows past the restored step (logged by a run killed after its last checkpoint)
are dropped, so every step is logged once. One trainer per workdir: a second one is refused
(workdir.TrainerLock).

SIGTERM or Ctrl-C (SIGINT) saves a checkpoint and returns (a second Ctrl-C stops at once); the
caller's handlers are put back afterwards. A non-finite loss, gradient or updated state leaves
the state untouched (the update is skipped inside the step), saves that last good state and
raises NonFiniteError naming the step. Evaluation during training (train.eval_every) runs the
`evaluate` function the caller passes (the train command passes evaluation.runner.evaluate):
training itself knows no evaluator.
"""
import copy
import json
import signal
import time
from typing import Callable, Dict, Optional

from absl import logging
from clu import metric_writers
import jax
import ml_collections
import numpy as np

from skymoe_jax import config as config_lib
from skymoe_jax import storage
from skymoe_jax import workdir as workdir_lib
from skymoe_jax.data import pipeline, sources, synthetic
from skymoe_jax.model import factory, flops
from skymoe_jax.parallel import hardware
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.parallel import multihost
from skymoe_jax.training import optimizer as optimizer_lib
from skymoe_jax.training import stages
from skymoe_jax.training import state as state_lib
from skymoe_jax.training import step as step_lib


class NonFiniteError(FloatingPointError):
  """The loss, a gradient or the updated state became NaN/Inf; the message names the step."""


# -- state --------------------------------------------------------------------------------------

def initial_state(config, model, tx, mesh, workdir):
  """A fresh state, or for stage II the upcycled stage-I parameters with a fresh optimizer."""
  rng = jax.random.key(config.seed)
  state = state_lib.create_train_state(config, model, tx, mesh, rng)
  if not config.train.init_from:
    return state
  source = workdir_lib.init_workdir(config, workdir)
  stage1 = workdir_lib.read_config(source)
  try:
    step, params1 = workdir_lib.restore_params(stage1, source, mesh=mesh)
  except FileNotFoundError:
    raise FileNotFoundError(f'config.train.init_from={config.train.init_from!r}: no checkpoint '
                            f'in {workdir_lib.checkpoint_dir(source)}') from None
  logging.info('stage II: upcycling %s step %d', source, step)
  _, shardings = state_lib.state_shardings(config, model, tx, mesh)
  with mesh_lib.activate(mesh, config):
    params = jax.jit(lambda p1, p2: stages.upcycle(p1, stage1.model, p2, config.model),
                     out_shardings=shardings['params'])(params1, state['params'])
  return state_lib.replace_params(state, params, tx, mesh, config, shardings)


# -- metrics ------------------------------------------------------------------------------------

def flops_per_step(config) -> float:
  """Model FLOPs of one training step at the config's batch and sequence (model/flops.py:
  6 x active parameters x tokens + attention, vision tower included)."""
  seq = config_lib.vision_tokens(config.model) + config.data.text_len
  return float(flops.model_flops(config, config.data.batch_size, seq)['model_flops'])


class MetricsLog:
  """metrics.jsonl (one object per logged step) + clu writers (TensorBoard) + a progress line."""

  def __init__(self, workdir, total_steps: int, tensorboard: bool = True):
    self.primary = jax.process_index() == 0
    self.writer = metric_writers.create_default_writer(
        str(workdir), just_logging=not (self.primary and tensorboard))
    self.path = workdir / workdir_lib.METRICS_FILE
    self.total_steps = total_steps

  def write(self, step: int, scalars: Dict, expert_load: Optional[np.ndarray]):
    record = {'step': step, **{k: float(v) for k, v in scalars.items()}}
    if expert_load is not None:
      record['expert_load'] = np.asarray(expert_load).round(5).tolist()
    if self.primary:
      storage.append_text(self.path, json.dumps(record) + '\n')
    self.writer.write_scalars(step, scalars)
    self.writer.flush()
    rate = scalars.get('steps_per_s', 0.0)
    eta = (self.total_steps - step) / rate if rate else float('nan')
    logging.info('step %d/%d loss %.4f ce %.4f  %.2f steps/s  ETA %.0f s', step,
                 self.total_steps, scalars['loss'], scalars['ce_loss'], rate, eta)

  def close(self):
    self.writer.close()


# -- the loop -----------------------------------------------------------------------------------

def train(config, workdir, evaluate: Optional[Callable] = None) -> Dict:
  """Trains config.train.total_steps steps in workdir; returns a summary of the run.

  evaluate(config, workdir, step, params=...): called every train.eval_every steps (needed when
  that is set).
  """
  config = ml_collections.ConfigDict(config.to_dict())  # a private, unlocked copy
  factory.validate(config)
  if config.train.eval_every and evaluate is None:
    raise config_lib.ConfigError(f'config.train.eval_every={config.train.eval_every}: this caller '
                                 'gave train() no evaluate function')
  workdir = workdir_lib.resolve(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  multihost.initialize(config)
  with workdir_lib.TrainerLock(workdir):
    workdir_lib.check_resume(config, workdir)  # nothing is built or written before this
    return _train(config, workdir, evaluate)


def _train(config, workdir, evaluate) -> Dict:
  sources.resolve_sources(config)
  tokenizer = workdir_lib.prepare_tokenizer(config, workdir)

  mesh = mesh_lib.create_mesh(config, batch_size=config.data.batch_size)
  # remat_policy 'auto' is chosen for this mesh; the workdir's config keeps what was asked for.
  model_config = copy.deepcopy(config)
  model_config.model.remat_policy = mesh_lib.remat_policy(config, mesh.shape)
  model = factory.create_model(model_config)
  tx = optimizer_lib.for_run(config)
  abstract, shardings = state_lib.state_shardings(config, model, tx, mesh)
  step_fn = step_lib.make_train_step(config, model, tx, mesh)
  builder = pipeline.BatchBuilder(config, tokenizer, jax.process_index(), jax.process_count(),
                                  palette=synthetic.COLORS)
  t = config.train
  ckpt = workdir_lib.Checkpointer(workdir_lib.checkpoint_dir(workdir), t.checkpoint_every,
                                  t.keep_checkpoints, use_ocdbt=t.checkpoint_ocdbt)
  log = None
  preempted = []

  def on_signal(signum, frame):
    if signum == signal.SIGINT and preempted:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the save
    preempted.append(signal.Signals(signum).name)

  previous = {}
  try:
    # Skip counts cover the whole run: they travel in the checkpoint with the data position.
    counters = np.zeros(len(pipeline.COUNTERS), np.int64)
    if ckpt.latest_step() is not None:
      start, state, saved = ckpt.restore_latest(workdir_lib.abstract_like(abstract, shardings),
                                                set_aside=True)
      data = pipeline.DataIterator.restore(builder, saved)
      counters += np.asarray(saved.get('counters', counters), np.int64)
      logging.info('resumed from %s step %d', ckpt.directory, start)
    else:
      state = initial_state(config, model, tx, mesh, workdir)
      data = pipeline.DataIterator(builder, 0)
      start = 0
    workdir_lib.commit_config(config, workdir, start)
    workdir_lib.truncate_metrics(workdir, start)

    def data_state(next_step=None):
      s = data.state()
      if next_step is not None:
        s['next_step'] = next_step
      return dict(s, counters=counters.tolist())

    step, last_log, last_time, last_tokens, tokens = start, start, time.perf_counter(), 0, 0
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    log = MetricsLog(workdir, t.total_steps, t.tensorboard)
    flops = flops_per_step(config)
    peak = hardware.peak_flops_per_device() * jax.device_count()
    while step < t.total_steps and not preempted:
      batch = next(data)
      counters += batch.pop('counters')
      tokens += int(batch['token_mask'].sum()) + batch['images'].shape[0] * (
          config_lib.vision_tokens(config.model))
      if jax.process_count() > 1:
        batch = multihost.make_global_batch(batch, mesh, config)
      state, metrics = step_fn(state, batch)
      step += 1
      if not bool(metrics['finite']):
        # The step kept its input state, finite like every state before it: save that one.
        ckpt.save(step - 1, state, data_state(next_step=step - 1), force=True)
        ckpt.wait()
        raise NonFiniteError(f'step {step}: {_what_was_not_finite(metrics, config)}; the state '
                             f'of step {step - 1} is saved in {ckpt.directory}')
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
        evaluate(config, workdir, step, params=state['params'])
    ckpt.save(step, state, data_state(), force=True)  # the last step, or a preemption
    ckpt.wait()
  finally:
    for signum, handler in previous.items():
      if handler is not None:  # None: a handler not installed from Python
        signal.signal(signum, handler)
    if log is not None:
      log.close()
    ckpt.close()
  if preempted:
    logging.warning('%s: saved step %d in %s and stopped', preempted[0], step,
                    workdir_lib.checkpoint_dir(workdir))
  return {'workdir': str(workdir), 'step': step, 'preempted': bool(preempted),
          'skipped': {n: int(c) for n, c in zip(pipeline.COUNTERS, counters)}}


def _what_was_not_finite(metrics, config) -> str:
  loss, norm = float(metrics['loss']), float(metrics['grad_norm'])
  if np.isfinite(loss) and np.isfinite(norm):
    o = config.optimizer
    return (f'the update (loss {loss}, gradient norm {norm}) left parameters or optimizer '
            f'moments that are not finite (optimizer.learning_rate={o.learning_rate}, '
            f'optimizer.weight_decay={o.weight_decay}: too large?); it was skipped')
  return f'loss {loss} / gradient norm {norm} is not finite'
