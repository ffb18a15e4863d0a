"""Tokenized documents on disk, built once per (corpus, tokenizer, settings, process shard) and memory-mapped.

A process's cache holds its shard of the training documents (the t-th training document belongs to process
t % process_count) and every held-out document (the eval split is small, and every process needs all of it
to agree on the number of eval batches). Tokens lie back to back without BOS/EOS in `tokens.bin`;
`offsets.npy` has num_docs + 1 entries and `held_out.npy` one flag per document. Documents with no text are
not stored. Tokenization runs in `data.num_workers` spawned worker processes.

Spawned workers import the entry script again (as `__mp_main__`), so a script that builds a cache must keep
its work under `if __name__ == "__main__":`, as multiprocessing requires; otherwise each worker would run the
script and wait forever on the cache lock its parent holds.
"""

import collections
import concurrent.futures
import dataclasses
import itertools
import json
import logging
import multiprocessing
import os
import shutil
import tempfile
import time
from collections.abc import Iterator

import numpy as np
import sentencepiece as spm

from data import cache
from data.sources import Corpus, is_held_out
from data.tokenizer import Tokenizer

_log = logging.getLogger(__name__)

_FORMAT_VERSION = 1
_BATCH_CHARS = 1 << 20  # text sent to a worker at a time: large enough to amortize pickling
_BATCH_DOCS = 512
_BATCHES_IN_FLIGHT_PER_WORKER = 2  # bounds memory: reading runs only this far ahead of tokenizing


@dataclasses.dataclass(frozen=True)
class TokenCache:
  tokens: np.ndarray  # flat, memory-mapped
  offsets: np.ndarray  # int64 [num_docs + 1]: document d is tokens[offsets[d]:offsets[d + 1]]
  held_out: np.ndarray  # bool [num_docs]
  path: str
  corpus_description: str

  def split(self, held_out: bool) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) of the training documents of this shard, or of all held-out documents."""
    chosen = np.flatnonzero(self.held_out == held_out)
    starts = self.offsets[chosen]
    return starts, self.offsets[chosen + 1] - starts


def load_token_cache(data_cfg, tokenizer: Tokenizer, *, process_index: int, process_count: int) -> TokenCache:
  """The cache of this process's documents, built on first use (under a lock) and memory-mapped after."""
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
  corpus = Corpus(data_cfg)
  key = cache.content_hash(
    {
      "version": _FORMAT_VERSION,
      "corpus": corpus.identity(),
      "tokenizer": cache.file_sha256(tokenizer.model_path),
      "eval_fraction": data_cfg.eval_fraction,
      "shard": [process_index, process_count],
    }
  )
  path = os.path.join(cache.cache_root(data_cfg.cache_dir), "tokens", key)
  with cache.file_lock(path + ".lock"):
    if os.path.isdir(path):
      _log.info("Reusing the token cache %s", path)
    else:
      _build(path, corpus, tokenizer, data_cfg, process_index, process_count)
  return _open(path, corpus.description)


def _open(path: str, corpus_description: str) -> TokenCache:
  with open(os.path.join(path, "meta.json")) as f:
    meta = json.load(f)
  num_tokens = meta["num_tokens"]
  # np.memmap cannot map an empty file.
  tokens = (
    np.memmap(os.path.join(path, "tokens.bin"), dtype=meta["dtype"], mode="r", shape=(num_tokens,))
    if num_tokens
    else np.zeros(0, meta["dtype"])
  )
  offsets = np.load(os.path.join(path, "offsets.npy"))
  held_out = np.load(os.path.join(path, "held_out.npy"))
  return TokenCache(tokens, offsets, held_out, path, corpus_description)


def _shard_documents(
  corpus: Corpus, eval_fraction: float, process_index: int, process_count: int
) -> Iterator[tuple[str, bool]]:
  """(text, held_out) of this process's documents, in corpus order. Only those documents are read."""
  training_index = 0
  for document in corpus.documents():
    held_out = is_held_out(document.key, eval_fraction)
    if not held_out:
      # Counted before reading, so every process assigns the same documents to the same shard.
      mine = training_index % process_count == process_index
      training_index += 1
      if not mine:
        continue
    text = document.read()
    if text:
      yield text, held_out


def _batches(documents: Iterator[tuple[str, bool]]) -> Iterator[tuple[list[str], list[bool]]]:
  texts, flags, chars = [], [], 0
  for text, held_out in documents:
    texts.append(text)
    flags.append(held_out)
    chars += len(text)
    if chars >= _BATCH_CHARS or len(texts) >= _BATCH_DOCS:
      yield texts, flags
      texts, flags, chars = [], [], 0
  if texts:
    yield texts, flags


def _build(path: str, corpus: Corpus, tokenizer: Tokenizer, data_cfg, process_index: int, process_count: int) -> None:
  start = time.perf_counter()
  dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.uint32
  num_workers = max(int(data_cfg.num_workers), 0)
  _log.info(
    "Tokenizing %s (process %d of %d) with %d worker process(es)",
    corpus.description,
    process_index,
    process_count,
    num_workers,
  )
  parent = os.path.dirname(path)
  os.makedirs(parent, exist_ok=True)
  staging = tempfile.mkdtemp(dir=parent, prefix=".building-")
  try:
    lengths, held_out = [], []
    batches = _batches(_shard_documents(corpus, data_cfg.eval_fraction, process_index, process_count))
    with open(os.path.join(staging, "tokens.bin"), "wb") as tokens_file:
      for (ids, batch_lengths), flags in _encode_all(batches, tokenizer, num_workers):
        tokens_file.write(ids.astype(dtype).tobytes())
        lengths.append(batch_lengths)
        held_out.extend(flags)
    corpus.report_invalid_utf8()
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    held_out = np.asarray(held_out, dtype=bool)
    np.save(os.path.join(staging, "offsets.npy"), offsets)
    np.save(os.path.join(staging, "held_out.npy"), held_out)
    meta = {
      "dtype": np.dtype(dtype).name,
      "num_tokens": int(offsets[-1]),
      "num_docs": len(lengths),
      "num_held_out_docs": int(held_out.sum()),
      "num_held_out_tokens": int(lengths[held_out].sum()),
      "corpus": corpus.description,
      "tokenizer": tokenizer.model_path,
      "shard": [process_index, process_count],
    }
    with open(os.path.join(staging, "meta.json"), "w") as f:
      json.dump(meta, f, indent=2)
    os.replace(staging, path)  # the cache appears whole or not at all
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  _log.info(
    "Tokenized %d documents (%d held out) into %d tokens in %.1f s: %s",
    meta["num_docs"],
    meta["num_held_out_docs"],
    meta["num_tokens"],
    time.perf_counter() - start,
    path,
  )


def _encode_all(batches, tokenizer: Tokenizer, num_workers: int):
  """Yields ((token ids, lengths), held_out flags) per batch, in order."""
  with open(tokenizer.model_path, "rb") as f:
    model = f.read()  # workers get the model itself, not a path that might change under them
  if num_workers <= 1:
    _start_worker(model)
    for texts, flags in batches:
      yield _encode_batch(texts), flags
    return
  # spawn, not fork: the parent may run JAX's threads, which fork would copy mid-flight.
  context = multiprocessing.get_context("spawn")
  with concurrent.futures.ProcessPoolExecutor(
    num_workers, mp_context=context, initializer=_start_worker, initargs=(model,)
  ) as pool:
    in_flight = collections.deque()
    for texts, flags in batches:
      in_flight.append((pool.submit(_encode_batch, texts), flags))
      if len(in_flight) >= _BATCHES_IN_FLIGHT_PER_WORKER * num_workers:
        future, flags = in_flight.popleft()
        yield future.result(), flags
    while in_flight:
      future, flags = in_flight.popleft()
      yield future.result(), flags


_worker_processor: spm.SentencePieceProcessor | None = None


def _start_worker(model: bytes) -> None:
  global _worker_processor
  _worker_processor = spm.SentencePieceProcessor(model_proto=model)


def _encode_batch(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
  # One thread per worker: the workers are the parallelism.
  ids = _worker_processor.encode(texts, num_threads=1)
  lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
  flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int64, count=int(lengths.sum()))
  return flat, lengths
