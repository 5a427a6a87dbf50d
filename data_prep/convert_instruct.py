"""Converts LLaVA/GeoChat instruction data (JSON list or jsonl) into sharded records.

  python data_prep/convert_instruct.py --input=FILE.json|.jsonl --images=DIR --out=DIR \
      [--split=train] [--box_dialect=geochat] [--source=NAME] [--licence=...] [--pad_to_square] \
      [--max_image_pixels=67108864]

Bad samples are skipped, each with a warning on stderr naming the file, the sample and the field.
The last stdout line is the JSON summary ({"written", "skipped": {reason: count}, ...}), so
scripts can read it with `tail -n 1`. Converting another split into the same --out keeps the
splits already there, and the split converted replaces its old version only once it is complete.
Images outside --images (by `..`, an absolute path or a symlink) are skipped, and so are images
of more than --max_image_pixels pixels (skipped rather than downscaled: boxes in pixels would no
longer match).
"""
import argparse
import json
import logging

from skymoe_jax.data import boxes
from skymoe_jax.data import image_ops
from skymoe_jax.data.convert import instruct


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--input', required=True, help='.json (a list) or .jsonl file')
  parser.add_argument('--images', required=True, help='folder the samples\' "image" paths are in')
  parser.add_argument('--out', required=True, help='dataset folder to write')
  parser.add_argument('--split', default='train')
  parser.add_argument('--box_dialect', default='geochat', choices=sorted(boxes.DIALECTS))
  parser.add_argument('--source', default=None, help='dataset name (default: the input stem)')
  parser.add_argument('--licence', default='unknown')
  parser.add_argument('--pad_to_square', action='store_true',
                      help='boxes are relative to the image padded to a square (LLaVA style)')
  parser.add_argument('--records_per_shard', type=int, default=1000)
  parser.add_argument('--max_image_pixels', type=int, default=image_ops.MAX_IMAGE_PIXELS,
                      help='skip images with more pixels (default 8192*8192, as '
                           'config.data.max_image_pixels)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  summary = instruct.convert(args.input, args.images, args.out, split=args.split,
                             box_dialect=args.box_dialect, source=args.source,
                             licence=args.licence, pad_to_square=args.pad_to_square,
                             records_per_shard=args.records_per_shard,
                             max_image_pixels=args.max_image_pixels)
  print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == '__main__':
  main()
