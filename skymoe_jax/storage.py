"""Paths the project reads and writes, local folders and bucket URLs alike.

Every workdir, data folder, tokenizer file and export folder may be a local path or a URL that
etils' `epath` handles: `gs://bucket/run` on a TPU pod (as MaxText and big_vision users run),
`s3://...` where the fsspec backend for it is installed. `epath` reaches GCS through
`tf.io.gfile` when TensorFlow is installed (it is, here), or through fsspec/gcsfs with
`EPATH_USE_TF=false` (what the tests use against a local GCS emulator: TensorFlow's GCS client
cannot be pointed at one). Orbax writes checkpoint arrays through tensorstore and tfds' ArrayRecord
files are read by array_record's own GCS client; both take the same URLs.

This is the project's lowest layer beside registry.py: every module may use it.
"""
import os
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]
REMOTE_SCHEMES = ('gs://', 's3://')


def path(p: PathLike) -> epath.Path:
  """p as an epath.Path; `~` expanded for local paths, URLs kept as they are."""
  text = os.fspath(p)
  if not is_remote(text):
    text = os.path.expanduser(text)
  return epath.Path(text)


def is_remote(p: PathLike) -> bool:
  """True for a bucket URL (gs://, s3://), False for a local path."""
  return os.fspath(p).startswith(REMOTE_SCHEMES)


def write_text_atomically(p: PathLike, text: str) -> None:
  """Writes a whole file so that a reader sees the old content or the new, never half of it.

  Locally: a temporary file beside it, then os.replace. In a bucket an object becomes visible only
  when its upload completes, so a direct write already has that property (and a rename there is a
  copy plus a delete, not atomic).
  """
  write_bytes_atomically(p, text.encode('utf-8'))


def write_bytes_atomically(p: PathLike, data: bytes) -> None:
  target = path(p)
  if is_remote(target):
    target.write_bytes(data)
    return
  tmp = target.with_name(f'.{target.name}.{os.getpid()}.tmp')
  tmp.write_bytes(data)
  os.replace(tmp, target)
