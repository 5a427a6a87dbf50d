"""Small SkyMoE that trains on this CPU machine in minutes (the README's main job)."""
from skymoe_jax import config_defaults


def get_config(arg=None):
  del arg
  c = config_defaults.base_config()
  m = c.model
  m.dtype = 'float32'  # bf16 matmuls are emulated (slow) on CPU
  m.vision.update(image_size=64, patch_size=8, width=128, depth=4, num_heads=4, mlp_dim=512)
  m.llm.update(vocab_size=1024, embed_dim=256, num_layers=6, num_heads=8, num_kv_heads=4,
               head_dim=32, mlp_dim=688, max_seq_len=256)
  m.lora.update(rank=0)
  m.moe.update(num_experts=8, top_k=2, layers=(0, 2, 4), condition_dim=16, ragged_block_size=64)
  return c
