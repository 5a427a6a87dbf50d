"""Tiny SkyMoE for unit tests: every feature on (LoRA, adaptive router, MoE), runs in seconds.

  configs/tiny.py          LoRA and MoE together (model tests)
  configs/tiny.py:stage1   the dense stage I of the recipe
  configs/tiny.py:stage2   stage II, upcycled from a sibling workdir 'stage1'
Data: a small synthetic dataset, generated into data.synthetic.cache_dir when missing.
"""
from skymoe_jax import config as config_lib
from skymoe_jax.jobs.grid import product


def get_config(arg=None):
  c = config_lib.base_config()
  m = c.model
  m.dtype = 'float32'
  m.vision.update(image_size=32, patch_size=8, width=32, depth=3, num_heads=2, mlp_dim=64)
  m.llm.update(vocab_size=256, embed_dim=64, num_layers=4, num_heads=4, num_kv_heads=2,
               head_dim=16, mlp_dim=128, max_seq_len=128)
  m.lora.update(rank=4, alpha=8.0)
  m.moe.update(num_experts=4, top_k=2, layers=(0, 2), condition_dim=8, ragged_block_size=16)
  c.data.update(batch_size=8, text_len=96)
  c.data.sources.synthetic = dict(data_dir='', split='train', weight=1.0, generate='synthetic')
  c.data.synthetic.update(num_images=40, image_size=64, val_fraction=0.2)
  c.optimizer.update(learning_rate=1e-3, warmup_fraction=0.1)
  c.train.update(total_steps=8, log_every=2, checkpoint_every=4)
  if arg:
    config_lib.apply_stage(c, arg, lora_rank=4, stage2_learning_rate=1e-3)
  return c


def get_sweep(arg=None):
  """Three seeds (python launch/sweep.py --config=configs/tiny.py ...; the launcher tests).

  Seeds reach the compiled step only as inputs (the initial key, the data order), so the three
  runs share one set of compiled programs through the sweep's compilation cache; a swept
  learning rate would be a constant in the program and cost a compile per run.
  """
  del arg
  return product(seed=[0, 1, 2])
