"""python -m skymoe_jax.chat --workdir=DIR --image=PATH [--prompt="How many ships are there?"]

Answers one question about an image with the workdir's latest checkpoint (its config.json and
tokenizer.model); without --prompt it answers each line read from stdin. The prompt's task tag
or keywords set the router's task and granularity (data/tasks.py), as in training.
"""
import json
import pathlib
import sys

from absl import app
from absl import flags
import ml_collections
import numpy as np

from skymoe_jax.data import image_ops, tasks, template as template_lib
from skymoe_jax.data import tokenizer as tokenizer_lib
from skymoe_jax.evaluation import generate as generate_lib
from skymoe_jax.evaluation import runner
from skymoe_jax.model import factory
from skymoe_jax.parallel import mesh as mesh_lib
from skymoe_jax.train import trainer



def define_flags():
  """Only when run as a program, so that tests can import Chat next to other entry points."""
  flags.DEFINE_string('workdir', None, 'A training workdir.')
  flags.DEFINE_string('image', None, 'Image file (PNG, JPEG, TIFF).')
  flags.DEFINE_string('prompt', None, 'The question; default: read questions from stdin.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')
  flags.DEFINE_integer('max_new_tokens', 128, 'Longest answer.')
  flags.mark_flags_as_required(['workdir', 'image'])


class Chat:
  """A loaded run that answers (image, question) pairs one at a time."""

  def __init__(self, workdir, step=None, max_new_tokens=128):
    workdir = pathlib.Path(workdir).expanduser().resolve()
    self.config = ml_collections.ConfigDict(
        json.loads((workdir / trainer.CONFIG_FILE).read_text()))
    self.tokenizer = tokenizer_lib.Tokenizer(workdir / f'{trainer.TOKENIZER}.model')
    self.template = template_lib.get_template(self.config.data.template)
    self.mesh = mesh_lib.create_mesh(self.config)  # generate pads the batch of one
    model = factory.create_model(self.config)
    self.step, self.params = runner.restore_params(self.config, model, self.mesh, workdir, step)
    self.generate = generate_lib.make_generate_fn(
        model, self.config, max_new_tokens, self.tokenizer.eos_id, self.tokenizer.pad_id,
        mesh=self.mesh)

  def answer(self, image_bytes: bytes, question: str) -> str:
    c = self.config
    image = image_ops.decode(image_bytes)
    pixels = image_ops.normalize(image_ops.global_view(image, c.model.vision.image_size,
                                                       c.data.pad_to_square))
    conversation = [{'from': 'human', 'value': '<image>\n' + question.strip()}]
    prompt = self.tokenizer.encode_prompt(self.template, conversation)
    if len(prompt) > c.data.text_len:  # a cut prompt would be a different question
      raise ValueError(f'the prompt has {len(prompt)} tokens, more than config.data.text_len='
                       f'{c.data.text_len}')
    tokens = np.zeros((1, c.data.text_len), np.int32)
    mask = np.zeros((1, c.data.text_len), bool)
    tokens[0, :len(prompt)], mask[0, :len(prompt)] = prompt, True
    task_id, granularity_id, _ = tasks.classify(question)
    with mesh_lib.activate(self.mesh, c):
      out, length = self.generate(self.params, pixels[None], tokens, mask,
                                  np.asarray([task_id], np.int32),
                                  np.asarray([granularity_id], np.int32))
    return self.tokenizer.decode(np.asarray(out)[0, :int(np.asarray(length)[0])].tolist())


def main(argv):
  del argv
  trainer.quiet_library_logs()
  f = flags.FLAGS
  chat = Chat(f.workdir, f.step, f.max_new_tokens)
  image = pathlib.Path(f.image).read_bytes()
  questions = [f.prompt] if f.prompt is not None else (line for line in sys.stdin if line.strip())
  for question in questions:
    print(chat.answer(image, question), flush=True)


if __name__ == '__main__':
  define_flags()
  app.run(main)
