"""The one-process step before a job: generated data, the workdir's tokenizer, provenance.json.

  python launch/prepare.py --config=FILE[:ARG] --workdir=DIR [--swept=f1,f2] [--config.F=V ...]
  python launch/prepare.py --config=configs/my_pod.py:stage1 --workdir=gs://my-bucket/runs/stage1

Every launcher runs it once (one process, no accelerator) before the trainer's processes start,
so that those find the data and tokenizer ready instead of racing to make them (see prepare).
provenance.json records the config hash, the overrides, the git commit, package versions and
the hash of the data sources' dataset_info.json files. Prints it as one JSON line.
"""
import argparse
import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import socket
import sys
from typing import Dict

import jax

from skymoe_jax import config as config_lib
from skymoe_jax import storage
from skymoe_jax import workdir as workdir_lib
from skymoe_jax.data import records
from skymoe_jax.data import sources
from skymoe_jax.jobs import common

# Recorded in provenance.json when installed.
PACKAGES = ('skymoe_jax', 'jax', 'jaxlib', 'libtpu', 'jax-cuda12-plugin', 'flax', 'optax',
            'orbax-checkpoint', 'ml_collections', 'numpy', 'tensorflow-cpu', 'tensorflow',
            'tensorflow-datasets', 'sentencepiece', 'clu')


def config_hash(config) -> str:
  """sha256 of the resolved config as sorted JSON: equal hashes, equal runs (given equal code)."""
  text = config.to_json_best_effort(sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()


def package_versions() -> Dict:
  versions = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      pass
  return versions


def source_dirs(config) -> Dict[str, str]:
  """Each data source's folder, generated sources included (where the trainer will put them)."""
  dirs = {}
  for name, source in config.data.sources.items():
    generated = source.get('generate', '') == 'synthetic'
    dirs[name] = str(sources.synthetic_dir(config) if generated else source.data_dir)
  return dirs


def data_manifest(config) -> Dict:
  """Hashes of the sources' tfds dataset_info.json + metadata.json (None for a source not made
  yet), and of all of them.

  dataset_info.json lists every split's shards with their record counts and bytes, metadata.json
  the builder's settings and skip counts, so the hash changes whenever the data does, without
  reading the records. Folders may be bucket URLs.
  """
  manifest = {}
  for name, folder in sorted(source_dirs(config).items()):
    info = storage.path(folder) / records.INFO_FILE
    digest = None
    if info.exists():
      h = hashlib.sha256(info.read_bytes())
      meta = info.parent / 'metadata.json'
      if meta.exists():
        h.update(meta.read_bytes())
      digest = h.hexdigest()
    manifest[name] = {'data_dir': folder, 'info_sha256': digest}
  joined = json.dumps({n: s['info_sha256'] for n, s in manifest.items()}, sort_keys=True)
  return {'hash': hashlib.sha256(joined.encode()).hexdigest(), 'sources': manifest}


def provenance(job: common.Job, config) -> Dict:
  return {
      'config': job.config,
      'config_hash': config_hash(config),
      'overrides': common.override_texts(job.overrides),
      'swept': list(job.swept),
      'total_steps': int(config.train.total_steps),
      'git': common.git_info(),
      'packages': package_versions(),
      'data_manifest': data_manifest(config),
      'host': socket.gethostname(),
      'written': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
  }


def prepare(job: common.Job) -> Dict:
  """The one-process step before a job: data, tokenizer and provenance.json in the workdir.

  Every process of a multi-process run reads the generated data and the workdir's tokenizer,
  but the trainer makes them on process 0 only (data) or on each process (tokenizer) without
  waiting for the others; made here first, every process finds them ready. Needs no
  accelerator. Returns the provenance written.
  """
  config = config_lib.load(job.config, job.overrides)
  workdir = workdir_lib.resolve(job.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  resolved = config.copy_and_resolve_references()  # resolve_sources fills in data_dir
  sources.resolve_sources(resolved)
  workdir_lib.prepare_tokenizer(resolved, workdir)
  record = provenance(job, config)
  previous = common.read_json(workdir / common.PROVENANCE_FILE)
  if previous and previous.get('config_hash') != record['config_hash']:
    record['previous_config_hash'] = previous.get('config_hash')  # e.g. total_steps raised
  storage.write_text_atomically(workdir / common.PROVENANCE_FILE,
                                json.dumps(record, indent=1) + '\n')
  return record


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  common.add_job_args(parser)
  parser.add_argument('--swept', default='', help='Comma-separated fields a sweep chose.')
  args, overrides = common.parse_args(parser, argv)
  job = common.Job(args.config, args.workdir, overrides,
                   tuple(f for f in args.swept.split(',') if f))
  if args.dry_run:
    print(common.render([common.Command(common.prepare_argv(job, sys.executable))]))
    return 0
  if 'JAX_PLATFORMS' not in os.environ:
    # Preparing needs no accelerator, and must not hold the TPU the trainer is about to open.
    # (jax reads the platform when it first starts a backend, not at import.)
    jax.config.update('jax_platforms', 'cpu')
  print(json.dumps(prepare(job)))
  return 0
