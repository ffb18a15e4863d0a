"""What the trainer calls: a checkpointable training iterator, fixed eval batches, global batch assembly.

Every batch is a dict of [B, L] numpy arrays (L = data.seq_len), taken from packed rows of L + 1 tokens:
  inputs       int32    row[:-1]
  targets      int32    row[1:]
  segment_ids  int32    of inputs: 0 padding, 1, 2, ... the document fragments within the row
  positions    int32    of inputs: position within the document fragment
  loss_mask    float32  1.0 where the target is a real token of the input's document, else 0.0
"""

import math

import grain
import jax
import numpy as np

from data.errors import DataError
from data.packing import PackedRows, empty_row, to_model_inputs
from data.token_cache import TokenCache, load_token_cache
from data.tokenizer import Tokenizer

# Batches are cheap to cut from memory-mapped tokens: one background thread, a short queue, so the host keeps
# a few batches ready without competing with the train step for the GIL.
_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


def make_train_iterator(
  data_cfg,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  seed: int,
  process_index: int = 0,
  process_count: int = 1,
) -> grain.DatasetIterator:
  """Endless shuffled training batches of this process's shard, `batch_size` rows each.

  Documents are split into `data.shards` shards (0: one per process); a process reads only its own. With more
  shards than processes a process serves several, its batch made of equal parts of each, so one process with
  data.shards=2 sees exactly the global batches that two processes see together.

  Step s holds rows s * batch_size ... of the epoch-after-epoch row stream, so the iterator's state is one
  index: get_state()/set_state() and grain.checkpoint.CheckpointSave/CheckpointRestore resume exactly and
  instantly. Restoring needs the same data config, seed, batch size and process layout.
  """
  _check_sizes(data_cfg.seq_len, batch_size)
  shards = data_cfg.shards or process_count
  if shards % process_count or batch_size % (shards // process_count):
    raise DataError(
      f"data.shards={shards} must be a multiple of the {process_count} processes, and each process's "
      f"{batch_size} rows a multiple of its {shards // process_count or 1} shards; change data.shards"
    )
  per_process = shards // process_count
  shard_batches = []
  for shard in range(process_index * per_process, (process_index + 1) * per_process):
    token_cache = load_token_cache(data_cfg, tokenizer, process_index=shard, process_count=shards)
    starts, lengths = token_cache.split(held_out=False)
    if len(starts) == 0:
      raise DataError(
        f"no training documents in shard {shard} of {shards} of {token_cache.corpus_description} once empty, "
        "undecodable and held-out ones are left out; add documents, lower data.eval_fraction or data.shards"
      )
    rows = _packed_rows(token_cache, starts, lengths, data_cfg, tokenizer, seed=seed, shuffle=data_cfg.shuffle)
    shard_batches.append(grain.MapDataset.source(rows).batch(batch_size // per_process, drop_remainder=True))
  if per_process == 1:
    batches = shard_batches[0]
  else:  # this process stands in for several shards: its rows are theirs, side by side
    batches = grain.experimental.ZipMapDataset(parents=shard_batches).map(_concatenate_rows)
  batches = batches.map(to_model_inputs)
  return iter(batches.to_iter_dataset(_READ_OPTIONS))


def make_eval_batches(
  data_cfg,
  tokenizer: Tokenizer,
  *,
  batch_size: int,
  num_batches: int,
  process_index: int = 0,
  process_count: int = 1,
) -> list[dict[str, np.ndarray]]:
  """Up to `num_batches` fixed batches of the held-out documents, in corpus order, the same on every call.

  Step s takes the global rows [s * batch_size * process_count, ...) of the held-out stream, this process
  the slice at process_index * batch_size. Every process returns the same number of batches (at least one;
  fewer than asked when the split is small); missing rows at the end are all padding (loss_mask 0).
  """
  _check_sizes(data_cfg.seq_len, batch_size)
  # Every shard's cache holds all held-out documents: read this process's first training shard, which the
  # training iterator builds anyway, rather than tokenize a cache of its own.
  shards = data_cfg.shards or process_count
  first_shard = process_index * max(shards // process_count, 1)
  token_cache = load_token_cache(data_cfg, tokenizer, process_index=first_shard, process_count=shards)
  starts, lengths = token_cache.split(held_out=True)
  if len(starts) == 0:
    raise DataError(
      f"no held-out documents in {token_cache.corpus_description}: data.eval_fraction={data_cfg.eval_fraction} "
      "selected none; raise data.eval_fraction or add documents"
    )
  rows = _packed_rows(token_cache, starts, lengths, data_cfg, tokenizer, seed=0, shuffle=False)
  rows_per_step = batch_size * process_count
  count = min(num_batches, math.ceil(rows.rows_per_epoch / rows_per_step))
  padding = empty_row(data_cfg.seq_len + 1, tokenizer.pad_id)
  batches = []
  for step in range(count):
    first = step * rows_per_step + process_index * batch_size
    picked = [rows[i] if i < rows.rows_per_epoch else padding for i in range(first, first + batch_size)]
    batches.append(to_model_inputs({k: np.stack([row[k] for row in picked]) for k in padding}))
  return batches


def _concatenate_rows(parts: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
  return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}


def global_batch(local_batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
  """Joins every process's local rows into global arrays laid out by `sharding` ([batch, length])."""
  return {name: jax.make_array_from_process_local_data(sharding, value) for name, value in local_batch.items()}


def _check_sizes(seq_len: int, batch_size: int) -> None:
  if seq_len < 1:
    raise DataError(f"data.seq_len={seq_len} must be at least 1")
  if batch_size < 1:
    raise ValueError(f"batch_size={batch_size} must be at least 1")


def _packed_rows(
  token_cache: TokenCache,
  starts: np.ndarray,
  lengths: np.ndarray,
  data_cfg,
  tokenizer: Tokenizer,
  *,
  seed: int,
  shuffle: bool,
) -> PackedRows:
  return PackedRows(
    token_cache.tokens,
    starts,
    lengths,
    row_len=data_cfg.seq_len + 1,
    bos_id=tokenizer.bos_id,
    eos_id=tokenizer.eos_id,
    pad_id=tokenizer.pad_id,
    seed=seed,
    shuffle=shuffle,
  )
