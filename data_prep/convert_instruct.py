"""Builds LLaVA/GeoChat instruction data (JSON list or jsonl) as a tfds dataset (skymoe_instruct).

  python data_prep/convert_instruct.py --manual_dir=DIR --out=DIR [--box_dialect=geochat] \
      [--source=NAME] [--licence=...] [--pad_to_square] [--max_image_pixels=67108864]

manual_dir holds one instruction file per split, <split>.json (a JSON list) or <split>.jsonl
(train.json, test.jsonl, ...), and images/ with the files the samples' "image" paths name. --out
becomes the dataset's tfds version folder (the data_dir a config's source names); an older
dataset there is replaced once the new one is complete. The same from tfds:
  tfds build skymoe_instruct/geochat --imports=skymoe_jax.data.builders --manual_dir=DIR \
      --data_dir=D   (one config per box dialect)

Bad samples are skipped, each with a warning on stderr naming the file, the sample and the field.
The last stdout line is the JSON summary ({"written", "skipped": {reason: count}, ...}), so
scripts can read it with `tail -n 1`. Images outside images/ (by `..`, an absolute path or a
symlink) are skipped, and so are images of more than --max_image_pixels pixels (skipped rather
than downscaled: boxes in pixels would no longer match).
"""
import argparse
import json
import logging

from skymoe_jax.data import boxes
from skymoe_jax.data import builders
from skymoe_jax.data import image_ops


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--manual_dir', required=True,
                      help='folder of <split>.json|.jsonl files and images/')
  parser.add_argument('--out', required=True, help='dataset folder to write')
  parser.add_argument('--box_dialect', default='geochat', choices=sorted(boxes.DIALECTS))
  parser.add_argument('--source', default=None,
                      help='the records\' source name (default: the manual_dir folder name)')
  parser.add_argument('--licence', default='unknown')
  parser.add_argument('--pad_to_square', action='store_true',
                      help='boxes are relative to the image padded to a square (LLaVA style)')
  parser.add_argument('--max_image_pixels', type=int, default=image_ops.MAX_IMAGE_PIXELS,
                      help='skip images with more pixels (default 8192*8192, as '
                           'config.data.max_image_pixels)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  summary = builders.build_at(args.out, 'instruct', args.manual_dir, config=args.box_dialect,
                              source=args.source, licence=args.licence,
                              pad_to_square=args.pad_to_square,
                              max_image_pixels=args.max_image_pixels)
  print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == '__main__':
  main()
