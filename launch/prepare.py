"""The one-process step before a job: generated data, the workdir's tokenizer, provenance.json.

  python launch/prepare.py --config=FILE[:ARG] --workdir=DIR [--swept=f1,f2] [--config.F=V ...]

Every launcher runs it once (one process, no accelerator) before the trainer's processes start,
so that those find the data and tokenizer ready instead of racing to make them (see
common.prepare). provenance.json records the config hash, the overrides, the git commit, package
versions and the hash of the data sources' dataset_info.json files. Prints it as one JSON line.
"""
import argparse
import json
import os
import pathlib
import sys

if __name__ == '__main__':  # before jax loads: preparing needs no accelerator, and must not
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # hold the TPU the trainer is about to open
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from launch import common  # noqa: E402


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  common.add_job_args(parser)
  parser.add_argument('--swept', default='', help='Comma-separated fields a sweep chose.')
  args, overrides = common.parse_args(parser, argv)
  job = common.Job(args.config, args.workdir, overrides,
                   tuple(f for f in args.swept.split(',') if f))
  if args.dry_run:
    print(common.render([common.Command(common.prepare_argv(job, sys.executable))]))
    return 0
  from skymoe_jax.train import trainer  # pylint: disable=g-import-not-at-top
  trainer.quiet_library_logs()
  print(json.dumps(common.prepare(job)))
  return 0


if __name__ == '__main__':
  sys.exit(main())
