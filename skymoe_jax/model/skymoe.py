"""SkyMoE: vision tower -> projector -> MoE decoder, image tokens first, then text.

With model.moe.condition='predicted' a condition head predicts the adaptive router's task and
granularity from the prompt, so a question needs no tag: the mean token embedding of the
prompt's text tokens (before the first answer token) -> one linear layer -> task and
granularity logits, whose softmaxes route every MoE layer (MoeFFN's soft condition). The
prompt is what a question holds before its answer, so generation predicts the condition once
from its prompt and a full forward pass over prompt + answer predicts the same.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from skymoe_jax.model import layers
from skymoe_jax.model.decoder import Decoder
from skymoe_jax.model.projector import Projector
from skymoe_jax.model.vit import VisionTower


def positions_from_mask(mask):
  """Each real token's position among the real tokens of its row (padding repeats its left one)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def predicts_condition(model_cfg) -> bool:
  """Whether the model routes by its condition head's prediction (model.moe.condition)."""
  moe = model_cfg.moe
  return (moe.num_experts > 0 and moe.adaptive
          and moe.get('condition', 'tags') == 'predicted')


def prompt_mask(token_mask, loss_mask):
  """[B, T] bool: a row's real text tokens before its first answer (loss_mask) token."""
  before_answer = jnp.cumsum(loss_mask.astype(jnp.int32), axis=1) == 0
  return token_mask.astype(bool) & before_answer


def condition_distributions(condition_logits):
  """The head's logits -> (task probabilities [B, num_tasks], granularity [B, G]) in fp32."""
  return (jax.nn.softmax(condition_logits['task'], axis=-1),
          jax.nn.softmax(condition_logits['granularity'], axis=-1))


# The condition head's logits are this times x @ W + b, W and b starting at zero: Adam moves each
# weight by about the learning rate per step whatever the gradient's size, so the factor is what
# lets the head learn at stage II's small learning rate (3e-4) in tens of steps, not thousands.
CONDITION_LOGIT_SCALE = 8.0
# The epsilon of the pooled prompt embedding's unit-RMS scaling (predict_condition).
CONDITION_RMS_EPS = 1e-12


class ConditionHead(nn.Module):
  """Task + granularity logits from a pooled, unit-RMS prompt embedding; uniform at the start."""
  features: int
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = layers.param(self, 'kernel', nn.initializers.zeros, (x.shape[-1], self.features),
                          ('embed', 'condition_class'), self.param_dtype)
    bias = layers.param(self, 'bias', nn.initializers.zeros, (self.features,),
                        ('condition_class',), self.param_dtype)
    x = x.astype(jnp.float32)
    return CONDITION_LOGIT_SCALE * (x @ kernel.astype(jnp.float32) + bias.astype(jnp.float32))


class SkyMoE(nn.Module):
  config: ml_collections.FrozenConfigDict  # the `model` part of a config

  def setup(self):
    cfg, v = self.config, self.config.vision
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.vision = VisionTower(v.image_size, v.patch_size, v.width, v.depth, v.num_heads,
                              v.mlp_dim, v.feature_layer, v.norm_eps, cfg.scan_layers,
                              cfg.remat_policy, cfg.attention_impl,
                              posemb_init=v.get('posemb_init', 'normal'), **kw)
    self.projector = Projector(cfg.llm.embed_dim, v.get('token_posemb', 'none'), **kw)
    self.decoder = Decoder(cfg)
    if predicts_condition(cfg):
      m = cfg.moe
      self.condition_head = ConditionHead(m.num_tasks + m.num_granularities,
                                          param_dtype=jnp.dtype(cfg.param_dtype))

  def encode_images(self, images):
    """[B, H, W, 3] normalised pixels -> [B, Nv, D] image tokens in the LLM's embedding space."""
    return self.projector(self.vision(images))

  def embed_tokens(self, tokens):
    return self.decoder.embed(tokens)

  def predict_condition(self, tokens, mask):
    """{'task': [B, num_tasks], 'granularity': [B, G]} fp32 logits of the condition head from
    the mean embedding of the tokens where `mask` [B, T] (the prompt's text tokens), scaled to
    unit RMS."""
    embeds = self.embed_tokens(tokens).astype(jnp.float32)
    weights = mask.astype(jnp.float32)[..., None]
    pooled = jnp.sum(embeds * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    # Unit RMS: token embeddings are small (0.02 at init, about as small in a trained LLM), and
    # a linear head on features that small learns its weights only slowly at the learning rates
    # of stage II. An empty prompt pools to zero and stays zero (the bias alone decides).
    pooled = pooled * jax.lax.rsqrt(
        jnp.mean(pooled ** 2, axis=-1, keepdims=True) + CONDITION_RMS_EPS)
    logits = self.condition_head(pooled)
    n = self.config.moe.num_tasks
    return {'task': logits[:, :n], 'granularity': logits[:, n:]}

  def init_cache(self, batch: int, max_len: int):
    return self.decoder.init_cache(batch, max_len)

  def decode(self, embeddings, positions, token_mask, task_id, granularity_id, cache=None,
             index=0, slot_mask=None, condition=None):
    """The decoder on ready embeddings; see Decoder.__call__ (prefill and generation use this).
    A model that predicts its condition needs it here (`condition`, predict_condition's
    distributions): the embeddings alone do not say which tokens are the prompt."""
    if condition is None and predicts_condition(self.config):
      raise ValueError('model.moe.condition=predicted: decode needs the condition '
                       '(condition_distributions of predict_condition on the prompt)')
    return self.decoder(embeddings, positions, token_mask, task_id, granularity_id, cache, index,
                        slot_mask, condition)

  def __call__(self, images, tokens, token_mask, task_id, granularity_id, prompt_mask=None,
               condition=None):
    """Full forward pass for training.

    images: [B, H, W, 3]; tokens, token_mask: [B, T]; task_id, granularity_id: [B], the tags
    (the router statistics are keyed by them; they route unless something else does).
    prompt_mask [B, T]: the tokens the condition head pools (default: every real token, i.e.
    the tokens are a prompt); condition: an explicit routing condition (MoeFFN), which
    overrides both the tags and the head.
    Returns (logits [B, T, V] fp32 for the text positions, aux) where logits[:, t] predicts
    tokens[:, t + 1]; aux['image_features'] [B, D] are the mean-pooled image tokens, and with
    a predicted condition aux['condition_logits'] the head's logits (predict_condition).
    """
    condition_logits = None
    if condition is None and predicts_condition(self.config):
      pooled_mask = token_mask if prompt_mask is None else prompt_mask & token_mask.astype(bool)
      condition_logits = self.predict_condition(tokens, pooled_mask)
      condition = condition_distributions(condition_logits)
    image_embeds = self.encode_images(images)
    b, nv = image_embeds.shape[:2]
    x = jnp.concatenate([image_embeds, self.embed_tokens(tokens)], axis=1)
    mask = jnp.concatenate([jnp.ones((b, nv), bool), token_mask.astype(bool)], axis=1)
    logits, aux, _ = self.decoder(x, positions_from_mask(mask), mask, task_id, granularity_id,
                                  condition=condition)
    if condition_logits is not None:
      aux['condition_logits'] = condition_logits
    # Mean-pooled projected image features: the global side of the contrastive loss.
    aux['image_features'] = jnp.mean(image_embeds.astype(jnp.float32), axis=1)
    return logits[:, nv:], aux
