"""The paper's model (docs/design.md): CLIP ViT-L/14 at 504 px (36x36 = 1296 image tokens),
Vicuna-7B sizes, 8-expert top-2 MoE in layers 0, 2, ..., 30. These are the defaults.

Mesh and remat follow the devices (docs/scaling.md): the experts split 2 ways, fsdp takes the
largest share of the rest that the global batch of 144 divides over data x fsdp x expert, tensor
what is left (v5p:2x2x4 -> 1x8x2x1, v5p:4x4x4 -> 1x8x2x4); the remat policy saves as much as
the activations one device holds leave room for in its 95 GiB (model.remat_auto, measured by
ahead-of-time compiles for v5p).

Several slices keep the base config's config.mesh.dcn_data=-1, dcn_fsdp=1: the slices split the
batch (data), everything above stays inside each slice and is resolved for its share of the
batch (2 slices of v5p:2x2x4 at 144: 2x4x2x2 over the 32 chips; at 288 each slice is the
1x8x2x1 of one slice; benchmarks/results/tpu_projection_v5p_2slices.json).
"""
from skymoe_jax import config as config_lib


def get_config(arg=None):
  del arg
  c = config_lib.base_config()
  c.mesh.update(data=1, fsdp=-1, expert=2, tensor=-1)
  c.model.remat_policy = 'auto'
  # Tokens per device (batch x sequence over batch shards x tensor ways) -> policy:
  # v5p:4x4x4 holds 144 x 2048 / (16 x 4) = 4608, v5p:2x2x4 18432.
  c.model.remat_auto = ((4608, 'save_proj_experts'), (18432, 'save_attention'))
  return c
