"""(image, conversation) -> the model's inputs: one prepared question, and a padded batch of them.

Evaluation and chat build their batches here, so a question is encoded the same way wherever it
is asked: the image as the global view the pipeline trains on, the conversation through the
run's chat template, the prompt never cut (a cut prompt would be a different question).
"""
from typing import Dict, List, Sequence

import numpy as np

from skymoe_jax.data import image_ops


def prepare(image_bytes: bytes, conversation: Sequence[Dict], config, tokenizer, template,
            name: str = 'the question') -> Dict:
  """{'image': normalised pixels, 'prompt': token ids, 'height', 'width'} of one question.

  conversation: the turns up to (not including) the answer to generate. name: what the error
  calls the question when its prompt does not fit config.data.text_len. An image of more than
  config.data.max_image_pixels pixels is refused as training refuses it (a workdir config.json
  from before that field takes image_ops' default).
  """
  image = image_ops.decode(image_bytes, config.data.get('max_image_pixels',
                                                    image_ops.MAX_IMAGE_PIXELS))
  prompt = tokenizer.encode_prompt(template, conversation)
  if len(prompt) > config.data.text_len:
    raise ValueError(f'{name}: field conversations: the prompt has {len(prompt)} tokens, more '
                     f'than config.data.text_len={config.data.text_len}')
  return {
      'image': image_ops.normalize(image_ops.global_view(image, config.model.vision.image_size,
                                                         config.data.pad_to_square)),
      'prompt': prompt, 'height': image.shape[0], 'width': image.shape[1],
  }


def pad_batch(prepared: List[Dict], rows: int, text_len: int):
  """(images [rows, H, W, 3], tokens [rows, text_len], token_mask) of the prepared questions.

  A fixed number of rows keeps one compiled program; spare rows repeat the last question.
  """
  pick = [min(i, len(prepared) - 1) for i in range(rows)]
  images = np.stack([prepared[i]['image'] for i in pick])
  tokens = np.zeros((rows, text_len), np.int32)
  mask = np.zeros((rows, text_len), bool)
  for row, i in enumerate(pick):
    p = prepared[i]['prompt']
    tokens[row, :len(p)], mask[row, :len(p)] = p, True
  return images, tokens, mask
