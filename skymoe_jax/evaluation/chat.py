"""A loaded run that answers (image, question) pairs one at a time (the chat command's engine).

The workdir's config.json and tokenizer.model rebuild the run; the parameters are restored
alone. The question's task tag or keywords set the router's task and granularity
(data/tasks.py), as in training. An image is checked before anything slow: read_image names a
file that is missing or does not decode, and answer() refuses bytes that are not an image.
"""
import os
import pathlib
import re

import numpy as np

from skymoe_jax import workdir as workdir_lib
from skymoe_jax.data import image_ops, tasks, template as template_lib
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.evaluation import generate as generate_lib
from skymoe_jax.evaluation import prompts
from skymoe_jax.model import factory
from skymoe_jax.parallel import mesh as mesh_lib


class ImageError(image_ops.ImageDecodeError):
  """An image to ask about that is missing or does not decode; the message names it."""


def read_image(path) -> bytes:
  """The bytes of image file `path`, after checking that it exists and decodes.

  The chat command calls this before it loads the model (which takes a while), so that a wrong
  --image fails at once and names the file.
  """
  path = pathlib.Path(path)
  if not path.exists():
    raise ImageError(f'{path}: no such file')
  if not path.is_file():
    raise ImageError(f'{path}: not a file')
  data = path.read_bytes()
  try:
    image_ops.decode(data)
  except image_ops.ImageDecodeError as e:
    raise ImageError(f'{path}: {_decode_error(e)}; expected a PNG, JPEG or TIFF file') from None
  return data


def _decode_error(e: Exception) -> str:
  """image_ops' message without PIL's '<_io.BytesIO object at 0x...>' (it names no file)."""
  return re.sub(r'\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>', '', str(e))


def _not_an_image(image_bytes, error: Exception) -> ImageError:
  size = f'{len(image_bytes)} bytes' if hasattr(image_bytes, '__len__') else type(image_bytes)
  head = bytes(image_bytes[:8]) if isinstance(image_bytes, (bytes, bytearray)) else b''
  return ImageError(f'image_bytes ({size}, starting {head!r}): {_decode_error(error)}; '
                    'expected the bytes of a PNG, JPEG or TIFF file')


class Chat:
  """chat = Chat(workdir); chat.answer(png_bytes, 'How many ships are there?') -> str."""

  def __init__(self, workdir, step=None, max_new_tokens=128):
    self.config = workdir_lib.read_config(workdir)
    self.tokenizer = tokenizer_lib.Tokenizer(workdir_lib.tokenizer_path(workdir))
    self.template = template_lib.get_template(self.config.data.template)
    self.mesh = mesh_lib.create_mesh(self.config)  # generate pads the batch of one
    model = factory.create_model(self.config)
    self.step, self.params = workdir_lib.restore_params(self.config, workdir, step, self.mesh)
    self.generate = generate_lib.make_generate_fn(
        model, self.config, max_new_tokens, self.tokenizer.eos_id, self.tokenizer.pad_id,
        mesh=self.mesh)

  def answer(self, image_bytes: bytes, question: str) -> str:
    """The answer to `question` about the encoded image `image_bytes` (ImageError if they do not
    decode, before the model runs)."""
    if isinstance(image_bytes, (str, os.PathLike)):
      raise TypeError(f'Chat.answer takes the image\'s bytes, not the path {str(image_bytes)!r}: '
                      'pass chat.read_image(path)')
    c = self.config
    conversation = [{'from': 'human', 'value': '<image>\n' + question.strip()}]
    try:
      prepared = prompts.prepare(image_bytes, conversation, c, self.tokenizer, self.template)
    except image_ops.ImageDecodeError as e:
      raise _not_an_image(image_bytes, e) from None
    images, tokens, mask = prompts.pad_batch([prepared], 1, c.data.text_len)
    task_id, granularity_id, _ = tasks.classify(question)
    with mesh_lib.activate(self.mesh, c):
      out, length = self.generate(self.params, images, tokens, mask,
                                  np.asarray([task_id], np.int32),
                                  np.asarray([granularity_id], np.int32))
    return self.tokenizer.decode(np.asarray(out)[0, :int(np.asarray(length)[0])].tolist())
