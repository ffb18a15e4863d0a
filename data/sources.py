"""Where documents come from: the default corpus, user files, optionally a Hugging Face dataset.

A corpus is an ordered sequence of documents. Each has a stable `key`: its path relative to the root of the
glob that found it (the standard library's root for the default corpus), plus `:<line>` or `:<row>` when a
file holds many documents. The key, not the location on disk, decides the held-out split, so moving a
corpus (or reinstalling Python elsewhere) moves no document between train and eval.

Formats are chosen by extension: `.jsonl`/`.json` hold one JSON object per line whose `data.text_field` is a
document; `.parquet` holds one document per row of the `data.text_field` column; any other file is one
document of plain text. Texts are kept verbatim (no newline translation, no stripping).
"""

import codecs
import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import pathlib
import sysconfig
from collections.abc import Callable, Iterator

from data.errors import DataError

_log = logging.getLogger(__name__)

_TEXT, _JSONL, _PARQUET = "text", "jsonl", "parquet"
_FORMAT_BY_SUFFIX = {".jsonl": _JSONL, ".json": _JSONL, ".parquet": _PARQUET}
# Test packages stay in the default corpus: they more than double it (31 MB instead of 12 MB of Python, about
# 1,800 files) and the first run (tokenizer training + tokenization) still takes only seconds on 2 cores.
_STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_INVALID_UTF8_POLICIES = ("replace", "skip")


@dataclasses.dataclass(frozen=True)
class Document:
  key: str
  # Reads the text on demand, so a process opens only the files of its own shard. None: the document is left
  # out (not valid UTF-8 under `invalid_utf8=skip`).
  read: Callable[[], str | None]


@dataclasses.dataclass(frozen=True)
class _SourceFile:
  path: str
  key: str
  fmt: str


def unit_hash(salt: str, key: str) -> float:
  """A uniform number in [0, 1) that depends only on (salt, key): the same on every machine and run."""
  digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def is_held_out(key: str, eval_fraction: float) -> bool:
  return unit_hash("eval", key) < eval_fraction


class Corpus:
  """The documents that `config.data` names, in a deterministic order, read lazily."""

  def __init__(self, data_cfg) -> None:
    self._text_field = data_cfg.text_field
    self._invalid_utf8 = data_cfg.invalid_utf8
    if self._invalid_utf8 not in _INVALID_UTF8_POLICIES:
      raise DataError(f"data.invalid_utf8={self._invalid_utf8!r} is not a policy; use 'replace' or 'skip'")
    self._hf_dataset = data_cfg.hf_dataset
    self._hf_split = data_cfg.hf_split
    self._uses_default = not data_cfg.files and not data_cfg.hf_dataset
    if self._uses_default:
      self._root = sysconfig.get_paths()["stdlib"]
      self._files = _stdlib_files(self._root)
      self.description = f"the Python standard library at {self._root}"
    else:
      self._files = _expand_globs(data_cfg.files)
      parts = [f"data.files={data_cfg.files!r}"] if data_cfg.files else []
      parts += [f"data.hf_dataset={self._hf_dataset!r}"] if self._hf_dataset else []
      self.description = " + ".join(parts)
    self._invalid_utf8_files: list[str] = []

  @functools.cached_property
  def total_file_bytes(self) -> int:
    return sum(os.path.getsize(f.path) for f in self._files)

  @property
  def has_unknown_size(self) -> bool:
    return bool(self._hf_dataset)

  def identity(self) -> dict:
    """Everything the documents depend on, for cache keys: files with sizes and mtimes, and read settings."""
    files = []
    for f in self._files:
      stat = os.stat(f.path)
      files.append([os.path.abspath(f.path), f.key, f.fmt, stat.st_size, stat.st_mtime_ns])
    # A Hugging Face dataset is identified by name only: a new upstream revision is not noticed.
    hf = [self._hf_dataset, self._hf_split] if self._hf_dataset else None
    return {
      "files": files,
      "hf": hf,
      "text_field": self._text_field,
      "invalid_utf8": self._invalid_utf8,
    }

  def documents(self) -> Iterator[Document]:
    for f in self._files:
      if f.fmt == _TEXT:
        yield Document(f.key, functools.partial(self._read_text_file, f.path))
      elif f.fmt == _JSONL:
        yield from self._jsonl_documents(f)
      else:
        yield from self._parquet_documents(f)
    if self._hf_dataset:
      yield from self._hf_documents()

  def report_invalid_utf8(self) -> None:
    """Logs one warning line for the files read since the last report that were not valid UTF-8."""
    if not self._invalid_utf8_files:
      return
    action = "decoded with U+FFFD for bad bytes" if self._invalid_utf8 == "replace" else "left out"
    _log.warning(
      "%d file(s) not valid UTF-8 were %s (data.invalid_utf8=%s), e.g. %s",
      len(self._invalid_utf8_files),
      action,
      self._invalid_utf8,
      self._invalid_utf8_files[0],
    )
    self._invalid_utf8_files = []

  def _decode(self, data: bytes, path: str) -> str | None:
    try:
      return data.decode("utf-8")
    except UnicodeDecodeError:
      if path not in self._invalid_utf8_files:
        self._invalid_utf8_files.append(path)
      return data.decode("utf-8", errors="replace") if self._invalid_utf8 == "replace" else None

  def _read_text_file(self, path: str) -> str | None:
    with open(path, "rb") as f:
      return self._decode(f.read(), path)

  def _jsonl_documents(self, f: _SourceFile) -> Iterator[Document]:
    if self._invalid_utf8 == "skip" and not _is_valid_utf8(f.path):
      self._invalid_utf8_files.append(f.path)
      return
    with open(f.path, "rb") as lines:
      for line_number, raw in enumerate(lines, start=1):
        if raw.strip():
          line = self._decode(raw, f.path)
          yield Document(f"{f.key}:{line_number}", functools.partial(self._jsonl_text, f.path, line_number, line))

  def _jsonl_text(self, path: str, line_number: int, line: str) -> str:
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(f"{path}:{line_number}: not valid JSON ({e.msg}); fix or remove the line") from None
    if not isinstance(record, dict) or self._text_field not in record:
      raise DataError(
        f"{path}:{line_number}: no {self._text_field!r} field; set data.text_field to the field holding the text"
      )
    text = record[self._text_field]
    if not isinstance(text, str):
      raise DataError(
        f"{path}:{line_number}: field {self._text_field!r} is a {type(text).__name__}, not a string; "
        "set data.text_field to the field holding the text"
      )
    return text

  def _parquet_documents(self, f: _SourceFile) -> Iterator[Document]:
    import pyarrow.parquet  # only Parquet corpora pay for the import

    try:
      parquet_file = pyarrow.parquet.ParquetFile(f.path)
    except Exception as e:  # pyarrow raises several types for a damaged or foreign file
      raise DataError(f"{f.path}: not a readable Parquet file ({e}); fix or remove it from data.files") from None
    columns = parquet_file.schema_arrow.names
    if self._text_field not in columns:
      raise DataError(
        f"{f.path}: no column {self._text_field!r} (columns: {', '.join(columns)}); "
        "set data.text_field to the column holding the text"
      )
    row = 0
    for batch in parquet_file.iter_batches(columns=[self._text_field], batch_size=1024):
      for value in batch.column(0).to_pylist():
        if isinstance(value, bytes):
          value = self._decode(value, f.path)
        elif value is not None and not isinstance(value, str):
          raise DataError(
            f"{f.path}: column {self._text_field!r} holds {type(value).__name__} values, not text; "
            "set data.text_field to the column holding the text"
          )
        if value is not None:
          yield Document(f"{f.key}:{row}", functools.partial(str, value))
        row += 1

  def _hf_documents(self) -> Iterator[Document]:
    """Streams `data.hf_dataset` (split `data.hf_split`) with the `datasets` package, needing network access.

    Each example's `data.text_field` is one document, keyed by its index. Optional: `datasets` is imported
    only here, and is not a dependency of the project.
    """
    try:
      import datasets
    except ImportError:
      raise DataError(
        f"data.hf_dataset={self._hf_dataset!r} needs the `datasets` package; pip install datasets"
      ) from None
    examples = datasets.load_dataset(self._hf_dataset, split=self._hf_split, streaming=True)
    for index, example in enumerate(examples):
      text = example.get(self._text_field)
      if not isinstance(text, str):
        raise DataError(
          f"{self._hf_dataset} ({self._hf_split}) example {index}: no string field {self._text_field!r}; "
          "set data.text_field"
        )
      yield Document(f"hf:{self._hf_dataset}/{self._hf_split}/{index}", functools.partial(str, text))


def _stdlib_files(root: str) -> list[_SourceFile]:
  files = []
  for directory, subdirectories, names in os.walk(root):
    subdirectories[:] = [d for d in subdirectories if d not in _STDLIB_SKIPPED_DIRS]
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        files.append(_SourceFile(path, pathlib.PurePath(os.path.relpath(path, root)).as_posix(), _TEXT))
  return sorted(files, key=lambda f: f.key)


def _has_wildcard(text: str) -> bool:
  return any(c in text for c in "*?[")


def _glob_root(pattern: str) -> str:
  """The directory a glob starts from: its components before the first wildcard."""
  parts = pathlib.PurePath(pattern).parts
  fixed = []
  for part in parts[:-1]:
    if _has_wildcard(part):
      break
    fixed.append(part)
  return str(pathlib.PurePath(*fixed)) if fixed else "."


def _expand_globs(patterns: str) -> list[_SourceFile]:
  files, seen = [], set()
  for pattern in (p.strip() for p in patterns.split(",")):
    if not pattern:
      continue
    pattern = os.path.expanduser(pattern)
    if _has_wildcard(pattern):
      paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
      if not paths:
        raise DataError(
          f"data.files: {pattern!r} matches no files; fix the glob (relative globs start at {os.getcwd()})"
        )
      root = _glob_root(pattern)
    elif os.path.isdir(pattern):
      raise DataError(f"data.files: {pattern!r} is a directory; name its files with a glob like '{pattern}/**/*.txt'")
    elif not os.path.exists(pattern):
      raise DataError(f"data.files: no such file {pattern!r}; fix the path, or leave data.files empty for the default")
    else:
      paths, root = [pattern], os.path.dirname(pattern) or "."
    for path in paths:
      real_path = os.path.realpath(path)
      if real_path not in seen:  # a file matched by two globs is still one document
        seen.add(real_path)
        key = pathlib.PurePath(os.path.relpath(path, root)).as_posix()
        files.append(_SourceFile(path, key, _FORMAT_BY_SUFFIX.get(pathlib.PurePath(path).suffix.lower(), _TEXT)))
  return files


def _is_valid_utf8(path: str) -> bool:
  decoder = codecs.getincrementaldecoder("utf-8")()
  try:
    with open(path, "rb") as f:
      for block in iter(lambda: f.read(1 << 20), b""):
        decoder.decode(block)
      decoder.decode(b"", final=True)
  except UnicodeDecodeError:
    return False
  return True
