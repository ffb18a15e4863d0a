"""What the trainer calls: endless training batches and fixed eval batches, as global arrays on the mesh.

The training data is one stream of packed rows over every training document of the corpus (packing.py):
row r is a pure function of (data config, seed, r), and the global batch of step s is rows
[start_row + s * B, start_row + (s + 1) * B) with B the global batch size, whatever the number of processes
and devices. Each process builds only the rows its addressable devices hold (from the batch sharding, in any
mesh order, replicated axes included), so resuming at another size is exact: the data position is a row.

Every batch is a dict of global [B, L] arrays (L = data.seq_len), taken from packed rows of L + 1 tokens:
  inputs       int32    row[:-1]
  targets      int32    row[1:]
  segment_ids  int32    of inputs: 0 padding, 1, 2, ... the document fragments within the row
  positions    int32    of inputs: position within the document fragment
  loss_mask    float32  1.0 where the target is a real token of the input's document, else 0.0; fine-tuning
                        data multiplies in each target's loss weight (0 on prompts)

The documents come from the objective's source (`Objective.load_documents`, objectives/): the token cache of a
text corpus (lm, distill), chat conversations (sft, data/sft.py) or preference pairs (dpo, data/preference.py,
one pair per row). A source other than the token cache makes its own rows (`packed_rows`); the rest is shared.

A weighted mixture (`WEIGHT:GLOB` items in data.files, a `MixtureCache`) packs each source's training documents
into rows of its own, and row r of the training stream is a row of one source (data/mixture.py), still a pure
function of (config, seed, r). Each source keeps its own held-out split; its eval batches are evaluated apart,
as `eval_loss/<source>` (make_eval_batches returns {source: batches} for a mixture).
"""

import atexit
import concurrent.futures
import functools
import logging
import math
import queue
import threading
from collections.abc import Callable, Iterator

import jax
import numpy as np

from data.errors import DataError
from data.mixture import MixedRows
from data.packing import PackedRows, empty_row, to_model_inputs
from data.permutation import permutation_key
from data.token_cache import MixtureCache, TokenCache, load_token_cache
from data.tokenizer import Tokenizer

_log = logging.getLogger(__name__)

# Batches ready ahead of the train loop, besides the one being built: the next step never waits for the host.
_PREFETCH_DEPTH = 1
_REMOTE_ROW_THREADS = 16


def make_train_iterator(
  data_cfg,
  tokenizer: Tokenizer,
  *,
  global_batch_size: int,
  seed: int,
  sharding: jax.sharding.NamedSharding,
  start_row: int = 0,
  token_cache: TokenCache | None = None,
) -> Iterator[dict[str, jax.Array]]:
  """Endless training batches; item i holds global rows [start_row + i * B, start_row + (i + 1) * B).

  Documents are shuffled, and rows visited in a shuffled order, anew each epoch from `seed` (data.shuffle).
  The next batch is built and placed on the devices by a background thread while the current one trains.
  """
  _check_sizes(data_cfg.seq_len, global_batch_size)
  if start_row < 0:
    raise ValueError(f"start_row={start_row} must be at least 0")
  if token_cache is None:  # a caller that builds both train and eval batches loads it once
    token_cache = load_token_cache(data_cfg, tokenizer)
  rows = train_rows(token_cache, data_cfg, tokenizer, seed=seed)
  if isinstance(token_cache, MixtureCache) and start_row > 0:
    _log.info(
      "Resuming the mixture at row %d with weights %s: rows from here follow these weights, as if they had always "
      "held (a changed weight moves each source's position; docs/data.md)",
      start_row,
      ", ".join(f"{name}={weight:g}" for name, weight, _ in token_cache.sources),
    )
  batches = GlobalBatches(
    rows.__getitem__, global_batch_size, data_cfg.seq_len, sharding, threads=_threads(token_cache)
  )
  return _Prefetcher(lambda i: batches.at(start_row + i * global_batch_size))


def train_rows(token_cache, data_cfg, tokenizer: Tokenizer, *, seed: int):
  """The training stream's rows, by global index: one source's packed rows, or a mixture of several."""
  if not isinstance(token_cache, MixtureCache):
    return _packed_rows(token_cache, _training_documents(token_cache, data_cfg), data_cfg, tokenizer, seed=seed,
                        shuffle=data_cfg.shuffle)  # fmt: skip
  names = [name for name, _, _ in token_cache.sources]
  rows = [
    # Each source its own document and row orders, keyed apart so equal sizes do not share an order.
    _packed_rows(
      cache,
      _training_documents(cache, data_cfg),
      data_cfg,
      tokenizer,
      seed=permutation_key(seed, s) % 2**63,
      shuffle=data_cfg.shuffle,
    )  # fmt: skip
    for s, (_, _, cache) in enumerate(token_cache.sources)
  ]
  return MixedRows(rows, [w for _, w, _ in token_cache.sources], names, seed=seed)


def _training_documents(token_cache: TokenCache, data_cfg) -> np.ndarray:
  documents = np.flatnonzero(~token_cache.held_out(data_cfg.eval_fraction))
  if len(documents) == 0:
    raise DataError(
      f"no training documents in {token_cache.corpus_description} once empty, undecodable and held-out ones are "
      "left out; add documents or lower data.eval_fraction"
    )
  return documents


def _threads(token_cache) -> int:
  # Rows read from an object store wait on one request per document fragment: build a batch's rows concurrently.
  return _REMOTE_ROW_THREADS if getattr(token_cache, "remote", False) else 0


def make_eval_batches(
  data_cfg,
  tokenizer: Tokenizer,
  *,
  global_batch_size: int,
  num_batches: int,
  sharding: jax.sharding.NamedSharding,
  token_cache: TokenCache | None = None,
) -> list[dict[str, jax.Array]] | dict[str, list[dict[str, jax.Array]]]:
  """Up to `num_batches` fixed batches of the held-out documents in corpus order; [] means no evaluation; a
  mixture gives {source name: its batches}, sources without held-out documents left out.

  Batch s holds rows [s * B, (s + 1) * B) of the held-out stream; rows past its end are all padding
  (loss_mask 0). Fewer batches than asked when the split is small. data.eval_fraction=0 holds nothing out;
  a corpus of one document is trained on whole, without evaluation (one log line says so).
  """
  _check_sizes(data_cfg.seq_len, global_batch_size)
  if data_cfg.eval_fraction <= 0:
    return []
  if token_cache is None:  # a caller that builds both train and eval batches loads it once
    token_cache = load_token_cache(data_cfg, tokenizer)
  if isinstance(token_cache, MixtureCache):
    per_source = {
      name: make_eval_batches(
        data_cfg,
        tokenizer,
        global_batch_size=global_batch_size,
        num_batches=num_batches,
        sharding=sharding,
        token_cache=cache,
      )  # fmt: skip
      for name, _, cache in token_cache.sources
    }
    return {name: batches for name, batches in per_source.items() if batches}
  documents = np.flatnonzero(token_cache.held_out(data_cfg.eval_fraction))
  if len(documents) == 0:
    _log.warning(
      "no held-out document in %s (it has %d document(s)): the run trains without evaluation",
      token_cache.corpus_description,
      len(token_cache),
    )
    return []
  rows = _packed_rows(token_cache, documents, data_cfg, tokenizer, seed=0, shuffle=False)
  padding = empty_row(data_cfg.seq_len + 1, tokenizer.pad_id, weighted="loss_weights" in rows[0])
  row_at = lambda r: rows[r] if r < rows.rows_per_epoch else padding
  batches = GlobalBatches(row_at, global_batch_size, data_cfg.seq_len, sharding, threads=_threads(token_cache))
  count = min(num_batches, math.ceil(rows.rows_per_epoch / global_batch_size))
  return [batches.at(step * global_batch_size) for step in range(count)]


class GlobalBatches:
  """Global batches of B consecutive rows; this process builds only the rows its devices hold."""

  def __init__(
    self, row_at: Callable[[int], dict[str, np.ndarray]], batch_size: int, seq_len: int, sharding, threads: int = 0
  ) -> None:
    self._row_at = row_at
    self._pool = concurrent.futures.ThreadPoolExecutor(threads) if threads > 1 else None
    self._shape = (batch_size, seq_len)
    self._sharding = sharding
    # The batch rows (0 .. B - 1) this process's devices hold; devices that replicate a row share one copy.
    indices = sharding.addressable_devices_indices_map(self._shape).values()
    self._local_rows = sorted({r for index in indices for r in range(*index[0].indices(batch_size))})
    assert self._local_rows, "this process's devices hold no rows of the batch"
    self.local_rows = tuple(self._local_rows)  # batch rows (0 .. B - 1) this process builds, ascending
    self._position = {r: i for i, r in enumerate(self._local_rows)}

  def at(self, first_row: int) -> dict[str, jax.Array]:
    """Global rows [first_row, first_row + B) as global arrays laid out by the sharding."""
    wanted = [first_row + r for r in self._local_rows]
    rows = list(self._pool.map(self._row_at, wanted)) if self._pool else [self._row_at(r) for r in wanted]
    local = to_model_inputs({name: np.stack([row[name] for row in rows]) for name in rows[0]})
    return {
      name: jax.make_array_from_callback(self._shape, self._sharding, functools.partial(self._piece, local_NxL))
      for name, local_NxL in local.items()
    }

  def _piece(self, local_NxL: np.ndarray, index: tuple[slice, ...]) -> np.ndarray:
    """One device's block of a field, cut from the N rows this process built (N = len(self._local_rows))."""
    rows = [self._position[r] for r in range(*index[0].indices(self._shape[0]))]
    return local_NxL[rows][:, index[1]]


class _Prefetcher:
  """Iterates make_item(0), make_item(1), ... built one ahead by a background thread, in order."""

  def __init__(self, make_item: Callable[[int], object]) -> None:
    self._queue = queue.Queue(maxsize=_PREFETCH_DEPTH)
    self._stop = threading.Event()
    # The thread holds the queue and the event, never this object, so dropping the iterator stops it.
    self._thread = threading.Thread(target=_produce, args=(make_item, self._queue, self._stop), daemon=True)
    _producers.add((self._thread, self._stop))
    self._thread.start()
    self._error = None

  def __iter__(self) -> "_Prefetcher":
    return self

  def __next__(self):
    if self._error is None:
      ok, item = self._queue.get()
      if ok:
        return item
      self._error = item
    raise self._error

  def close(self) -> None:
    """Stops the background thread and waits for it."""
    self._stop.set()
    self._thread.join()

  def __del__(self) -> None:
    self._stop.set()


# Live producer threads with their stop events. A thread still inside JAX when the interpreter shuts down
# aborts the process (seen: "terminate called after throwing"), so at exit they are stopped and joined; this
# handler is registered after JAX's (imported above), so it runs before JAX tears its runtime down.
_producers: set[tuple[threading.Thread, threading.Event]] = set()


@atexit.register
def _stop_producers() -> None:
  live = list(_producers)
  for _, stop in live:
    stop.set()
  for thread, _ in live:
    thread.join()


def _produce(make_item: Callable[[int], object], out: queue.Queue, stop: threading.Event) -> None:
  try:
    _produce_until_stopped(make_item, out, stop)
  finally:
    _producers.discard((threading.current_thread(), stop))


def _produce_until_stopped(make_item: Callable[[int], object], out: queue.Queue, stop: threading.Event) -> None:
  for i in range(2**62):
    try:
      item = (True, make_item(i))
    except Exception as e:  # noqa: BLE001 (handed to the consumer, which raises it)
      item = (False, e)
    while not stop.is_set():
      try:
        out.put(item, timeout=0.1)
        break
      except queue.Full:
        continue
    if stop.is_set() or not item[0]:
      return


def _check_sizes(seq_len: int, batch_size: int) -> None:
  if seq_len < 1:
    raise DataError(f"data.seq_len={seq_len} must be at least 1")
  if batch_size < 1:
    raise ValueError(f"global_batch_size={batch_size} must be at least 1")


def _packed_rows(
  token_cache: TokenCache, documents: np.ndarray, data_cfg, tokenizer: Tokenizer, *, seed: int, shuffle: bool
) -> PackedRows:
  """Rows over `documents` (indices into the cache, or another source, in corpus order)."""
  if hasattr(token_cache, "packed_rows"):  # fine-tuning sources pack their own way
    return token_cache.packed_rows(documents, data_cfg.seq_len + 1, tokenizer, seed=seed, shuffle=shuffle)
  return PackedRows(
    lambda d, lo, hi: token_cache.tokens(int(documents[d]), lo, hi),
    token_cache.doc_length[documents],
    row_len=data_cfg.seq_len + 1,
    bos_id=tokenizer.bos_id,
    eos_id=tokenizer.eos_id,
    pad_id=tokenizer.pad_id,
    seed=seed,
    shuffle=shuffle,
  )
