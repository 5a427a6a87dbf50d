"""Small SkyMoE that trains on this CPU machine in minutes (the README's main job).

  configs/demo.py[:stage1]  stage I: the dense model; it starts from random weights (no
                            pretrained LLM or CLIP at this size), so it trains every parameter
  configs/demo.py:stage2    stage II as in the paper: upcycled from the sibling workdir
                            'stage1', experts + routers trained, CDA edit rows in every batch
Data: the synthetic aerial scenes (data_prep/make_synthetic.py), generated when missing.
"""
from skymoe_jax import config as config_lib


def get_config(arg=None):
  c = config_lib.base_config()
  m = c.model
  m.dtype = 'float32'  # bf16 matmuls are emulated (slow) on CPU
  # 4 layers compile fast unrolled, and the step is 15-17% faster here than scanned: no slicing of
  # the stacked weights, no writing of their stacked gradients (docs/benchmarks.md).
  m.scan_layers = False
  # From scratch: the position table starts as the 2-D sin-cos one, so the tower knows where each
  # patch is before it has learnt anything (grounding and colour-by-position need it).
  # The projected image tokens get a fixed 2-D sin-cos table too (token_posemb): after training
  # the tower's features no longer hold their place, which a box answer is read from
  # (docs/results.md, "Grounding").
  m.vision.update(image_size=64, patch_size=8, width=128, depth=4, num_heads=4, mlp_dim=512,
                  posemb_init='sincos2d', token_posemb='sincos2d')
  m.llm.update(vocab_size=1024, embed_dim=192, num_layers=4, num_heads=6, num_kv_heads=2,
               head_dim=32, mlp_dim=512, max_seq_len=128)
  m.lora.update(rank=0)
  # Blocks of 256 rows: fewer, larger matmuls in the CPU ragged kernel.
  m.moe.update(num_experts=8, top_k=2, layers=(0, 2), condition_dim=16, ragged_block_size=256)
  c.data.update(batch_size=16, text_len=64)  # the synthetic conversations hold <= 60 tokens
  c.data.sources.synthetic = dict(data_dir='', split='train', weight=1.0, generate='synthetic')
  # The benchmark of docs/results.md: large objects (3x), at most 3 per scene, backgrounds blended
  # with another scene's (up to 70%: the scene is not always what it looks like most), up to
  # three grounding and colour questions per scene; 450 held-out scenes give >= 300 of each task.
  c.data.synthetic.update(num_images=3000, image_size=128, val_fraction=0.15, object_scale=3.0,
                          max_objects=3, scene_mix=0.7, local_questions=3)
  c.optimizer.update(learning_rate=1e-3, warmup_fraction=0.05, grad_clip_norm=1.0)
  c.train.update(log_every=50)
  # 200 questions per task: grounding hits are rare at this size, 100 leave it at 0 or 1-2 by luck.
  c.eval.update(max_samples=0, max_per_task=200, max_new_tokens=32, batch_size=64)
  config_lib.apply_stage(c, arg or 'stage1', lora_rank=8, stage2_learning_rate=3e-4)
  if c.train.stage == 'stage1':
    c.optimizer.trainable = ()  # from scratch: everything learns
    # Stage II freezes the vision tower: every visual feature is learnt here, and the boxes of
    # grounding come last (0 at 400 steps, about 0.01 at 800; docs/results.md). 850 steps (and
    # 150 in stage II) for time: the README job takes 14 minutes at about 1.4 steps/s (README).
    c.train.update(total_steps=850, checkpoint_every=425)
  else:
    c.train.total_steps = 150
    c.data.cda.enabled = True  # stage II trains on CDA pairs (docs/design.md section 2)
  return c
