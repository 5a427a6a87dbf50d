"""Builds the NEON tree tiles of the deepforest 2.1.0 wheel (tfds builder skymoe_neon).

  pip install --no-deps deepforest==2.1.0    # data only: the package is never imported
  python data_prep/convert_neon.py --out=DIR [--data_dir=DIR] [--crop_size=400] \
      [--min_visible=0.5] [--max_image_pixels=67108864]

DIR becomes the dataset's tfds version folder (the data_dir a config's source names). The same
from tfds: tfds build skymoe_neon --imports=skymoe_jax.data.builders --data_dir=D
[--manual_dir=TILES]. See skymoe_jax/data/convert/neon.py for the crops, the box rule and the
split. The last stdout line is the JSON summary ({"written", "skipped", "splits", "tiles",
"crops", "boxes", ...}).
"""
import argparse
import json
import logging

from skymoe_jax.data import builders
from skymoe_jax.data import image_ops
from skymoe_jax.data.convert import neon


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='dataset folder to write')
  parser.add_argument('--data_dir', default=None,
                      help='folder of tiles + CSV/XML annotations (default: deepforest\'s data/)')
  parser.add_argument('--crop_size', type=int, default=neon.CROP_SIZE)
  parser.add_argument('--min_visible', type=float, default=neon.MIN_VISIBLE,
                      help='keep a box cut by a crop edge when this fraction of it is inside')
  parser.add_argument('--max_grounding_boxes', type=int, default=neon.MAX_GROUNDING_BOXES)
  parser.add_argument('--max_image_pixels', type=int, default=image_ops.MAX_IMAGE_PIXELS,
                      help='skip images with more pixels (default 8192*8192, as '
                           'config.data.max_image_pixels)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  summary = builders.build_at(args.out, 'neon', args.data_dir, crop_size=args.crop_size,
                              min_visible=args.min_visible,
                              max_grounding_boxes=args.max_grounding_boxes,
                              max_image_pixels=args.max_image_pixels)
  print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == '__main__':
  main()
