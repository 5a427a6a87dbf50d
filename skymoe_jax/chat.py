"""python -m skymoe_jax.chat --workdir=DIR --image=PATH [--prompt="How many ships are there?"]

Answers one question about an image with the workdir's latest (or --step) checkpoint; the
workdir holds the run's config. Without --prompt it answers each line read from stdin. The image
is read and decoded before the model is loaded: a missing or undecodable file is one line.
"""
import sys

from absl import app
from absl import flags

from skymoe_jax import cli
from skymoe_jax.evaluation import chat


def define_flags():
  cli.define_workdir_flag('A training workdir (its config.json, tokenizer.model, checkpoints).')
  flags.DEFINE_string('image', None, 'Image file (PNG, JPEG, TIFF).')
  flags.DEFINE_string('prompt', None, 'The question; default: read questions from stdin.')
  flags.DEFINE_integer('step', None, 'Checkpoint step; default the latest.')
  flags.DEFINE_integer('max_new_tokens', 128, 'Longest answer.')
  flags.mark_flags_as_required(['image'])


def main(argv):
  cli.check_no_arguments(argv)
  cli.quiet_library_logs()
  f = flags.FLAGS
  try:
    image = chat.read_image(f.image)
  except chat.ImageError as e:
    raise app.UsageError(f'--image: {e}') from None
  bot = chat.Chat(f.workdir, f.step, f.max_new_tokens)
  questions = [f.prompt] if f.prompt is not None else (line for line in sys.stdin if line.strip())
  for question in questions:
    print(bot.answer(image, question), flush=True)


if __name__ == '__main__':
  cli.run(main, define_flags)
