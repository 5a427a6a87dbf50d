"""Training loss: next-token cross-entropy on answer tokens, the MoE auxiliary losses, and the
optional local/global contrastive loss of context-disentangled augmentation (docs/design.md section 2).

  loss = CE + load_balance_weight * LB + z_loss_weight * Z + contrastive_weight * InfoNCE
         (+ condition_loss_weight * (CE_task + CE_granularity) with model.moe.condition=
            'predicted': the condition head against the sample's tags)
"""
import jax
import jax.numpy as jnp

from skymoe_jax.model import skymoe


def next_token_loss(logits, tokens, loss_mask):
  """Mean cross-entropy of logits[:, t] against tokens[:, t + 1] where loss_mask[:, t + 1].

  Returns (mean loss, number of target tokens). Logits are upcast to fp32.
  """
  logits = logits[:, :-1].astype(jnp.float32)
  targets = tokens[:, 1:]
  mask = loss_mask[:, 1:].astype(jnp.float32)
  logp = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
  count = jnp.sum(mask)
  return jnp.sum(nll * mask) / jnp.maximum(count, 1.0), count


def related_rows(pair_index):
  """[B, B] bool: rows i != j that show the same source image (an original and its edits)."""
  b = pair_index.shape[0]
  rows = jnp.arange(b)
  group = jnp.where(pair_index >= 0, pair_index, rows)  # an edit belongs to its original's row
  return (group[:, None] == group[None, :]) & (rows[:, None] != rows[None, :])


def contrastive_loss(global_features, local_features, temperature, pair_index=None):
  """Symmetric InfoNCE: the local crop of row i against the global view of row i, the other
  rows' views as negatives. Rows of the same source image (pair_index) are no negatives of each
  other: an edited copy is nearly the same picture. Features [B, D] are L2-normalised here."""
  g = global_features / jnp.linalg.norm(global_features, axis=-1, keepdims=True).clip(1e-6)
  l = local_features / jnp.linalg.norm(local_features, axis=-1, keepdims=True).clip(1e-6)
  logits = (l @ g.T).astype(jnp.float32) / temperature
  if pair_index is not None:
    logits = jnp.where(related_rows(pair_index), -jnp.inf, logits)
  labels = jnp.arange(logits.shape[0])

  def ce(x):
    return jnp.mean(-jax.nn.log_softmax(x, axis=-1)[labels, labels])

  return 0.5 * (ce(logits) + ce(logits.T))


def condition_loss(condition_logits, task_id, granularity_id):
  """(CE_task + CE_granularity, task accuracy, granularity accuracy) of the condition head's
  logits ({'task': [B, T], 'granularity': [B, G]}) against the tags [B], means over rows."""
  def ce(logits, labels):
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.mean(-jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0])

  def accuracy(logits, labels):
    return jnp.mean((jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32))

  task, gran = condition_logits['task'], condition_logits['granularity']
  return (ce(task, task_id) + ce(gran, granularity_id), accuracy(task, task_id),
          accuracy(gran, granularity_id))


def model_loss(params, model, batch, config):
  """Total loss and its terms for one batch (fields: data/pipeline.py)."""
  kwargs = {}
  if skymoe.predicts_condition(config.model):  # the head pools the prompt: before the answer
    kwargs['prompt_mask'] = skymoe.prompt_mask(batch['token_mask'], batch['loss_mask'])
  logits, aux = model.apply({'params': params}, batch['images'], batch['tokens'],
                            batch['token_mask'], batch['task_id'], batch['granularity_id'],
                            **kwargs)
  ce, num_targets = next_token_loss(logits, batch['tokens'], batch['loss_mask'])
  metrics = {'ce_loss': ce, 'num_targets': num_targets}
  loss = ce
  moe_cfg = config.model.moe
  if aux['moe'] is not None:
    moe = aux['moe']
    metrics['load_balance_loss'] = jnp.mean(moe['load_balance_loss'])
    metrics['router_z_loss'] = jnp.mean(moe['z_loss'])
    metrics['expert_load'] = moe['load']  # [moe layers, E]
    metrics['dropped_fraction'] = jnp.sum(moe['num_dropped']) / jnp.maximum(
        jnp.sum(moe['num_routed']), 1)
    loss = (loss + moe_cfg.load_balance_weight * metrics['load_balance_loss']
            + moe_cfg.z_loss_weight * metrics['router_z_loss'])
  if 'condition_logits' in aux:
    term, task_acc, gran_acc = condition_loss(aux['condition_logits'], batch['task_id'],
                                              batch['granularity_id'])
    metrics.update(condition_loss=term, condition_accuracy=task_acc,
                   condition_granularity_accuracy=gran_acc)
    loss = loss + config.train.get('condition_loss_weight', 1.0) * term
  weight = config.train.contrastive_weight
  if weight > 0:
    local = model.apply({'params': params}, batch['local_images'], method='encode_images')
    metrics['contrastive_loss'] = contrastive_loss(
        aux['image_features'], jnp.mean(local.astype(jnp.float32), axis=1),
        config.train.contrastive_temperature, batch.get('pair_index'))
    loss = loss + weight * metrics['contrastive_loss']
  metrics['loss'] = loss
  return loss, metrics
