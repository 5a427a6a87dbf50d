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
import contextlib
import os
import shutil
import tempfile
from typing import Iterator, Union

from etils import epath

PathLike = Union[str, os.PathLike]
REMOTE_SCHEMES = ('gs://', 's3://')


def path(p: PathLike) -> epath.Path:
  """p as an epath.Path; `~` expanded for local paths, URLs kept as they are."""
  text = os.fspath(p)
  if not is_remote(text):
    text = os.path.expanduser(text)
  return epath.Path(text)


def resolve(p: PathLike) -> epath.Path:
  """path(p), and for a local path absolute with symlinks resolved (a URL is already absolute)."""
  out = path(p)
  return out if is_remote(out) else out.resolve()


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


def append_text(p: PathLike, text: str) -> None:
  """Adds text to the end of a file (made if missing). Locally an O_APPEND write, as before; a
  bucket object cannot grow, so there it is read and written again whole (one writer per file:
  process 0 of one trainer, which TrainerLock guarantees)."""
  target = path(p)
  if not is_remote(target):
    with open(target, 'a') as f:
      f.write(text)
    return
  old = target.read_text() if target.exists() else ''
  target.write_text(old + text)


def copy_file(source: PathLike, target: PathLike) -> None:
  """source's bytes into target, either of them local or in a bucket (target written whole)."""
  src, dst = path(source), path(target)
  if not is_remote(src) and not is_remote(dst):
    shutil.copyfile(src, dst)
    return
  dst.write_bytes(src.read_bytes())


def copy_tree(source: PathLike, target: PathLike) -> None:
  """Every file under source into the same relative place under target (made as needed)."""
  src, dst = path(source), path(target)
  dst.mkdir(parents=True, exist_ok=True)
  for item in sorted(src.iterdir()):
    if item.is_dir():
      copy_tree(item, dst / item.name)
    else:
      copy_file(item, dst / item.name)


@contextlib.contextmanager
def local_folder(p: PathLike, *, read: bool = True, write: bool = False) -> Iterator[epath.Path]:
  """A local folder standing for p, for libraries that take only local files (transformers,
  safetensors' mmap, a torch load). A local p is itself; for a URL, a temporary folder holding
  a copy of p's files (read) whose files are copied back to p on a clean exit (write), then
  deleted."""
  if not is_remote(p):
    yield path(p)
    return
  remote = path(p)
  with tempfile.TemporaryDirectory(prefix='skymoe_stage_') as tmp:
    local = epath.Path(tmp)
    if read and remote.is_dir():
      copy_tree(remote, local)
    yield local
    if write:
      copy_tree(local, remote)
