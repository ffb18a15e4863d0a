"""Packing documents into fixed-length rows: each row a pure function of (seed, epoch, row index).

An epoch orders the documents (shuffled from the seed, or in corpus order), joins them into one stream
[BOS doc EOS][BOS doc EOS]..., and cuts the stream into rows of `row_len` tokens; the last row of an epoch is
padded. A document longer than a row continues in the next row of the stream, never dropped. Rows of an epoch
are then visited in a shuffled order, computed row by row (data/permutation.py), so serving a row costs the
same whatever the number of rows. Within a row, segment ids number the document fragments 1, 2, ... (0 is
padding) and positions count from 0 at the start of each fragment, also for a fragment continued from the
previous row. Because a row depends on nothing but its index, resuming at any row is exact and costs nothing.

Two options serve fine-tuning data (data/sft.py). `read_weights` gives every token a loss weight (a row then
has "loss_weights": the weight of each token as a target; BOS 0, EOS that of the document's last token), and
`whole_documents` never splits a document over rows: documents are truncated to a row (row_len - 2 tokens and
BOS, EOS), put in an order fixed by the seed, and packed next-fit (a row takes documents until the next one does
not fit); each epoch then visits these rows in a new shuffled order. A conversation thus always sees its own
prompt, and a row's packing no longer changes between epochs (so rows_per_epoch stays fixed).
"""

import functools
import math
import sys
from collections.abc import Callable

import numpy as np

from data.permutation import permutation_key, permute

# Global row indices run through epoch after epoch; "endless" is whatever fits a Python sequence length.
_ENDLESS = sys.maxsize
_SHUFFLE_SALT = 0x6B696C6E  # "kiln": keeps these orders apart from other users of the same seed
_PACKING_EPOCH = -1  # the key that orders documents for whole-document packing (epochs are >= 0)
# Within an epoch, documents and rows are ordered by two unrelated keys (else equal counts would share an order).
_DOCUMENT_ORDER, _ROW_ORDER = 0, 1


class PackedRows:
  """Random access to packed rows by global index (epoch * rows_per_epoch + row).

  Item i is a dict of int32 arrays of length row_len: "tokens", "segment_ids", "positions" (and float32
  "loss_weights" with `read_weights`). Documents are 0 .. len(lengths) - 1; `read(doc, lo, hi)` returns tokens
  [lo, hi) of one, `read_weights(doc, lo, hi)` their loss weights.
  """

  def __init__(
    self,
    read: Callable[[int, int, int], np.ndarray],
    lengths: np.ndarray,
    *,
    row_len: int,
    bos_id: int,
    eos_id: int,
    pad_id: int,
    seed: int,
    shuffle: bool,
    read_weights: Callable[[int, int, int], np.ndarray] | None = None,
    whole_documents: bool = False,
  ) -> None:
    assert len(lengths) > 0, "packing needs at least one document"
    assert row_len > 2 or not whole_documents, "a whole document needs room for BOS and EOS"
    self._read = read
    self._read_weights = read_weights
    self._lengths = np.asarray(lengths, dtype=np.int64)
    self.truncated = 0  # documents cut to fit a row (whole_documents only)
    if whole_documents:
      self.truncated = int(np.sum(self._lengths > row_len - 2))
      self._lengths = np.minimum(self._lengths, row_len - 2)
    self._row_len = row_len
    self._bos_id, self._eos_id, self._pad_id = bos_id, eos_id, pad_id
    self._seed = seed % 2**63
    self._shuffle = shuffle
    self.stream_len = int(self._lengths.sum()) + 2 * len(self._lengths)  # BOS and EOS per document
    self.rows_per_epoch = math.ceil(self.stream_len / row_len)
    self._whole_plan = self._plan_whole_rows() if whole_documents else None
    if self._whole_plan is not None:
      self.rows_per_epoch = len(self._whole_plan[1]) - 1
    # Per instance, so a train and an eval source do not evict each other; consecutive batches straddle at most
    # two epochs.
    self._epoch_plan = functools.lru_cache(maxsize=2)(self._plan_epoch)

  def __len__(self) -> int:
    return _ENDLESS

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    epoch, row = divmod(int(index), self.rows_per_epoch)
    if self._shuffle:
      row = shuffled_row(row, self.rows_per_epoch, seed=self._seed, epoch=epoch)
    if self._whole_plan is not None:
      return self._whole_row(row)
    document_order, stream_ends = self._epoch_plan(epoch)
    start = row * self._row_len
    end = min(start + self._row_len, self.stream_len)
    out = self._empty()
    segment_ids, positions = out["segment_ids"], out["positions"]
    # The first document whose stream span [stream_end - len - 2, stream_end) reaches past `start`.
    d = int(np.searchsorted(stream_ends, start, side="right"))
    written, segment = 0, 0
    while d < len(document_order) and written < end - start:
      doc = int(document_order[d])
      length = int(self._lengths[doc])
      doc_stream_start = int(stream_ends[d]) - length - 2
      # The part [a, b) of this document's stream span [0, length + 2) that falls in the row.
      a = max(start, doc_stream_start) - doc_stream_start
      b = min(end, int(stream_ends[d])) - doc_stream_start
      size = b - a
      segment += 1
      self._write_fragment(out, written, doc, length, a, b)
      segment_ids[written : written + size] = segment
      positions[written : written + size] = np.arange(size, dtype=np.int32)
      written += size
      d += 1
    return out

  def _empty(self) -> dict[str, np.ndarray]:
    return empty_row(self._row_len, self._pad_id, weighted=self._read_weights is not None)

  def _write_fragment(self, out: dict[str, np.ndarray], at: int, doc: int, length: int, a: int, b: int) -> None:
    """Writes positions [a, b) of [BOS] + tokens of doc + [EOS] into the row `out` from index `at` (and their
    loss weights: BOS 0, EOS that of the document's last token)."""
    tokens, weights = out["tokens"][at : at + b - a], out.get("loss_weights")
    i = 0
    if a == 0:
      tokens[0] = self._bos_id
      i = 1
    body_lo, body_hi = max(a - 1, 0), min(b - 1, length)
    if body_hi > body_lo:
      tokens[i : i + body_hi - body_lo] = self._read(doc, body_lo, body_hi)
      if weights is not None:
        weights[at + i : at + i + body_hi - body_lo] = self._read_weights(doc, body_lo, body_hi)
      i += body_hi - body_lo
    if b == length + 2:
      tokens[i] = self._eos_id
      if weights is not None and length > 0:
        weights[at + i] = self._read_weights(doc, length - 1, length)[0]
      i += 1
    assert i == b - a, f"fragment [{a}, {b}) of document {doc} filled {i} tokens"

  def _plan_whole_rows(self) -> tuple[np.ndarray, np.ndarray]:
    """(document order, row starts): row r holds documents order[starts[r]:starts[r + 1]], packed next-fit."""
    order = self._document_order(_PACKING_EPOCH)
    starts, used = [], self._row_len
    for i, span in enumerate((self._lengths[order] + 2).tolist()):
      if used + span > self._row_len:
        starts.append(i)
        used = 0
      used += span
    starts.append(len(order))
    return order, np.asarray(starts, dtype=np.int64)

  def _whole_row(self, row: int) -> dict[str, np.ndarray]:
    """Row `row` of the fixed packing (the epoch's visiting order is already applied)."""
    order, starts = self._whole_plan
    out = self._empty()
    written = 0
    for segment, doc in enumerate(order[starts[row] : starts[row + 1]].tolist(), start=1):
      length = int(self._lengths[doc])
      self._write_fragment(out, written, doc, length, 0, length + 2)
      out["segment_ids"][written : written + length + 2] = segment
      out["positions"][written : written + length + 2] = np.arange(length + 2, dtype=np.int32)
      written += length + 2
    return out

  def _plan_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(document order, cumulative stream ends in that order)."""
    document_order = self._document_order(epoch)
    return document_order, np.cumsum(self._lengths[document_order] + 2)

  def _document_order(self, epoch: int) -> np.ndarray:
    """Documents in the order of `epoch` (or of the whole-document packing): shuffled, or in corpus order."""
    num_documents = len(self._lengths)
    if not self._shuffle:
      return np.arange(num_documents)
    # The stream ends that follow need a pass over every document anyway, so the whole order is built here from
    # the same per-index permutation that orders rows: one shuffling mechanism for all of packing.
    return permute(
      np.arange(num_documents), num_documents, permutation_key(_SHUFFLE_SALT, self._seed, epoch, _DOCUMENT_ORDER)
    )


def shuffled_row(row: int, rows_per_epoch: int, *, seed: int, epoch: int) -> int:
  """The row of an epoch visited at position `row` when rows are shuffled: a pure function of its arguments,
  costing O(1) time and memory whatever rows_per_epoch."""
  return permute(row, rows_per_epoch, permutation_key(_SHUFFLE_SALT, seed, epoch, _ROW_ORDER))


def empty_row(row_len: int, pad_id: int, *, weighted: bool = False) -> dict[str, np.ndarray]:
  """A row of padding only: it contributes nothing to a loss. `weighted`: with zero "loss_weights"."""
  row = {
    "tokens": np.full(row_len, pad_id, dtype=np.int32),
    "segment_ids": np.zeros(row_len, dtype=np.int32),
    "positions": np.zeros(row_len, dtype=np.int32),
  }
  if weighted:
    row["loss_weights"] = np.zeros(row_len, dtype=np.float32)
  return row


def to_model_inputs(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Stacked rows [B, L+1] -> the batch the model trains on, fields [B, L]."""
  tokens, segment_ids = rows["tokens"], rows["segment_ids"]
  input_segments, target_segments = segment_ids[:, :-1], segment_ids[:, 1:]
  # A target counts only if it continues the input's document: no loss across boundaries or on padding.
  loss_mask = ((input_segments == target_segments) & (target_segments != 0)).astype(np.float32)
  if "loss_weights" in rows:  # fine-tuning data: e.g. only assistant tokens are targets
    loss_mask *= rows["loss_weights"][:, 1:]
  return {
    "inputs": tokens[:, :-1],
    "targets": tokens[:, 1:],
    "segment_ids": input_segments,
    "positions": rows["positions"][:, :-1],
    "loss_mask": loss_mask,
  }
