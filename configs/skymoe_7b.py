"""The paper's model (docs/design.md): CLIP ViT-L/14 at 504 px (36x36 = 1296 image tokens),
Vicuna-7B sizes, 8-expert top-2 MoE in layers 0, 2, ..., 30. These are the defaults."""
from skymoe_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.model.remat_policy = 'full'
  return c
