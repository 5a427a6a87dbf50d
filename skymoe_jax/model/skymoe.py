"""SkyMoE: vision tower -> projector -> MoE decoder, image tokens first, then text."""
import flax.linen as nn
import jax.numpy as jnp
import ml_collections

from skymoe_jax.model.decoder import Decoder
from skymoe_jax.model.projector import Projector
from skymoe_jax.model.vit import VisionTower


def positions_from_mask(mask):
  """Each real token's position among the real tokens of its row (padding repeats its left one)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


class SkyMoE(nn.Module):
  config: ml_collections.FrozenConfigDict  # the `model` part of a config

  def setup(self):
    cfg, v = self.config, self.config.vision
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    self.vision = VisionTower(v.image_size, v.patch_size, v.width, v.depth, v.num_heads,
                              v.mlp_dim, v.feature_layer, v.norm_eps, cfg.scan_layers,
                              cfg.remat_policy, cfg.attention_impl, **kw)
    self.projector = Projector(cfg.llm.embed_dim, **kw)
    self.decoder = Decoder(cfg)

  def encode_images(self, images):
    """[B, H, W, 3] normalised pixels -> [B, Nv, D] image tokens in the LLM's embedding space."""
    return self.projector(self.vision(images))

  def embed_tokens(self, tokens):
    return self.decoder.embed(tokens)

  def init_cache(self, batch: int, max_len: int):
    return self.decoder.init_cache(batch, max_len)

  def decode(self, embeddings, positions, token_mask, task_id, granularity_id, cache=None,
             index=0, slot_mask=None):
    """The decoder on ready embeddings; see Decoder.__call__ (prefill and generation use this)."""
    return self.decoder(embeddings, positions, token_mask, task_id, granularity_id, cache, index,
                        slot_mask)

  def __call__(self, images, tokens, token_mask, task_id, granularity_id):
    """Full forward pass for training.

    images: [B, H, W, 3]; tokens, token_mask: [B, T]; task_id, granularity_id: [B].
    Returns (logits [B, T, V] fp32 for the text positions, aux) where logits[:, t] predicts
    tokens[:, t + 1]; aux['image_features'] [B, D] are the mean-pooled image tokens.
    """
    image_embeds = self.encode_images(images)
    b, nv = image_embeds.shape[:2]
    x = jnp.concatenate([image_embeds, self.embed_tokens(tokens)], axis=1)
    mask = jnp.concatenate([jnp.ones((b, nv), bool), token_mask.astype(bool)], axis=1)
    logits, aux, _ = self.decode(x, positions_from_mask(mask), mask, task_id, granularity_id)
    # Mean-pooled projected image features: the global side of the contrastive loss.
    aux['image_features'] = jnp.mean(image_embeds.astype(jnp.float32), axis=1)
    return logits[:, nv:], aux
