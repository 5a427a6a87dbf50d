"""Builds a remote-sensing evaluation source from its published file layout as a tfds dataset.

  python data_prep/convert_benchmark.py --name=NAME --manual_dir=DIR --out=DIR [--seed=0] \
      [--licence=...] [--max_image_pixels=67108864]
  python data_prep/convert_benchmark.py --name=NAME --manual_dir=DIR --data_dir=DIR ...

A thin wrapper over skymoe_jax/data/builders.py: the same as
`tfds build skymoe_NAME --imports=skymoe_jax.data.builders --manual_dir=DIR --data_dir=DIR`.
NAME is one of skymoe_jax/data/convert/benchmarks.py's SOURCES (ucmerced, nwpu_resisc45, aid,
whu_rs19, rsvqa_lr, rsvqa_hr, dior_rsvg, ucm_captions, sydney_captions, rsicd, nwpu_captions,
dota_v2_counting, hrrsd_counting, rsod_counting); that module's docstring gives each layout.
--out is the dataset folder itself (a tfds version folder, replaced only once the new one is
complete); --data_dir is tfds' root instead (the dataset lands in DATA_DIR/skymoe_NAME/1.0.0).
Either may be a bucket URL. Nothing is downloaded: a missing file is an error naming the expected
path. The last stdout line is the JSON summary ({"written", "skipped": {reason: count}, "splits",
"out", "name", ...}).
"""
import argparse
import json
import logging

from skymoe_jax.data import builders
from skymoe_jax.data import image_ops
from skymoe_jax.data.convert import benchmarks


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--name', required=True, choices=sorted(benchmarks.SOURCES))
  parser.add_argument('--manual_dir', required=True, help='where the dataset files were placed')
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument('--out', help='dataset (tfds version) folder to write')
  where.add_argument('--data_dir', help="tfds' data_dir: writes DATA_DIR/skymoe_NAME/VERSION")
  parser.add_argument('--seed', type=int, default=0,
                      help='seed of the stratified split (datasets without an official split) '
                           'and of the counting sets\' absent-class questions')
  parser.add_argument('--licence', default=None, help='override the recorded licence')
  parser.add_argument('--max_image_pixels', type=int, default=image_ops.MAX_IMAGE_PIXELS,
                      help='skip images with more pixels (default 8192*8192, as '
                           'config.data.max_image_pixels)')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  options = dict(seed=args.seed, licence=args.licence, max_image_pixels=args.max_image_pixels)
  if args.out is not None:
    summary = builders.build_at(args.out, args.name, args.manual_dir, **options)
  else:
    summary = builders.build(args.name, args.manual_dir, args.data_dir, **options)
  print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == '__main__':
  main()
