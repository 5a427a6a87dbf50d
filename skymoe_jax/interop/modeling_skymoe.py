"""SkyMoE as a transformers model (remote code shipped into every export folder).

  model = AutoModelForImageTextToText.from_pretrained(export, trust_remote_code=True)
  out = model.generate(**processor(images=image, text=question, return_tensors='pt'))

The parts and the maths are torch_model.py's (this class holds the same three submodules under
the same names, so it loads the export's tensors as they are); this file adds what transformers
expects of a model: a PreTrainedModel, the GenerationMixin's `generate` (greedy by default from
generation_config.json, eos and pad set), its key/value cache (a DynamicCache: the decoder
appends to it) and LLaVA's input layout. `input_ids` hold the image as
`config.image_token_index` placeholders, one per image token, where the image features go
(the processor puts them first, then the prompt, as the JAX model's layout); `attention_mask`
covers the cache's slots and the new ones, so left-padded batches work, RoPE positions counting
the real tokens only. The adaptive router reads `task_ids` and `granularity_ids` [B] (ids into
the export's `skymoe.tasks` / `skymoe.granularities`); the processor infers them from the
prompt's task tag or keywords, as the chat command does.

A model exported with model.moe.condition='predicted' routes by its condition head instead
(torch_model.ConditionHead), so its processor gives no ids: the first forward of a prompt (an
empty cache) predicts the condition from the prompt's text tokens (the attention mask's, less
the image placeholders) and returns it as `condition`, which generate() passes to every later
step (the JAX generator's: one prediction from the prompt routes every new token). Ids given
both route as tags instead.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from transformers import GenerationMixin, PreTrainedModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_skymoe import SkyMoEConfig
from .torch_model import encode_images, predict_condition, predicts_condition, submodules


@dataclass
class SkyMoEOutput(CausalLMOutputWithPast):
  """transformers' causal LM output plus what routed a predicted-condition model: (task
  probabilities [B, num_tasks], granularity probabilities [B, G]); None when the tags route."""
  condition: Optional[Tuple[torch.Tensor, torch.Tensor]] = None


class SkyMoEPreTrainedModel(PreTrainedModel):
  config_class = SkyMoEConfig
  base_model_prefix = ''
  main_input_name = 'input_ids'
  input_modalities = ('image', 'text')
  _no_split_modules = ['ClipLayer', 'DecoderLayer']


class SkyMoEForImageTextToText(SkyMoEPreTrainedModel, GenerationMixin):
  """SkyMoE (vision tower, projector, LLaMA decoder with adaptive-router MoE layers)."""

  def __init__(self, config: SkyMoEConfig):
    super().__init__(config)
    if not isinstance(config.skymoe, dict) or 'model' not in config.skymoe:
      raise ValueError('config.json has no skymoe section with the model config: not a SkyMoE '
                       'export (export it again with python -m skymoe_jax.export)')
    self.skymoe = config.skymoe['model']
    self.predicted = predicts_condition(self.skymoe)  # the condition head routes, not tags
    for name, module in submodules(self.skymoe, config.skymoe['moe_layers'],
                                   config.skymoe.get('condition_head')).items():
      setattr(self, name, module)
    self.post_init()

  def get_input_embeddings(self):
    return self.language_model.model.embed_tokens

  def set_input_embeddings(self, value):
    self.language_model.model.embed_tokens = value

  def _router_inputs(self, task_ids, granularity_ids, batch: int, device):
    """[B] task and granularity ids; required by an adaptive router that routes by the tags,
    else zeros (unused); None, None for a predicted-condition model given neither."""
    moe = self.skymoe['moe']
    if not (moe['num_experts'] and moe.get('adaptive')):
      zeros = torch.zeros(batch, dtype=torch.long, device=device)
      return (zeros if task_ids is None else task_ids), (
          zeros if granularity_ids is None else granularity_ids)
    if self.predicted and task_ids is None and granularity_ids is None:
      return None, None
    if task_ids is None or granularity_ids is None:
      if self.predicted:
        raise ValueError('give both task_ids and granularity_ids [batch] (the tags route), or '
                         'neither (the condition head predicts them)')
      raise ValueError('this model\'s adaptive router needs task_ids and granularity_ids [batch]: '
                       'the processor infers them from the prompt (pass its output to the model)')
    ids = []
    for name, value, n in (('task_ids', task_ids, moe['num_tasks']),
                           ('granularity_ids', granularity_ids, moe['num_granularities'])):
      value = torch.as_tensor(value, device=device).long().reshape(-1)
      if value.shape[0] != batch or bool(((value < 0) | (value >= n)).any()):
        raise ValueError(f'{name} {value.tolist()}: expected {batch} ids in [0, {n})')
      ids.append(value)
    return ids

  def _embed(self, input_ids, pixel_values):
    """Token embeddings, the image features in place of the image placeholders."""
    x = self.language_model.model.embed_tokens(input_ids)
    if pixel_values is None:
      return x
    features = encode_images(self, pixel_values.to(self.dtype)).to(x.dtype)
    slots = input_ids == self.config.image_token_index
    counts = slots.sum(1)
    if features.shape[0] != input_ids.shape[0] or bool((counts != features.shape[1]).any()):
      raise ValueError(f'input_ids hold {counts.tolist()} image tokens '
                       f'(id {self.config.image_token_index}) per row for {features.shape[0]} '
                       f'images of {features.shape[1]} tokens each: build the inputs with the '
                       'processor')
    return x.masked_scatter(slots[..., None], features)

  def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
    """GenerationMixin's, plus the predicted condition of the prompt for the later steps."""
    model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args,
                                                               **kwargs)
    if getattr(outputs, 'condition', None) is not None:
      model_kwargs['condition'] = outputs.condition
    return model_kwargs

  def _condition(self, input_ids, slot_mask, past: int, condition):
    """The predicted condition that routes these tokens: `condition` when given (a later step
    of generate), else the head's on a prompt's text tokens (an empty cache: the new tokens are
    the whole prompt, its image placeholders left out of the pooling)."""
    if condition is not None:
      return tuple(condition)
    if past:
      raise ValueError("model.moe.condition='predicted': a forward on a filled cache needs the "
                       "condition the prompt's forward returned (its output's `condition`), or "
                       'task_ids and granularity_ids')
    text = slot_mask & (input_ids != self.config.image_token_index)
    return predict_condition(self, input_ids, text)

  def forward(self, input_ids=None, pixel_values=None, attention_mask=None, task_ids=None,
              granularity_ids=None, cache=None, use_cache=None, return_dict=None, condition=None,
              **kwargs):
    """fp32 logits [B, T, V] of the T new tokens; `cache` (created when use_cache) gets their
    keys and values. attention_mask [B, S] covers the cache's slots, then the new ones.
    condition: a predicted-condition model's (task, granularity) distributions to route by
    (SkyMoEOutput.condition of the prompt's forward; generate passes it on)."""
    del return_dict, kwargs  # always a ModelOutput; generate's other keys are not used
    if input_ids is None:
      raise ValueError('input_ids are required (build them with the processor)')
    b, t = input_ids.shape
    past = cache.get_seq_length() if cache is not None else 0
    if past == 0 and pixel_values is None:
      raise ValueError('pixel_values are required for a prompt (the first forward of generate)')
    if use_cache and cache is None:
      cache = DynamicCache(config=self.config)
    x = self._embed(input_ids, pixel_values if past == 0 else None)
    slot_mask = (torch.ones(b, past + t, dtype=torch.bool, device=x.device)
                 if attention_mask is None else attention_mask.bool())
    task_ids, granularity_ids = self._router_inputs(task_ids, granularity_ids, b, x.device)
    predicted = None
    if self.predicted and task_ids is None:
      predicted = self._condition(input_ids, slot_mask[:, past:], past, condition)
      task_ids, granularity_ids = predicted
    logits = self.language_model.decode(x, slot_mask, task_ids, granularity_ids, cache)
    return SkyMoEOutput(logits=logits, cache=cache, condition=predicted)
