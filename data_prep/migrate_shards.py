"""Migrates a dataset of the old TFRecord-shard format into a tfds dataset (ArrayRecord), once.

  python data_prep/migrate_shards.py --old=OLD_DIR --out=DIR

OLD_DIR holds dataset_info.json and <split>-NNNNN.tfrecord shards (what data_prep/ wrote before
the tfds builders); DIR becomes the tfds version folder of builder skymoe_migrated with the same
records in the same order, byte for byte (the image bytes included), the old licence, and the
old name, settings and skip counts in its metadata (`migrated_from`, `old_skipped`). A record of
the old shards that does not decode is skipped and counted (unreadable_record). Readers refuse the
old format and name this command. Rebuilding from the sources with their data_prep/ command gives
the same records too, when the sources are at hand.
The last stdout line is the JSON summary ({"written", "skipped", "splits", "out", ...}).
"""
import argparse
import json
import logging

from skymoe_jax import storage
from skymoe_jax.data import builders


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--old', required=True, help='folder of the old shard format')
  parser.add_argument('--out', required=True, help='tfds version folder to write')
  args = parser.parse_args(argv)
  logging.basicConfig(level=logging.INFO, format='%(levelname)s %(name)s: %(message)s')
  old = json.loads((storage.path(args.old) / 'dataset_info.json').read_text())
  summary = builders.build_at(args.out, 'migrated', args.old, licence=old.get('licence', ''))
  print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == '__main__':
  main()
