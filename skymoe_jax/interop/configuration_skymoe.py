"""transformers' config of a SkyMoE export (remote code shipped into every export folder).

LLaVA's config (the CLIP vision tower, the LLaMA text config, the image token) plus our
`skymoe` section: the whole model config, which the PyTorch model (torch_model.py) is built
from, and the indices of its MoE decoder layers. Dense exports keep model_type 'llava' in
config.json, so LlavaForConditionalGeneration loads them natively; this class reads them too.
"""
from huggingface_hub.dataclasses import strict
from transformers import LlavaConfig


@strict
class SkyMoEConfig(LlavaConfig):
  model_type = 'skymoe_llava'

  skymoe: dict | None = None
