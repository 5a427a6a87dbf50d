"""Renders the synthetic aerial-scene dataset (tfds builder skymoe_synthetic) into DIR.

  python data_prep/make_synthetic.py --out=DIR --num_images=N --seed=S \
      [--image_size=128] [--val_fraction=0.2] \
      [--object_scale=1.0 --max_objects=8 --scene_mix=0.0 --local_questions=1]

The last four are the generator's difficulty (synthetic.Difficulty; configs/demo.py's values
make the benchmark of docs/results.md).

DIR becomes the dataset's tfds version folder (the data_dir a config's source names); an older
synthetic dataset there is replaced once the new one is complete. The same dataset from tfds:
  tfds build skymoe_synthetic/n2000-s0-i128-v0.1 --imports=skymoe_jax.data.builders --data_dir=D
(the configs listed in data/builders.py; any other params through this command).
The last stdout line is the JSON summary (images and records per split, samples per task and per
granularity, `out`), so scripts can read it with `tail -n 1`.
"""
import argparse
import json

from skymoe_jax.data import synthetic


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='dataset folder to write (replaced if present)')
  parser.add_argument('--num_images', type=int, required=True)
  parser.add_argument('--seed', type=int, required=True)
  parser.add_argument('--image_size', type=int, default=128)
  parser.add_argument('--val_fraction', type=float, default=0.2)
  default = synthetic.Difficulty()
  for field in synthetic.Difficulty._fields:
    parser.add_argument(f'--{field}', type=type(getattr(default, field)),
                        default=getattr(default, field))
  args = parser.parse_args(argv)
  difficulty = synthetic.Difficulty(*(getattr(args, f) for f in synthetic.Difficulty._fields))
  summary = synthetic.generate(args.out, args.num_images, args.seed, args.image_size,
                               args.val_fraction, difficulty)
  print(json.dumps(summary, sort_keys=True), flush=True)


if __name__ == '__main__':
  main()
