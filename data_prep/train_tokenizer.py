"""Trains the project's sentencepiece tokenizer on the conversations of records datasets.

  python data_prep/train_tokenizer.py --data_dir=DIR [--data_dir=DIR2 ...] --out=PREFIX \
      --vocab_size=N [--split=train] [--template=llava_v1]

Writes PREFIX.model (see skymoe_jax/data/tokenizer.py for what the model holds) and prints one
JSON object as the last line of stdout: vocab size, number of texts, model path and hash, and
`skipped` ({reason: count}): records left out because the pipeline would skip them too
(unreadable, or a conversation the template rejects), each also a warning on stderr naming it.
"""
import json
import logging

from absl import app
from absl import flags

from skymoe_jax.data import template as tmpl
from skymoe_jax.data import tokenizer

flags.DEFINE_multi_string('data_dir', None, 'records dataset directory (repeatable)',
                          required=True)
flags.DEFINE_string('out', None, 'model prefix: writes PREFIX.model', required=True)
flags.DEFINE_integer('vocab_size', None, 'at most this many pieces (the embedding table size)',
                     required=True)
flags.DEFINE_string('split', 'train', 'split of each dataset to read')
flags.DEFINE_string('template', tmpl.LLAVA_V1.name, 'chat template name')
FLAGS = flags.FLAGS


def main(argv):
  del argv
  template = tmpl.get_template(FLAGS.template)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  texts, skipped = [], {}
  for data_dir in FLAGS.data_dir:
    texts += tokenizer.texts_from_records(data_dir, FLAGS.split, template, skipped=skipped)
  tok = tokenizer.train(texts, FLAGS.out, FLAGS.vocab_size)
  print(json.dumps({
      'model': tok.path, 'vocab_size': tok.vocab_size, 'requested_vocab_size': FLAGS.vocab_size,
      'texts': len(texts), 'data_dirs': FLAGS.data_dir, 'split': FLAGS.split,
      'template': template.name, 'template_hash': tmpl.template_hash(template),
      'model_hash': tok.model_hash,
      'byte_fallback': tok.byte_fallback, 'skipped': dict(sorted(skipped.items()))}))


if __name__ == '__main__':
  app.run(main)
