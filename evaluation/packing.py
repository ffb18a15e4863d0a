"""Packing teacher-forced requests into rows: pure functions of the request lengths (no lm-eval import)."""

from collections.abc import Sequence


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
  """First-fit decreasing: indices of `lengths` grouped into rows of at most `row_len` tokens, longest first.
  Deterministic (ties keep their order)."""
  assert all(0 < n <= row_len for n in lengths), (max(lengths, default=0), row_len)
  order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
  rows: list[list[int]] = []
  free: list[int] = []
  for i in order:
    for r, room in enumerate(free):
      if lengths[i] <= room:
        rows[r].append(i)
        free[r] -= lengths[i]
        break
    else:
      rows.append([i])
      free.append(row_len - lengths[i])
  return rows


def bucket(n: int, cap: int) -> int:
  """The row length of a call whose longest row holds n tokens: the next power of two (few compiles), <= cap."""
  return min(cap, 1 << max(n - 1, 0).bit_length())
