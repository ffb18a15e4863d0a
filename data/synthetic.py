"""Synthetic batches shaped like the pipeline's, for benchmarks and tests that need no corpus or tokenizer."""

import numpy as np


def packed_batch(rng: np.random.Generator, batch: int, length: int, vocab: int, docs_per_row: int = 3) -> dict:
  """A batch shaped like the data pipeline's: several documents per row, segment ids, positions, loss mask."""
  tokens = rng.integers(1, vocab, (batch, length + 1))
  segment_ids = np.zeros((batch, length + 1), np.int32)
  positions = np.zeros((batch, length + 1), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), docs_per_row - 1, replace=False))
    bounds = [0, *cuts, length + 1]
    for doc, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
      segment_ids[row, a:b] = doc + 1
      positions[row, a:b] = np.arange(b - a)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  loss_mask = (segment_ids[:, 1:] == segment_ids[:, :-1]).astype(np.float32)
  return {
    "inputs": inputs.astype(np.int32),
    "targets": targets.astype(np.int32),
    "segment_ids": segment_ids[:, :-1],
    "positions": positions[:, :-1],
    "loss_mask": loss_mask,
  }
