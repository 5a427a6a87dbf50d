"""SkyMoE's processor for transformers (remote code shipped into every export folder).

  processor = AutoProcessor.from_pretrained(export, trust_remote_code=True)
  inputs = processor(images=image, text='[refer] Where is the ship?', return_tensors='pt')

It turns (image, prompt) into the model's inputs as our pipeline does (data/image_ops.py,
data/template.py, data/tokenizer.py, data/tasks.py, evaluation/prompts.py and chat.py), with
the facts of the run written into the export's files, not into this code:
  * the image (SkyMoEImageProcessor, preprocessor_config.json): RGB, padded to a square with
    its mean colour (pad_to_square), resized bicubically (PIL, antialiased) to image_size,
    scaled to [0, 1] and normalised with CLIP's mean and std -> pixel_values [B, 3, H, W];
  * the prompt: a question is rendered through the run's chat template (chat_template.jinja:
    the system prompt, the roles, `ASSISTANT:` to answer after) as a one-turn conversation, as
    the chat command does; a text that already starts with the system prompt (the output of
    `processor.apply_chat_template(messages)`) is taken as it is. The image placeholder never
    reaches the tokenizer: the image's `num_image_tokens` placeholder ids (`image_token_id`)
    come first, then bos and the prompt's ids (tokenizer.json: our sentencepiece model);
    rows are left-padded, `attention_mask` marking the real tokens;
  * task_ids / granularity_ids [B] for the adaptive router, from the first human turn's task
    tag, else its keywords (`routing` in processor_config.json: the tag table and keyword rules
    of data/tasks.py), unless given (ids or names). A model whose condition head predicts them
    (`condition` 'predicted' in processor_config.json: model.moe.condition) gets none unless
    some are given: its head routes, as in the chat command.
"""
import io
import re
from typing import Dict, List, Optional, Sequence, TypedDict

import numpy as np
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, ProcessorMixin
from transformers.image_processing_base import ImageProcessingMixin


class SkyMoEImageKwargs(TypedDict, total=False):
  """The image processor's settings (what from_pretrained may override)."""
  image_size: int
  pad_to_square: bool
  image_mean: List[float]
  image_std: List[float]


class SkyMoEImageProcessor(ImageProcessingMixin):
  """Images (PIL, uint8 HxWx3 arrays or encoded bytes) -> normalised pixel_values [B, 3, S, S]."""

  model_input_names = ['pixel_values']
  valid_kwargs = SkyMoEImageKwargs

  def __init__(self, image_size: int = 336, pad_to_square: bool = True,
               image_mean: Sequence[float] = (0.48145466, 0.4578275, 0.40821073),
               image_std: Sequence[float] = (0.26862954, 0.26130258, 0.27577711), **kwargs):
    super().__init__(**kwargs)
    self.image_size, self.pad_to_square = int(image_size), bool(pad_to_square)
    self.image_mean, self.image_std = list(image_mean), list(image_std)

  @staticmethod
  def to_rgb(image) -> np.ndarray:
    """uint8 [H, W, 3] of a PIL image, an array or encoded image bytes."""
    if isinstance(image, (bytes, bytearray)):
      image = Image.open(io.BytesIO(image))
    if isinstance(image, Image.Image):
      image.load()
      return np.asarray(image.convert('RGB'))
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
      raise ValueError(f'image: expected a PIL image, encoded bytes or a uint8 [H, W, 3] array, '
                       f'got {array.dtype}{list(array.shape)}')
    return array

  def view(self, image: np.ndarray) -> np.ndarray:
    """The whole image padded to a square with its mean colour and resized: uint8 [S, S, 3]."""
    h, w = image.shape[:2]
    if self.pad_to_square and h != w:
      side = max(h, w)
      square = np.empty((side, side, 3), np.uint8)
      square[:] = image.reshape(-1, 3).mean(axis=0).round().astype(np.uint8)
      top, left = (side - h) // 2, (side - w) // 2
      square[top:top + h, left:left + w] = image
      image = square
    if image.shape[0] != self.image_size or image.shape[1] != self.image_size:
      image = np.asarray(Image.fromarray(image).resize((self.image_size, self.image_size),
                                                       Image.BICUBIC))
    return image

  def __call__(self, images, return_tensors=None, **kwargs) -> BatchFeature:
    del kwargs
    if not isinstance(images, (list, tuple)):
      images = [images]
    mean = np.asarray(self.image_mean, np.float32)
    std = np.asarray(self.image_std, np.float32)
    pixels = [((self.view(self.to_rgb(image)).astype(np.float32) / 255.0 - mean) / std
               ).transpose(2, 0, 1) for image in images]
    return BatchFeature({'pixel_values': np.stack(pixels)}, tensor_type=return_tensors)


class SkyMoEProcessor(ProcessorMixin):
  """(images, prompts) -> input_ids, attention_mask, pixel_values, task_ids, granularity_ids."""

  def __init__(self, image_processor=None, tokenizer=None, chat_template=None,
               image_token_id: int = 0, num_image_tokens: int = 0,
               system_prompt: str = '', routing: Optional[Dict] = None, condition: str = 'tags',
               **kwargs):
    del kwargs
    self.image_token_id, self.num_image_tokens = int(image_token_id), int(num_image_tokens)
    self.system_prompt = system_prompt
    self.routing = routing
    self.condition = condition  # the model's moe.condition: 'predicted' infers no router ids
    super().__init__(image_processor, tokenizer, chat_template=chat_template)

  @classmethod
  def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None,
                                     **kwargs):
    """The image processor is this module's class (AutoImageProcessor would need
    trust_remote_code again), the tokenizer transformers' own (tokenizer.json)."""
    del processor_dict
    return [SkyMoEImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs),
            AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)]

  # ------------------------------------------------------------------ the router's task ids

  def classify(self, question: str):
    """(task_id, granularity_id) of a human turn: its leading task tag (exact, else
    case-insensitive within the same bracket style), else the first keyword rule that
    matches (whole words, case-insensitive), else the default; an unknown tag raises."""
    r = self.routing
    rest = question[len(re.match(r['image_prefix'], question).group(0)):]
    m = re.match(r['tag_at_start'], rest)
    if m:
      tag = m.group(1)
      if tag in r['tags']:
        return tuple(r['tags'][tag])
      found = {tuple(ids) for name, ids in r['tags'].items() if name.lower() == tag.lower()}
      if len(found) == 1:
        return found.pop()
      raise ValueError(f'unknown task tag {tag!r}; known tags: {sorted(r["tags"])}')
    text = rest.lower()
    for pattern, task_id, granularity_id in r['keyword_rules']:
      if re.search(r'\b(?:' + pattern + r')\b', text):
        return task_id, granularity_id
    return tuple(r['default'])

  def _ids(self, given, names: List[str], what: str, n: int):
    if given is None:
      return None
    if isinstance(given, (int, str)):
      given = [given] * n
    elif not isinstance(given, (list, tuple)):  # an array or a tensor
      given = np.asarray(given).reshape(-1).tolist()
    if len(given) != n:
      raise ValueError(f'{what}: {len(given)} given for {n} prompts')
    out = []
    for g in given:
      if isinstance(g, str):
        if g not in names:
          raise ValueError(f'{what}: {g!r} is not one of {names}')
        g = names.index(g)
      if not 0 <= int(g) < len(names):
        raise ValueError(f'{what}: {g} is not an id in [0, {len(names)}) ({names})')
      out.append(int(g))
    return out

  # ------------------------------------------------------------------------- the prompt

  def prompt(self, text: str) -> str:
    """A question rendered as a one-turn conversation; an already rendered prompt as it is."""
    if self.system_prompt and text.startswith(self.system_prompt):
      return text
    return self.apply_chat_template([{'role': 'user', 'content': text}],
                                    add_generation_prompt=True, tokenize=False)

  def first_question(self, prompt: str) -> str:
    """The first human turn's text of a rendered prompt (what sets the task)."""
    r = self.routing
    rest = prompt[len(r['turn_start']):] if prompt.startswith(r['turn_start']) else prompt
    end = rest.find(r['turn_end'])
    return rest if end < 0 else rest[:end]

  def __call__(self, images=None, text=None, task_ids=None, granularity_ids=None,
               return_tensors='pt', **kwargs) -> BatchFeature:
    del kwargs  # transformers' processor options (padding, truncation) do not apply
    if text is None or images is None:
      raise ValueError('SkyMoEProcessor needs images and text (one image per prompt)')
    texts = [text] if isinstance(text, str) else list(text)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if len(images) != len(texts):
      raise ValueError(f'{len(images)} images for {len(texts)} prompts: give one image each')
    prompts = [self.prompt(t) for t in texts]
    tok = self.tokenizer
    rows = [[self.image_token_id] * self.num_image_tokens + [tok.bos_token_id] +
            tok(p, add_special_tokens=False)['input_ids'] for p in prompts]
    width = max(len(r) for r in rows)
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    input_ids = np.full((len(rows), width), pad, np.int64)
    attention_mask = np.zeros((len(rows), width), np.int64)
    for i, r in enumerate(rows):  # left padding: every row's next token goes in one slot
      input_ids[i, width - len(r):], attention_mask[i, width - len(r):] = r, 1
    inferred = [self.classify(self.first_question(p)) for p in prompts]
    n = len(texts)
    tasks = self._ids(task_ids, self.routing['tasks'], 'task_ids', n)
    grans = self._ids(granularity_ids, self.routing['granularities'], 'granularity_ids', n)
    data = {'input_ids': input_ids, 'attention_mask': attention_mask,
            'pixel_values': self.image_processor(images)['pixel_values']}
    if self.condition != 'predicted' or tasks is not None or grans is not None:
      data.update(task_ids=np.asarray(tasks or [t for t, _ in inferred], np.int64),
                  granularity_ids=np.asarray(grans or [g for _, g in inferred], np.int64))
    return BatchFeature(data, tensor_type=return_tensors)

  def batch_decode(self, *args, **kwargs):
    return self.tokenizer.batch_decode(*args, **kwargs)

  def decode(self, *args, **kwargs):
    return self.tokenizer.decode(*args, **kwargs)
