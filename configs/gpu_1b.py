"""SkyMoE at a size one GPU trains (an 80-141 GB H100 / H200): about 1.5B parameters active of
3.2B, bf16, every parameter trained.

Vision: CLIP ViT-L/14 at 336 px (24x24 = 576 image tokens, as LLaVA-1.5-336). Decoder: a
TinyLlama-1.1B-sized LLaMA (2048 wide, 16 layers, 16 heads of 128, FFN 5632) whose every other
FFN is an 8-expert top-2 MoE. Sequence 576 + 448 = 1024, batch 16 (16k tokens a step).
Kernels by 'auto': cuDNN flash attention and the Triton grouped matmuls on a GPU.
`python -m skymoe_jax.summary --config=configs/gpu_1b.py` counts it; benchmarks/gpu_check.sh
times its train step.
"""
from skymoe_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  m = c.model
  m.vision.update(image_size=336)
  m.llm.update(embed_dim=2048, num_layers=16, num_heads=16, num_kv_heads=16, head_dim=128,
               mlp_dim=5632, max_seq_len=1024)
  m.moe.update(num_experts=8, top_k=2, layers=tuple(range(0, 16, 2)))
  # One GPU's 141 GB hold the projections and the experts' outputs: only norms, activations and
  # the attention core are recomputed.
  m.remat_policy = 'save_proj_experts'
  c.data.update(batch_size=16, text_len=1024 - 576)
  c.data.sources.synthetic = dict(data_dir='', split='train', weight=1.0, generate='synthetic')
  c.data.synthetic.update(image_size=336)
  return c
