"""Tokenized documents on disk: one file per corpus work unit, built once by one process, read by all.

The corpus is cut into units that depend on its files alone (sources.py). Process p of P tokenizes the units
u with u % P == p, each into `<cache dir>/tokens/<unit key>.bin`, written beside its final name and renamed
into place (a local dir also locks each unit, for several processes on one host). After a barrier every
process opens every unit; a unit still missing means the cache dir is not shared between hosts, and the
process builds it itself. A second start with the same corpus, tokenizer and settings tokenizes nothing.

A unit file holds its documents' tokens back to back without BOS/EOS, then `offsets` (int64, num_docs + 1),
then `eval_hash` (float64 per document, which decides the held-out split the same way in every process),
then a JSON footer and its length (8 bytes, little endian). Documents with no text are not stored. A reader
fetches only the bytes its rows need: local files are memory-mapped, remote ones read by byte range.
Tokenization runs in `data.num_workers` spawned worker processes; `write_unit` is the one writer of the
format, used by them and by the Apache Beam pipeline of scripts/prepare_data.py (data/prepare.py) alike.

A cache dir prepared by that script holds a manifest (data/prepared.py): its units are opened as listed and
nothing is tokenized. A weighted mixture (`WEIGHT:GLOB` items in data.files) is one cache per source
(`MixtureCache`), each with its own units and held-out split.

Spawned workers import the entry script again (as `__mp_main__`), so a script that builds a cache must keep
its work under `if __name__ == "__main__":`, as multiprocessing requires; otherwise each worker would run the
script and wait forever on the cache lock its parent holds.
"""

import collections
import concurrent.futures
import contextlib
import itertools
import json
import logging
import multiprocessing
import threading
import time
from collections.abc import Iterator

import jax
import numpy as np
from etils import epath

import storage
from data import cache, prepared
from data.errors import DataError
from data.sources import Corpus, Unit, eval_hash, mixture
from data.tokenizer import Tokenizer, batch_encoder

_log = logging.getLogger(__name__)

_FORMAT_VERSION = 2  # 2: one file per work unit, eval hashes stored, JSONL keys by byte offset
_BATCH_CHARS = 1 << 20  # text sent to a worker at a time: large enough to amortize pickling
_BATCH_DOCS = 512
_BATCHES_IN_FLIGHT_PER_WORKER = 2  # bounds memory: reading runs only this far ahead of tokenizing
_FOOTER_LENGTH_BYTES = 8


class _UnitTokens:
  """One unit file: its document offsets and eval hashes, and its tokens (mapped, or read on first use)."""

  def __init__(self, path: epath.Path) -> None:
    self.path = path
    self._local = not storage.is_url(path)
    try:
      with path.open("rb") as f:
        f.seek(-_FOOTER_LENGTH_BYTES, 2)
        footer_length = int.from_bytes(f.read(_FOOTER_LENGTH_BYTES), "little")
        f.seek(-_FOOTER_LENGTH_BYTES - footer_length, 2)
        meta = json.loads(f.read(footer_length))
        num_docs = meta["num_docs"]
        f.seek(meta["offsets_at"])
        self.offsets = np.frombuffer(f.read(8 * (num_docs + 1)), np.int64)
        self.eval_hash = np.frombuffer(f.read(8 * num_docs), np.float64)
      if meta["version"] != _FORMAT_VERSION or len(self.offsets) != num_docs + 1 or len(self.eval_hash) != num_docs:
        raise ValueError(f"format {meta['version']}, {num_docs} documents, footer cut short")
    except (OSError, ValueError, KeyError, TypeError) as e:
      raise DataError(
        f"{path}: not a readable token cache unit ({type(e).__name__}: {e}); delete it to rebuild it, or "
        "rebuild a prepared cache with scripts/prepare_data.py into a new dir"
      ) from None
    self._dtype, self._num_tokens = np.dtype(meta["dtype"]), meta["num_tokens"]
    self._tokens = None
    self._lock = threading.Lock()  # the prefetch thread and the main thread may both load a remote unit

  @property
  def tokens(self) -> np.ndarray:
    with self._lock:
      if self._tokens is None:
        if self._num_tokens == 0:  # np.memmap cannot map an empty range
          self._tokens = np.zeros(0, self._dtype)
        elif self._local:
          self._tokens = np.memmap(self.path, dtype=self._dtype, mode="r", shape=(self._num_tokens,))
        else:
          with self.path.open("rb") as f:
            self._tokens = np.frombuffer(f.read(self._num_tokens * self._dtype.itemsize), self._dtype)
      return self._tokens

  def read(self, lo: int, hi: int) -> np.ndarray:
    """Tokens [lo, hi) of the unit: a slice of the mapped file, or one ranged read of a remote one."""
    if self._local or self._tokens is not None:
      return self.tokens[lo:hi]
    itemsize = self._dtype.itemsize
    return np.frombuffer(storage.read_range(self.path, lo * itemsize, hi * itemsize), self._dtype)


class TokenCache:
  """Every stored document of the corpus, in corpus order (units in order, each unit's documents in order)."""

  def __init__(self, units: list[_UnitTokens], corpus_description: str) -> None:
    self.corpus_description = corpus_description
    self._units = units
    counts = [len(u.eval_hash) for u in units]
    self.doc_unit = np.repeat(np.arange(len(units)), counts)
    self.doc_start = np.concatenate([u.offsets[:-1] for u in units] or [np.zeros(0, np.int64)])
    ends = np.concatenate([u.offsets[1:] for u in units] or [np.zeros(0, np.int64)])
    self.doc_length = ends - self.doc_start
    self.eval_hash = np.concatenate([u.eval_hash for u in units] or [np.zeros(0)])

  def __len__(self) -> int:
    return len(self.doc_length)

  def tokens(self, doc: int, lo: int, hi: int) -> np.ndarray:
    """Tokens [lo, hi) of document `doc`."""
    start = int(self.doc_start[doc])
    return self._units[int(self.doc_unit[doc])].read(start + lo, start + hi)

  @property
  def remote(self) -> bool:
    """Whether reads go to an object store (where rows are worth building concurrently)."""
    return any(not u._local for u in self._units)

  def held_out(self, eval_fraction: float) -> np.ndarray:
    """bool per document: its eval hash is under `eval_fraction`; if that picks none of two or more documents,
    the one with the smallest hash, so a small corpus still has an eval split. One document: nothing held out.
    """
    if eval_fraction <= 0 or len(self) < 2:
      return np.zeros(len(self), bool)
    held_out = self.eval_hash < eval_fraction
    if not held_out.any():
      held_out[np.argmin(self.eval_hash)] = True
    return held_out


class MixtureCache:
  """A weighted mixture's sources, each a TokenCache of its own: [(name, weight, cache)] in data.files order."""

  def __init__(self, sources: list[tuple[str, float, TokenCache]]) -> None:
    self.sources = sources
    self.corpus_description = " + ".join(f"{w:g} x {c.corpus_description}" for _, w, c in sources)

  @property
  def remote(self) -> bool:
    return any(c.remote for _, _, c in self.sources)


def load_token_cache(
  data_cfg, tokenizer: Tokenizer, *, process_index: int | None = None, process_count: int | None = None
) -> TokenCache | MixtureCache:
  """Every unit of the corpus, this process's share tokenized first (on first use), then all opened; a
  prepared cache dir's units as its manifest lists them, with nothing tokenized. A mixture: one per source.

  process_index / process_count default to JAX's; tests pass others to stand in for one process of several.
  """
  manifest = prepared.read_manifest(data_cfg)
  sources = mixture(data_cfg.files)
  if manifest is not None:
    prepared.check_tokenizer(data_cfg, manifest, tokenizer.model_path)
    start = time.perf_counter()
    caches = [
      TokenCache([_UnitTokens(path) for path in paths], f"{name} (prepared)")
      for name, paths in prepared.unit_paths(data_cfg, manifest)
    ]
    _log.info(
      "Opened the prepared token cache %s (%d units) in %.2f s",
      cache.cache_root(data_cfg.cache_dir),
      sum(len(c._units) for c in caches),
      time.perf_counter() - start,
    )
  else:
    configs = [source_config(data_cfg, s.files) for s in sources] if sources else [data_cfg]
    caches = [_load_self_built(c, tokenizer, process_index, process_count) for c in configs]
  if sources is None:
    return caches[0]
  return MixtureCache([(s.name, s.weight, c) for s, c in zip(sources, caches, strict=True)])


def source_config(data_cfg, files: str):
  """`data_cfg` with data.files narrowed to one source of a mixture."""
  cfg = data_cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.files = files
  return cfg


def token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32)


def unit_plan(data_cfg, tokenizer: Tokenizer) -> tuple[Corpus, list[epath.Path]]:
  """The corpus of `data_cfg` (one source) and the path of each of its units' files in the cache dir."""
  corpus = Corpus(data_cfg)
  root = cache.cache_root(data_cfg.cache_dir) / "tokens"
  settings = {
    "version": _FORMAT_VERSION,
    "tokenizer": cache.file_sha256(tokenizer.model_path),
    **corpus.read_settings(),
  }
  paths = [root / f"{cache.content_hash({**settings, 'unit': unit.identity()})}.bin" for unit in corpus.units]
  return corpus, paths


def _load_self_built(data_cfg, tokenizer: Tokenizer, process_index: int | None, process_count: int | None):
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  corpus, paths = unit_plan(data_cfg, tokenizer)
  root = cache.cache_root(data_cfg.cache_dir) / "tokens"
  start = time.perf_counter()
  with _Builder(corpus, tokenizer, data_cfg.num_workers) as builder:
    for unit in corpus.units:
      if unit.index % process_count == process_index:
        builder.ensure(unit, paths[unit.index])
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.sync_global_devices("kiln: token cache units built")
    missing = [unit for unit in corpus.units if not paths[unit.index].exists()]
    if missing:
      _log.warning(
        "%d of %d token cache units built by other processes are not in %s: the cache dir is not shared "
        "between hosts, so this process tokenizes them too",
        len(missing),
        len(corpus.units),
        root,
      )
    # The processes of one host start at different places in the list, so the unit locks spread them out.
    first = process_index * len(missing) // process_count
    for unit in missing[first:] + missing[:first]:
      builder.ensure(unit, paths[unit.index])
  corpus.report_invalid_utf8()
  if builder.built:
    _log.info(
      "Tokenized %d of the %d units of %s (process %d of %d) in %.1f s into %s",
      len(builder.built),
      len(corpus.units),
      corpus.description,
      process_index,
      process_count,
      time.perf_counter() - start,
      root,
    )
  else:
    _log.info("Reusing the token cache of %s in %s (%d units)", corpus.description, root, len(corpus.units))
  return TokenCache([_UnitTokens(path) for path in paths], corpus.description)


class _Builder:
  """Tokenizes units into unit files; starts its worker processes only when a unit needs building."""

  def __init__(self, corpus: Corpus, tokenizer: Tokenizer, num_workers: int) -> None:
    self._corpus = corpus
    self._tokenizer = tokenizer
    self._num_workers = max(int(num_workers), 0)
    self._dtype = token_dtype(tokenizer.vocab_size)
    self._stack = contextlib.ExitStack()
    self._pool = None
    self._started = False
    self.built: list[int] = []  # indices of the units this process tokenized

  def __enter__(self) -> "_Builder":
    return self

  def __exit__(self, *exc) -> None:
    self._stack.close()

  def ensure(self, unit: Unit, path: epath.Path) -> None:
    """Builds `unit` at `path` unless it is there; a local dir is locked so one process per host builds it."""
    with cache.file_lock(f"{path}.lock"):
      if not path.exists():
        self._build(unit, path)

  def _build(self, unit: Unit, path: epath.Path) -> None:
    self._start()
    write_unit(path, unit, self._encode(_batches(self._corpus.documents(unit))), self._dtype)
    self.built.append(unit.index)

  def _start(self) -> None:
    if self._started:
      return
    self._started = True
    with epath.Path(self._tokenizer.model_path).open("rb") as f:
      model = f.read()  # workers get the model itself, not a path that might change under them
    kind = self._tokenizer.kind
    _start_worker(kind, model)
    if self._num_workers > 1:
      # spawn, not fork: the parent may run JAX's threads, which fork would copy mid-flight.
      self._pool = self._stack.enter_context(
        concurrent.futures.ProcessPoolExecutor(
          self._num_workers,
          mp_context=multiprocessing.get_context("spawn"),
          initializer=_start_worker,
          initargs=(kind, model),
        )
      )

  def _encode(self, batches):
    """Yields ((token ids, lengths), eval hashes) per batch, in order."""
    if self._pool is None:
      for texts, hashes in batches:
        yield _encode_batch(texts), hashes
      return
    in_flight = collections.deque()
    for texts, hashes in batches:
      in_flight.append((self._pool.submit(_encode_batch, texts), hashes))
      if len(in_flight) >= _BATCHES_IN_FLIGHT_PER_WORKER * self._num_workers:
        future, hashes = in_flight.popleft()
        yield future.result(), hashes
    while in_flight:
      future, hashes = in_flight.popleft()
      yield future.result(), hashes


def write_unit(path: epath.Path, unit: Unit, encoded, dtype: np.dtype) -> int:
  """Writes one unit file from its batches `encoded`, ((token ids, lengths), eval hashes) in corpus order,
  beside `path` and renamed onto it; returns its token count. The one writer of the format."""
  lengths, hashes = [], []
  with cache.staged(path) as staging, staging.open("wb") as f:
    for (ids, batch_lengths), batch_hashes in encoded:
      f.write(ids.astype(dtype).tobytes())
      lengths.append(batch_lengths)
      hashes.extend(batch_hashes)
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    num_tokens = int(offsets[-1])
    meta = {
      "version": _FORMAT_VERSION,
      "dtype": np.dtype(dtype).name,
      "num_tokens": num_tokens,
      "num_docs": len(lengths),
      "offsets_at": num_tokens * np.dtype(dtype).itemsize,
      "unit": unit.identity(),
    }
    f.write(offsets.tobytes())
    f.write(np.asarray(hashes, np.float64).tobytes())
    footer = json.dumps(meta).encode()
    f.write(footer)
    f.write(len(footer).to_bytes(_FOOTER_LENGTH_BYTES, "little"))
  return num_tokens


def encode_unit(corpus: Corpus, unit: Unit, encode):
  """The batches `write_unit` takes, encoded in this process by `encode` (texts -> id lists)."""
  for texts, hashes in _batches(corpus.documents(unit)):
    yield _encode_with(encode, texts), hashes


def _batches(documents) -> Iterator[tuple[list[str], list[float]]]:
  """(texts, eval hashes) of the documents with text, a worker's load at a time."""
  texts, hashes, chars = [], [], 0
  for document in documents:
    text = document.read()
    if not text:
      continue
    texts.append(text)
    hashes.append(eval_hash(document.key))
    chars += len(text)
    if chars >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
      yield texts, hashes
      texts, hashes, chars = [], [], 0
  if texts:
    yield texts, hashes


_worker_encode = None  # this process's `batch_encoder`


def _start_worker(kind: str, model: bytes) -> None:
  global _worker_encode
  _worker_encode = batch_encoder(kind, model)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  return _encode_with(_worker_encode, texts)


def _encode_with(encode, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  ids = encode(texts)
  lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
  flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
  return flat, lengths
