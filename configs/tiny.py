"""Tiny SkyMoE for unit tests: every feature on (LoRA, adaptive router, MoE), runs in seconds."""
from skymoe_jax import config_defaults


def get_config(arg=None):
  del arg
  c = config_defaults.base_config()
  m = c.model
  m.dtype = 'float32'
  m.vision.update(image_size=32, patch_size=8, width=32, depth=3, num_heads=2, mlp_dim=64)
  m.llm.update(vocab_size=256, embed_dim=64, num_layers=4, num_heads=4, num_kv_heads=2,
               head_dim=16, mlp_dim=128, max_seq_len=128)
  m.lora.update(rank=4, alpha=8.0)
  m.moe.update(num_experts=4, top_k=2, layers=(0, 2), condition_dim=8, ragged_block_size=16)
  return c
