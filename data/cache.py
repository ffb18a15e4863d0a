"""The on-disk cache shared by trained tokenizers and token arrays: location, keys, atomic writes, locks."""

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator


def cache_root(cache_dir: str) -> str:
  """`config.data.cache_dir`, or $XDG_CACHE_HOME/kiln, or ~/.cache/kiln."""
  if cache_dir:
    return os.path.abspath(os.path.expanduser(cache_dir))
  xdg = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
  return os.path.join(xdg, "kiln")


def content_hash(description: object) -> str:
  """A stable key for a JSON-able description (dict order does not matter)."""
  text = json.dumps(description, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:24]


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      digest.update(block)
  return digest.hexdigest()


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
  """Serializes builders of one cache entry across processes on a host (or a shared file system)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "a") as handle:
    fcntl.flock(handle, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(handle, fcntl.LOCK_UN)


def write_file_atomically(path: str, data: bytes) -> None:
  """Readers see the whole file or none of it, even if this process dies half way."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  handle, tmp_path = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
  try:
    with os.fdopen(handle, "wb") as f:
      f.write(data)
    os.replace(tmp_path, path)
  except BaseException:
    os.unlink(tmp_path)
    raise
