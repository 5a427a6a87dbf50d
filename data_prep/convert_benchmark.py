"""Converts a classic remote-sensing benchmark from its published file layout into sharded records.

  python data_prep/convert_benchmark.py --name=NAME --manual_dir=DIR --out=DIR [--seed=0] \
      [--licence=...] [--max_image_pixels=67108864]

NAME is one of skymoe_jax/data/convert/benchmarks.py's CONVERTERS (ucmerced, nwpu_resisc45,
rsvqa_lr, dior_rsvg, ucm_captions); that module's docstring gives each layout. Nothing is
downloaded: a missing file is an error naming the expected path. The last stdout line is the JSON
summary ({"written", "skipped": {reason: count}, "splits", ...}).
"""
import argparse
import json
import logging

from skymoe_jax.data import image_ops
from skymoe_jax.data.convert import benchmarks


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--name', required=True, choices=sorted(benchmarks.CONVERTERS))
  parser.add_argument('--manual_dir', required=True, help='where the dataset files were placed')
  parser.add_argument('--out', required=True, help='dataset folder to write')
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the stratified split (datasets without an official split)')
  parser.add_argument('--licence', default=None, help='override the recorded licence')
  parser.add_argument('--records_per_shard', type=int, default=1000)
  parser.add_argument('--max_image_pixels', type=int, default=image_ops.MAX_IMAGE_PIXELS,
                      help='skip images with more pixels (default 8192*8192, as '
                           'config.data.max_image_pixels)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  summary = benchmarks.convert(args.name, args.manual_dir, args.out, seed=args.seed,
                               licence=args.licence, records_per_shard=args.records_per_shard,
                               max_image_pixels=args.max_image_pixels)
  print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == '__main__':
  main()
