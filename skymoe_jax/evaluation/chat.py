"""A loaded run that answers (image, question) pairs one at a time (the chat command's engine).

The workdir's config.json and tokenizer.model rebuild the run; the parameters are restored
alone. The question's task tag or keywords set the router's task and granularity
(data/tasks.py), as in training.
"""
import numpy as np

from skymoe_jax import workdir as workdir_lib
from skymoe_jax.data import tasks, template as template_lib
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.evaluation import generate as generate_lib
from skymoe_jax.evaluation import prompts
from skymoe_jax.model import factory
from skymoe_jax.parallel import mesh as mesh_lib


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
    c = self.config
    conversation = [{'from': 'human', 'value': '<image>\n' + question.strip()}]
    prepared = prompts.prepare(image_bytes, conversation, c, self.tokenizer, self.template)
    images, tokens, mask = prompts.pad_batch([prepared], 1, c.data.text_len)
    task_id, granularity_id, _ = tasks.classify(question)
    with mesh_lib.activate(self.mesh, c):
      out, length = self.generate(self.params, images, tokens, mask,
                                  np.asarray([task_id], np.int32),
                                  np.asarray([granularity_id], np.int32))
    return self.tokenizer.decode(np.asarray(out)[0, :int(np.asarray(length)[0])].tolist())
