"""The on-disk cache shared by trained tokenizers and token arrays: location, keys, atomic writes, locks.

The cache dir may be local or a URL (gs://...); all access goes through etils.epath. Only a local dir is
locked (fcntl): in a remote one every entry has one builder and appears whole through a rename.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
from collections.abc import Iterator

from etils import epath

import storage


def cache_root(cache_dir: str) -> epath.Path:
  """`config.data.cache_dir`, or $XDG_CACHE_HOME/kiln, or ~/.cache/kiln."""
  if cache_dir:
    return storage.as_path(cache_dir)
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  return epath.Path(xdg) / "kiln"


def content_hash(description: object) -> str:
  """A stable key for a JSON-able description (dict order does not matter)."""
  text = json.dumps(description, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def file_sha256(path) -> str:
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path) -> Iterator[None]:
  """Serializes builders of one local cache entry across processes on a host (or a shared file system)."""
  if storage.is_url(path):
    yield
    return
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def staged(path) -> Iterator[epath.Path]:
  """A staging path beside `path`, renamed onto it when the block ends: readers see the whole file or none."""
  path = epath.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  staging = path.parent / f".staging-{uuid.uuid4().hex}-{path.name}"
  try:
    yield staging
    storage.rename(staging, path)
  except BaseException:
    if staging.exists():
      staging.unlink()
    raise


def write_file_atomically(path, data: bytes) -> None:
  """Readers see the whole file or none of it, even if this process dies half way."""
  with staged(path) as staging:
    staging.write_bytes(data)
