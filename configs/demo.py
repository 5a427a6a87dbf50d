"""Small SkyMoE that trains on this CPU machine in minutes (the README's main job).

  configs/demo.py[:stage1]  stage I: the dense model; it starts from random weights (no
                            pretrained LLM or CLIP at this size), so it trains every parameter
  configs/demo.py:stage2    stage II as in the paper: upcycled from the sibling workdir
                            'stage1', experts + routers trained
Data: the synthetic aerial scenes (data_prep/make_synthetic.py), generated when missing.
"""
from skymoe_jax import config_defaults


def get_config(arg=None):
  c = config_defaults.base_config()
  m = c.model
  m.dtype = 'float32'  # bf16 matmuls are emulated (slow) on CPU
  m.vision.update(image_size=64, patch_size=8, width=128, depth=4, num_heads=4, mlp_dim=512)
  m.llm.update(vocab_size=1024, embed_dim=256, num_layers=6, num_heads=8, num_kv_heads=4,
               head_dim=32, mlp_dim=688, max_seq_len=256)
  m.lora.update(rank=0)
  m.moe.update(num_experts=8, top_k=2, layers=(0, 2, 4), condition_dim=16, ragged_block_size=64)
  c.data.update(batch_size=16, text_len=128)
  c.data.sources.synthetic = dict(data_dir='', split='train', weight=1.0, generate='synthetic')
  c.data.synthetic.update(num_images=2000, image_size=128, val_fraction=0.1)
  c.optimizer.update(learning_rate=1e-3, warmup_fraction=0.05, grad_clip_norm=1.0)
  c.train.update(total_steps=300, log_every=20, checkpoint_every=100)
  config_defaults.apply_stage(c, arg or 'stage1', lora_rank=8, stage2_learning_rate=3e-4)
  if c.train.stage == 'I':
    c.optimizer.trainable = ()  # from scratch: everything learns
  return c
