"""The paper's model (SPEC.md): CLIP ViT-L/14 at 504 px (36x36 = 1296 image tokens),
Vicuna-7B sizes, 8-expert top-2 MoE in layers 0, 2, ..., 30. These are the defaults."""
from skymoe_jax import config_defaults


def get_config(arg=None):
  del arg
  c = config_defaults.base_config()
  c.model.remat_policy = 'full'
  return c
