"""Where documents come from: the default corpus, user files, optionally a Hugging Face dataset.

A corpus is an ordered sequence of documents. Each has a stable `key`: its path relative to the root of the
glob that found it (the standard library's root for the default corpus), plus `@<byte offset>` of the line
for a JSONL document or `:<row>` for a Parquet one. The key, not the location of the file, decides the
held-out split, so moving a corpus (or reinstalling Python elsewhere) moves no document between train and eval.

Formats are chosen by extension: `.jsonl`/`.json` hold one JSON object per line whose `data.text_field` is a
document; `.parquet` holds one document per row of the `data.text_field` column; any other file is one
document of plain text. Texts are kept verbatim (no newline translation, no stripping).

The corpus is cut into work units that depend on the files alone, never on the number of processes: runs of
consecutive text files of about `data.unit_bytes`, byte ranges of that size of a JSONL file (a line belongs
to the range its first byte is in), single Parquet row groups, one unit for a Hugging Face dataset. Reading a
unit opens only its files, byte range or row group. The units in order, each's documents in order, are the
corpus order. Paths may be local or URLs such as gs://bucket/dir/*.jsonl (through etils.epath).

A weighted mixture names its sources as `WEIGHT:GLOB` items ("0.7:web/*.parquet,0.3:code/*.jsonl"): `mixture`
splits it into sources, each a corpus of its own (its own units, cache and held-out split); the Corpus of the
whole config holds every source's files (what a tokenizer trains on), weights left out.
"""

import dataclasses
import fnmatch
import functools
import hashlib
import json
import logging
import os
import pathlib
import re
import sysconfig
from collections.abc import Callable, Iterator

from etils import epath

import storage
from data.errors import DataError

_log = logging.getLogger(__name__)

_TEXT, _JSONL, _PARQUET, _HF = "text", "jsonl", "parquet", "hf"
_FORMAT_BY_SUFFIX = {".jsonl": _JSONL, ".json": _JSONL, ".parquet": _PARQUET}
# Test packages stay in the default corpus: they more than double it (31 MB instead of 12 MB of Python, about
# 1,800 files) and the first run (tokenizer training + tokenization) still takes only seconds on 2 cores.
_STDLIB_SKIPPED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__"})
_INVALID_UTF8_POLICIES = ("replace", "skip")


@dataclasses.dataclass(frozen=True)
class Document:
  key: str
  # Reads the text on demand, so a process reads only what it tokenizes. None: the document is left out (not
  # valid UTF-8 under `invalid_utf8=skip`).
  read: Callable[[], str | None]


@dataclasses.dataclass(frozen=True)
class _SourceFile:
  path: str  # local path or URL
  key: str
  fmt: str
  size: int
  mtime: int  # ns for local files; whatever resolution the remote store reports for URLs


@dataclasses.dataclass(frozen=True)
class Unit:
  """A piece of the corpus tokenized as a whole by one process: text files, a JSONL byte range, a row group."""

  index: int
  fmt: str
  files: tuple[_SourceFile, ...]
  begin: int = 0  # JSONL: byte range [begin, end); Parquet: row group `begin`, whose first row is `end`
  end: int = 0

  def identity(self) -> dict:
    """What the unit's documents depend on (with the corpus's read settings), for its cache key."""
    files = [[_location(f), f.key, f.size, f.mtime] for f in self.files]
    return {"fmt": self.fmt, "files": files, "range": [self.begin, self.end]}


def unit_hash(salt: str, key: str) -> float:
  """A uniform number in [0, 1) that depends only on (salt, key): the same on every machine and run."""
  digest = hashlib.sha256(f"{salt}\0{key}".encode()).digest()
  return int.from_bytes(digest[:8], "big") / 2.0**64


def eval_hash(key: str) -> float:
  """The number the held-out split compares with data.eval_fraction."""
  return unit_hash("eval", key)


class Corpus:
  """The documents that `config.data` names, in a deterministic order, read lazily, cut into work units."""

  def __init__(self, data_cfg) -> None:
    self._text_field = data_cfg.text_field
    self._invalid_utf8 = data_cfg.invalid_utf8
    if self._invalid_utf8 not in _INVALID_UTF8_POLICIES:
      raise DataError(f"data.invalid_utf8={self._invalid_utf8!r} is not a policy; use 'replace' or 'skip'")
    self._unit_bytes = int(data_cfg.unit_bytes)
    if self._unit_bytes < 1:
      raise DataError(f"data.unit_bytes={self._unit_bytes} must be at least 1; the default is {16 << 20}")
    self._hf_dataset = data_cfg.hf_dataset
    self._hf_split = data_cfg.hf_split
    self._uses_default = not data_cfg.files and not data_cfg.hf_dataset
    if self._uses_default:
      self._root = sysconfig.get_paths()["stdlib"]
      self._files = _stdlib_files(self._root)
      self.description = f"the Python standard library at {self._root}"
    else:
      sources = mixture(data_cfg.files)
      self._files = _expand_globs(",".join(s.files for s in sources) if sources else data_cfg.files)
      parts = [f"data.files={data_cfg.files!r}"] if data_cfg.files else []
      parts += [f"data.hf_dataset={self._hf_dataset!r}"] if self._hf_dataset else []
      self.description = " + ".join(parts)
    self._invalid_utf8_files: list[str] = []

  @property
  def total_file_bytes(self) -> int:
    return sum(f.size for f in self._files)

  @property
  def has_unknown_size(self) -> bool:
    return bool(self._hf_dataset)

  def read_settings(self) -> dict:
    """What every unit's documents depend on besides its files: part of each unit's cache key."""
    # A Hugging Face dataset is identified by name only: a new upstream revision is not noticed.
    hf = [self._hf_dataset, self._hf_split] if self._hf_dataset else None
    return {"hf": hf, "text_field": self._text_field, "invalid_utf8": self._invalid_utf8}

  def identity(self) -> dict:
    """Everything the documents depend on, for cache keys: files with sizes and mtimes, and read settings."""
    files = [[_location(f), f.key, f.fmt, f.size, f.mtime] for f in self._files]
    return {"files": files, **self.read_settings()}

  @functools.cached_property
  def units(self) -> tuple[Unit, ...]:
    units, texts, text_bytes = [], [], 0

    def add(fmt, files, begin=0, end=0):
      units.append(Unit(len(units), fmt, tuple(files), begin, end))

    for f in self._files:
      if f.fmt == _TEXT:
        texts.append(f)
        text_bytes += f.size
        if text_bytes >= self._unit_bytes:
          add(_TEXT, texts)
          texts, text_bytes = [], 0
        continue
      if texts:
        add(_TEXT, texts)
        texts, text_bytes = [], 0
      if f.fmt == _JSONL:
        for begin in range(0, f.size, self._unit_bytes):
          add(_JSONL, [f], begin, min(begin + self._unit_bytes, f.size))
      else:
        for group, first_row in enumerate(self._parquet_row_group_starts(f)):
          add(_PARQUET, [f], group, first_row)
    if texts:
      add(_TEXT, texts)
    if self._hf_dataset:
      add(_HF, [])
    return tuple(units)

  def documents(self, unit: Unit | None = None) -> Iterator[Document]:
    """The documents of one unit, or of the whole corpus, in corpus order."""
    if unit is None:
      for u in self.units:
        yield from self.documents(u)
    elif unit.fmt == _TEXT:
      for f in unit.files:
        yield Document(f.key, functools.partial(self._read_text_file, f.path))
    elif unit.fmt == _JSONL:
      yield from self._jsonl_documents(unit.files[0], unit.begin, unit.end)
    elif unit.fmt == _PARQUET:
      yield from self._parquet_documents(unit.files[0], unit.begin, unit.end)
    else:
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
    with epath.Path(path).open("rb") as f:
      return self._decode(f.read(), path)

  def _jsonl_documents(self, f: _SourceFile, begin: int, end: int) -> Iterator[Document]:
    """The lines that start in [begin, end): a line under way at `begin` belongs to the previous range."""
    with epath.Path(f.path).open("rb") as lines:
      offset = begin
      if begin > 0:
        lines.seek(begin - 1)
        if lines.read(1) != b"\n":
          offset = begin + len(lines.readline())
      while offset < end:
        raw = lines.readline()
        if not raw:
          break
        if raw.strip():
          line = self._decode(raw, f.path)  # under `skip`, an undecodable line is left out, not its whole file
          if line is not None:
            yield Document(f"{f.key}@{offset}", functools.partial(self._jsonl_text, f.path, offset, line))
        offset += len(raw)

  def _jsonl_text(self, path: str, offset: int, line: str) -> str:
    try:
      record = json.loads(line)
    except json.JSONDecodeError as e:
      raise DataError(
        f"{path}:{_line_number(path, offset)}: not valid JSON ({e.msg}); fix or remove the line"
      ) from None
    if not isinstance(record, dict) or self._text_field not in record:
      raise DataError(
        f"{path}:{_line_number(path, offset)}: no {self._text_field!r} field; "
        "set data.text_field to the field holding the text"
      )
    text = record[self._text_field]
    if not isinstance(text, str):
      raise DataError(
        f"{path}:{_line_number(path, offset)}: field {self._text_field!r} is a {type(text).__name__}, not a "
        "string; set data.text_field to the field holding the text"
      )
    return text

  def _parquet_file(self, f: _SourceFile, handle):
    import pyarrow.parquet  # only Parquet corpora pay for the import

    try:
      parquet_file = pyarrow.parquet.ParquetFile(handle)
    except Exception as e:  # pyarrow raises several types for a damaged or foreign file
      raise DataError(f"{f.path}: not a readable Parquet file ({e}); fix or remove it from data.files") from None
    columns = parquet_file.schema_arrow.names
    if self._text_field not in columns:
      raise DataError(
        f"{f.path}: no column {self._text_field!r} (columns: {', '.join(columns)}); "
        "set data.text_field to the column holding the text"
      )
    return parquet_file

  def _parquet_row_group_starts(self, f: _SourceFile) -> list[int]:
    """The first row of each row group: every process reads the footers, never the rows, to plan units."""
    with epath.Path(f.path).open("rb") as handle:
      metadata = self._parquet_file(f, handle).metadata
    starts, row = [], 0
    for group in range(metadata.num_row_groups):
      starts.append(row)
      row += metadata.row_group(group).num_rows
    return starts

  def _parquet_documents(self, f: _SourceFile, group: int, first_row: int) -> Iterator[Document]:
    with epath.Path(f.path).open("rb") as handle:
      values = self._parquet_file(f, handle).read_row_group(group, columns=[self._text_field]).column(0).to_pylist()
    for row, value in enumerate(values, start=first_row):
      if isinstance(value, bytes):
        value = self._decode(value, f.path)
      elif value is not None and not isinstance(value, str):
        raise DataError(
          f"{f.path}: column {self._text_field!r} holds {type(value).__name__} values, not text; "
          "set data.text_field to the column holding the text"
        )
      if value is not None:
        yield Document(f"{f.key}:{row}", functools.partial(str, value))

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


@dataclasses.dataclass(frozen=True)
class Source:
  """One item of a weighted mixture: a name (for `eval_loss/<name>`), its weight, and its glob."""

  name: str
  weight: float
  files: str


_WEIGHTED_ITEM = re.compile(r"^((?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?):(.+)$")


def mixture(files: str) -> list[Source] | None:
  """The sources of `data.files` when its items are `WEIGHT:GLOB`; None for plain globs (one corpus).

  A source is named after its glob: the last directory before the first wildcard ("web" for web/*.parquet), or
  the file's stem for a single file; a name taken twice gets `_2`, `_3`, ... in order.
  """
  items = [item.strip() for item in files.split(",") if item.strip()]
  matches = [_WEIGHTED_ITEM.match(item) for item in items]
  if not any(matches):
    return None
  if not all(matches):
    plain = items[[m is None for m in matches].index(True)]
    raise DataError(
      f"data.files: {plain!r} has no weight while other items do; write every item as WEIGHT:GLOB "
      "(e.g. '0.7:web/*.parquet,0.3:code/*.jsonl')"
    )
  sources, taken = [], {}
  for match in matches:
    weight, pattern = float(match.group(1)), match.group(2).strip()
    if not weight > 0:
      raise DataError(f"data.files: weight {match.group(1)} of {pattern!r} must be above 0; drop the item instead")
    name = _source_name(pattern)
    taken[name] = taken.get(name, 0) + 1
    sources.append(Source(name if taken[name] == 1 else f"{name}_{taken[name]}", weight, pattern))
  return sources


def _source_name(pattern: str) -> str:
  root, parts = _split_glob(pattern)
  if not parts or not _has_wildcard("/".join(parts)):  # a single file
    return pathlib.PurePosixPath(pattern).stem or "source"
  name = pathlib.PurePosixPath(root.partition("://")[2] or root).name
  return re.sub(r"[^A-Za-z0-9_.-]", "_", name) if name not in ("", ".", "..") else "source"


def _location(f: _SourceFile) -> str:
  return f.path if storage.is_url(f.path) else os.path.abspath(f.path)


def _line_number(path: str, offset: int) -> int:
  """The 1-based line that starts at byte `offset`: read only to word an error."""
  with epath.Path(path).open("rb") as f:
    return f.read(offset).count(b"\n") + 1


def _source_file(path: str, key: str) -> _SourceFile:
  fmt = _FORMAT_BY_SUFFIX.get(pathlib.PurePosixPath(path).suffix.lower(), _TEXT)
  if storage.is_url(path):
    stat = epath.Path(path).stat()
    return _SourceFile(path, key, fmt, stat.length, stat.mtime)
  stat = os.stat(path)  # ns mtimes: a file rewritten within the same second is still noticed
  return _SourceFile(path, key, fmt, stat.st_size, stat.st_mtime_ns)


def _stdlib_files(root: str) -> list[_SourceFile]:
  files = []
  for directory, subdirectories, names in os.walk(root):
    subdirectories[:] = [d for d in subdirectories if d not in _STDLIB_SKIPPED_DIRS]
    for name in names:
      if name.endswith(".py"):
        path = os.path.join(directory, name)
        files.append(_source_file(path, pathlib.PurePath(os.path.relpath(path, root)).as_posix()))
  return sorted(files, key=lambda f: f.key)


def _has_wildcard(text: str) -> bool:
  return any(c in text for c in "*?[")


def _split_glob(pattern: str) -> tuple[str, list[str]]:
  """(root, parts): the directory a glob starts from (its components before the first wildcard), and the rest."""
  scheme, sep, rest = pattern.partition("://")
  if not sep:
    scheme, rest = "", pattern
  absolute = rest.startswith("/")
  parts = [p for p in rest.split("/") if p]
  fixed = 0
  while fixed < len(parts) - 1 and not _has_wildcard(parts[fixed]):
    fixed += 1
  root = "/" * absolute + "/".join(parts[:fixed])
  if scheme:
    root = f"{scheme}://{root}"
  return root or ("/" if absolute else "."), parts[fixed:]


def _glob(pattern: str) -> tuple[str, list[tuple[str, str]]]:
  """(root, [(path, path relative to root)]) of the files a glob matches, sorted; `**` spans directories.

  The rules of Python's glob.glob(recursive=True), on etils.epath so URLs work too: a wildcard matches no name
  that starts with '.' unless the pattern part does, and `**` matches any run of (non-hidden) directories.
  """
  root, parts = _split_glob(pattern)
  matches = [(epath.Path(root), "")]
  for i, part in enumerate(parts):
    last = i == len(parts) - 1
    found = []
    for directory, rel in matches:
      if part == "**":
        if directory.is_dir():
          found += _walk(directory, rel, with_files=last)
      elif _has_wildcard(part):
        if directory.is_dir():
          for child in directory.iterdir():
            if fnmatch.fnmatchcase(child.name, part) and (part.startswith(".") or not child.name.startswith(".")):
              found.append((child, f"{rel}/{child.name}" if rel else child.name))
      else:
        found.append((directory / part, f"{rel}/{part}" if rel else part))
    matches = found
  files = {str(p): r for p, r in matches if p.is_file()}
  return root, sorted(files.items())


def _walk(directory: epath.Path, rel: str, *, with_files: bool) -> Iterator[tuple[epath.Path, str]]:
  """The directory itself and the directories (and files) below it that are not hidden, as glob's `**`."""
  yield directory, rel
  for child in directory.iterdir():
    if child.name.startswith("."):
      continue
    child_rel = f"{rel}/{child.name}" if rel else child.name
    if child.is_dir():
      yield from _walk(child, child_rel, with_files=with_files)
    elif with_files:
      yield child, child_rel


def _expand_globs(patterns: str) -> list[_SourceFile]:
  files, seen = [], set()
  for pattern in (p.strip() for p in patterns.split(",")):
    if not pattern:
      continue
    if not storage.is_url(pattern):
      pattern = os.path.expanduser(pattern)
    path = epath.Path(pattern)
    if _has_wildcard(pattern):
      root, matches = _glob(pattern)
      if not matches:
        where = "" if storage.is_url(pattern) else f" (relative globs start at {os.getcwd()})"
        raise DataError(f"data.files: {pattern!r} matches no files; fix the glob{where}")
    elif path.is_dir():
      raise DataError(f"data.files: {pattern!r} is a directory; name its files with a glob like '{pattern}/**/*.txt'")
    elif not path.exists():
      raise DataError(f"data.files: no such file {pattern!r}; fix the path, or leave data.files empty for the default")
    else:
      matches = [(pattern, path.name)]
    for match, key in matches:
      identity = match if storage.is_url(match) else os.path.realpath(match)
      if identity not in seen:  # a file matched by two globs is still one document
        seen.add(identity)
        files.append(_source_file(match, key))
  return files
