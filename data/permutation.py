"""A keyed permutation of [0, n) computed one index at a time: O(1) memory per index, no table of n entries.

`permute(i, n, key)` is the position that a shuffle keyed by `key` sends index i to. Guarantees:
- for every n >= 1 and every key, i -> permute(i, n, key) is a bijection of [0, n);
- it is a pure function of (i, n, key): the same on every process, run and platform (64-bit integer arithmetic
  only, no random generator state);
- arrays of indices are mapped elementwise with the same result as one index at a time, in memory linear in the
  array (not in n).
It is a shuffle, not a cipher: good enough that neighbouring indices land far apart, each index lands at each
position about equally often over keys, and different keys give unrelated orders; no claim to resist an adversary.

How: a Feistel network over [0, 2^bits), the smallest power of two covering both n and 16, whose halves may
differ by a bit (so the domain stays under 2n for n > 8), with a multiply-xorshift hash as its round function.
A Feistel network is a bijection of its domain whatever the round function. An index that lands in [n, 2^bits)
is sent through the network again ("cycle-walking") until it lands in [0, n): this stays a bijection of [0, n)
because it follows the domain permutation's cycles, mapping each index of [0, n) to the next element of [0, n)
on its cycle. With the domain under 2n, a walk takes under two passes on average.
"""

import functools

import numpy as np

_ROUNDS = 6  # four suffice for a Feistel network to look random; more mix small domains (a few bits) better
_MASK64 = 2**64 - 1
_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio: spreads consecutive round numbers over 64 bits

# The network is written once for both kinds of 64-bit word: a Python int for one index (a row served on its own,
# where numpy's overhead per operation on a one-element array would outweigh the arithmetic) and a numpy uint64
# array for many. Python ints are masked to 64 bits after each multiply; uint64 arrays wrap, the mask a no-op.
_Word = int | np.ndarray


def permutation_key(*parts: int) -> int:
  """A 64-bit key from integers (a salt, a seed, an epoch, ...): a different tuple gives an unrelated key."""
  key = 0
  for part in parts:
    # The offset keeps a zero part from leaving the state at zero (the mixer maps 0 to 0).
    key = _mix64(((key + _GOLDEN) & _MASK64) ^ (part & _MASK64))
  return key


def permute(index: int | np.ndarray, n: int, key: int) -> int | np.ndarray:
  """The position of `index` (an int, or an array of them, each in [0, n)) in the order keyed by `key`.

  An int gives an int; an array gives an int64 array of its shape.
  """
  assert n >= 1, f"a permutation of [0, {n}) has nothing to permute"
  # At least 16 elements: over two or three bits a Feistel network has so few round functions that some positions
  # are visibly favoured (n = 5 over [0, 8)); a tiny n cycle-walks a few more passes instead.
  bits = max(4, (n - 1).bit_length())
  round_keys = _round_keys(key)
  indices = np.asarray(index)
  if indices.ndim == 0:
    x = int(index)
    assert 0 <= x < n, f"index {x} outside [0, {n})"
    x = _feistel(x, bits, round_keys)
    while x >= n:
      x = _feistel(x, bits, round_keys)
    return x
  assert np.all((indices >= 0) & (indices < n)), f"index outside [0, {n})"
  out = _feistel(indices.reshape(-1).astype(np.uint64), bits, round_keys)
  walking = np.flatnonzero(out >= n)
  while len(walking):
    out[walking] = _feistel(out[walking], bits, round_keys)
    walking = walking[out[walking] >= n]
  return out.astype(np.int64).reshape(indices.shape)


# One key orders a whole epoch of rows, each row a call of its own: derive its round keys once.
@functools.lru_cache(maxsize=16)
def _round_keys(key: int) -> tuple[int, ...]:
  return tuple(_mix64((key + round_number * _GOLDEN) & _MASK64) for round_number in range(1, _ROUNDS + 1))


def _feistel(x: _Word, bits: int, round_keys: tuple[int, ...]) -> _Word:
  """One pass of the network over [0, 2^bits): x = left (high `a` bits) : right (low `b` bits), a + b = bits."""
  a, b = bits - bits // 2, bits // 2
  for round_key in round_keys:
    left, right = x >> b, x & ((1 << b) - 1)
    # (left, right) -> (right, left ^ F(right)): invertible given F, so a bijection; the halves swap widths.
    x = (right << a) | (left ^ (_mix64(right ^ round_key) & ((1 << a) - 1)))
    a, b = b, a
  return x


def _mix64(z: _Word) -> _Word:
  """A bijection of 64-bit words whose every output bit depends on every input bit (splitmix64's finaliser)."""
  z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
  return z ^ (z >> 31)
