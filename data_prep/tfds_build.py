"""`tfds build` for the project's builders (skymoe_jax/data/builders.py), with no apache_beam.

  python data_prep/tfds_build.py build skymoe_ucmerced --manual_dir=DIR --data_dir=OUT
  python data_prep/tfds_build.py build skymoe_synthetic/n2000-s0-i128-v0.1 --data_dir=OUT

Takes exactly the flags of `tfds build`: it runs tensorflow_datasets' own build command with the
builders registered. Why not the `tfds` script itself: tensorflow-datasets 4.9.10's script imports
apache_beam and mlcroissant when it starts, and apache-beam pins protobuf < 7, which the export
extra's transformers cannot load with. Where they are installed (the `data` extra, in a venv of
its own), `tfds build NAME --imports=skymoe_jax.data.builders ...` is the same command.
"""
import sys

from absl import app
from tensorflow_datasets.scripts.cli import build as build_cli
from tensorflow_datasets.scripts.cli import cli_utils

from skymoe_jax.data import builders  # noqa: F401  (registers the skymoe_* builders)


def main(argv=None) -> None:
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] != 'build':
    raise SystemExit('usage: python data_prep/tfds_build.py build NAME [tfds build flags]')
  parse = cli_utils.make_flags_parser(build_cli.Args, description='tfds build, skymoe builders')
  app.run(lambda args: args.execute(), argv=[argv[0]] + argv[2:], flags_parser=parse)


if __name__ == '__main__':
  main()
