"""Paths that are local or URLs (gs://, and whatever else etils.epath reaches), through one abstraction.

The run directory, the data files, the tokenizer, the cache dir and `checkpoint.init_from` all go through
`etils.epath.Path` (data/ and trainer/ both use this module), so `--workdir gs://bucket/run` works like a
local directory. A URL is checked once at start-up, before anything is built
or created: one that cannot be reached (no credentials, no network, no bucket) is one line naming it.
"""

import logging
import os
import re
import threading
import uuid

from etils import epath

# Seconds a URL gets to answer the start-up probe. Cloud clients retry for longer than a user should wait on
# a misspelt bucket or a missing network (gcsfs: about 35 s), so the probe gives up first.
_PROBE_TIMEOUT_S = float(os.environ.get("KILN_STORAGE_TIMEOUT_S", "30"))


_WEIGHT_PREFIX = re.compile(r"^(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?:")

_CLIENT_LOGGERS = ("gcsfs", "google", "google.auth", "fsspec", "s3fs", "aiobotocore", "adlfs")


class StorageError(ValueError):
  """A path or URL that cannot be used, in the user's terms."""


def is_url(path: str | os.PathLike) -> bool:
  return "://" in str(path)


def as_path(path: str | os.PathLike) -> epath.Path:
  """A URL as it is; a local path with ~ expanded and made absolute (a later chdir does not move it)."""
  if is_url(path):
    return epath.Path(str(path))
  return epath.Path(os.path.abspath(os.path.expanduser(str(path))))


def read_range(path: str | os.PathLike, start: int, end: int) -> bytes:
  """Bytes [start, end) of a file: one ranged request for a URL (fsspec's `cat_file`), a seek for a local path."""
  if end <= start:
    return b""
  if is_url(path):
    import fsspec  # the file systems etils.epath reaches URLs through

    fs, inner = fsspec.core.url_to_fs(str(path))
    return fs.cat_file(inner, start=start, end=end)
  with open(path, "rb") as f:
    f.seek(start)
    return f.read(end - start)


def rename(source: epath.Path, target: epath.Path) -> None:
  """Moves a file onto `target`. In an object store, a server-side copy then a delete: what a rename costs there
  anyway, without gcsfs's first try of the newer moveTo API, which it retries for about 34 s where a server lacks
  it (the GCS emulator of the tests answers 501)."""
  if not is_url(source):
    source.replace(target)
    return
  import fsspec

  fs, inner = fsspec.core.url_to_fs(str(source))
  fs.copy(inner, fs._strip_protocol(str(target)))
  fs.rm(inner)


def _fixed_prefix(pattern: str) -> str:
  """The part of a glob before its first wildcard component: what must exist for the glob to match."""
  parts = pattern.split("/")
  for i, part in enumerate(parts):
    if any(c in part for c in "*?["):
      return "/".join(parts[:i])
  return pattern


def _probe(path: epath.Path, writable: bool) -> None:
  if writable:
    marker = path / f".kiln-write-test-{uuid.uuid4().hex[:8]}"
    marker.write_text("ok")
    marker.unlink()
  elif not path.exists():
    raise FileNotFoundError("nothing there")


def _probe_within(target: epath.Path, writable: bool, timeout_s: float) -> list[BaseException | None]:
  """[] if the probe did not finish in time, [None] if it passed, [error] if it failed."""
  outcome: list[BaseException | None] = []

  def run():
    try:
      _probe(target, writable)
      outcome.append(None)
    except BaseException as e:  # noqa: BLE001 (reported by the caller, in one line)
      outcome.append(e)

  # Cloud clients log each failed attempt as a warning; the caller reports the outcome in one line instead.
  quiet = [logging.getLogger(name) for name in _CLIENT_LOGGERS]
  levels = [logger.level for logger in quiet]
  for logger in quiet:
    logger.setLevel(logging.CRITICAL)
  try:
    # A daemon thread: a client stuck in retries must not keep the process alive after the error.
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout_s)
  finally:
    for logger, level in zip(quiet, levels):
      logger.setLevel(level)
  return outcome


def check_urls(named_paths: list[tuple[str, str, bool]], timeout_s: float = _PROBE_TIMEOUT_S) -> None:
  """Probes each (name, path, writable) whose path is a URL: writable ones by writing and deleting a small
  marker object, others by checking that they (or a glob's fixed prefix) exist. Local paths are checked where
  they are used. Raises StorageError naming the first that fails or does not answer within `timeout_s`."""
  for name, paths, writable in named_paths:
    for path in (p.strip() for p in paths.split(",")) if name == "config.data.files" else [paths]:
      path = _WEIGHT_PREFIX.sub("", path) if name == "config.data.files" else path  # a mixture's WEIGHT:GLOB
      if not path or not is_url(path):
        continue
      outcome = _probe_within(as_path(_fixed_prefix(path)), writable, timeout_s)
      fix = "check the URL, your credentials and network access, or use a local path"
      if not outcome:
        raise StorageError(f"{name}={path} did not answer within {timeout_s:.0f} s; {fix}")
      if outcome[0] is not None:
        error = outcome[0]
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        if isinstance(error, ImportError):
          fix = f"install the client for this scheme ({reason})"
        raise StorageError(f"{name}={path} cannot be reached ({type(error).__name__}: {reason}); {fix}")
