"""The rows of a weighted mixture: global row r comes from one source's own row stream, a pure function of
(weights, seed, r).

Rows go in blocks of `BLOCK_ROWS`. Each block gives source s a fixed number of slots, c_s (its weight's share
of the block, rounded by largest remainder), so every whole block holds exactly those counts and any window of
rows is within one block's rounding of the weights. Within block b, row offset o goes to slot
permute(o, BLOCK_ROWS, key(seed, b)) (data/permutation.py): slots [0, c_0) are source 0's, the next c_1 source 1's,
and so on; the k-th slot of source s in block b is its row b * c_s + k. Source rows are each source's packed
rows (shuffled per epoch within the source, and endless: a small source repeats epochs as its weight demands).

Nothing depends on the number of processes, and a row is found in O(1): resuming at a global row is exact.
Changing the weights on resume continues at the same global row of the new mixture, as if it had been used
from the start: each source's position is recomputed from the new counts, so some of its rows may be seen
again or skipped.
"""

import bisect

import numpy as np

from data.errors import DataError
from data.permutation import permutation_key, permute

BLOCK_ROWS = 1000  # weights with three decimals are exact over every block
_MIXTURE_SALT = 0x6D6978  # "mix": keeps this order apart from the packers' orders of the same seed


def block_counts(weights: list[float], names: list[str]) -> np.ndarray:
  """Slots per source in a block of BLOCK_ROWS: largest-remainder rounding of the normalized weights."""
  w = np.asarray(weights, np.float64)
  exact = w / w.sum() * BLOCK_ROWS
  counts = np.floor(exact).astype(np.int64)
  # The leftover slots go to the largest remainders, ties to the earlier source.
  order = sorted(range(len(w)), key=lambda s: (-(exact[s] - counts[s]), s))
  counts[order[: BLOCK_ROWS - int(counts.sum())]] += 1
  for name, weight, count in zip(names, weights, counts):
    if count == 0:
      raise DataError(
        f"data.files: source {name!r} has weight {weight:g}, under 1/{BLOCK_ROWS} of the total, so it would never be "
        "read; raise its weight or drop it"
      )
  return counts


def source_rows(rows: np.ndarray | int, counts: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(source, row within the source) of global rows `rows`."""
  rows = np.asarray(rows, np.int64)
  blocks, offsets = np.divmod(rows, BLOCK_ROWS)
  slots = np.empty_like(rows)
  for block in np.unique(blocks):
    at = blocks == block
    slots[at] = permute(offsets[at], BLOCK_ROWS, permutation_key(_MIXTURE_SALT, seed, int(block)))
  starts = np.concatenate([[0], np.cumsum(counts)])
  source = np.searchsorted(starts, slots, side="right") - 1
  return source, blocks * counts[source] + slots - starts[source]


class MixedRows:
  """Random access to the mixture's rows: item r is row `source_rows(r)[1]` of source `source_rows(r)[0]`."""

  def __init__(self, rows_per_source: list, weights: list[float], names: list[str], *, seed: int) -> None:
    self._rows = rows_per_source
    self.names = names
    self.counts = block_counts(weights, names)
    self._starts = np.concatenate([[0], np.cumsum(self.counts)]).tolist()
    self._seed = seed

  def __getitem__(self, row: int) -> dict[str, np.ndarray]:
    block, offset = divmod(int(row), BLOCK_ROWS)  # the scalar twin of source_rows, for one row at a time
    slot = permute(offset, BLOCK_ROWS, permutation_key(_MIXTURE_SALT, self._seed, block))
    source = bisect.bisect_right(self._starts, slot) - 1
    return self._rows[source][block * int(self.counts[source]) + slot - self._starts[source]]

  def source_of(self, rows) -> np.ndarray:
    return source_rows(rows, self.counts, self._seed)[0]
