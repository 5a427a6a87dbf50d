"""Training loss: next-token cross-entropy on answer tokens plus the MoE auxiliary losses."""
import jax
import jax.numpy as jnp


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


def model_loss(params, model, batch, moe_cfg):
  """Total loss and its terms for one batch (see data for the batch fields)."""
  logits, aux = model.apply({'params': params}, batch['images'], batch['tokens'],
                            batch['token_mask'], batch['task_id'], batch['granularity_id'])
  ce, num_targets = next_token_loss(logits, batch['tokens'], batch['loss_mask'])
  metrics = {'ce_loss': ce, 'num_targets': num_targets}
  loss = ce
  if aux['moe'] is not None:
    moe = aux['moe']
    metrics['load_balance_loss'] = jnp.mean(moe['load_balance_loss'])
    metrics['router_z_loss'] = jnp.mean(moe['z_loss'])
    metrics['expert_load'] = moe['load']  # [moe layers, E]
    metrics['dropped_fraction'] = jnp.sum(moe['num_dropped']) / jnp.maximum(
        jnp.sum(moe['num_routed']), 1)
    loss = (loss + moe_cfg.load_balance_weight * metrics['load_balance_loss']
            + moe_cfg.z_loss_weight * metrics['router_z_loss'])
  metrics['loss'] = loss
  return loss, metrics
