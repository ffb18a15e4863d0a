"""Named held-out sets (`data.eval_files = "wiki:/path/*.txt,code:/path/*.py"`): every document of each set,
packed as training packs the corpus, scored at every evaluation beside the corpus's own held-out split and
logged as `eval_loss/<name>` and `eval_ppl/<name>`.

A set is its own small corpus read with the run's data settings (tokenizer, token cache, seq_len); all of its
documents are evaluated (no fraction), in corpus order, up to `train.eval_batches` batches.
"""

import math
import re

import numpy as np

from settings import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_eval_files(spec: str) -> list[tuple[str, str]]:
  """[(name, comma-free glob)] of `data.eval_files`; a malformed item is a one-line ConfigError."""
  sets = []
  for item in (s.strip() for s in spec.split(",") if s.strip()):
    name, sep, pattern = item.partition(":")
    if not sep or not _NAME.match(name) or not pattern or "://" in f"{name}:{pattern[:2]}":
      raise ConfigError(
        f"config.data.eval_files item {item!r} is not NAME:GLOB (a name of letters, digits, _ . -); "
        'e.g. "wiki:/data/wiki/*.txt,code:/data/code/*.py"'
      )
    if name in dict(sets):
      raise ConfigError(f"config.data.eval_files names {name!r} twice; give each held-out set its own name")
    sets.append((name, pattern))
  return sets


def named_eval_batches(data_cfg, tokenizer, *, global_batch_size: int, num_batches: int, sharding) -> dict:
  """{name: fixed eval batches (as data.make_eval_batches gives)} of every set in `data_cfg.eval_files`."""
  from data.packing import empty_row
  from data.pipeline import GlobalBatches, _packed_rows
  from data.sources import mixture
  from data.token_cache import load_token_cache

  sets = parse_eval_files(data_cfg.get("eval_files", ""))
  sources = {source.name for source in mixture(data_cfg.files) or []}
  for name, _ in sets:
    if name in sources:
      raise ConfigError(
        f"config.data.eval_files names {name!r}, a source of the data.files mixture too: both would log "
        f"eval_loss/{name}; give the held-out set another name"
      )
  batches = {}
  for name, pattern in sets:
    set_cfg = data_cfg.copy_and_resolve_references()
    set_cfg.files = pattern
    token_cache = load_token_cache(set_cfg, tokenizer)
    documents = np.arange(len(token_cache))
    rows = _packed_rows(token_cache, documents, set_cfg, tokenizer, seed=0, shuffle=False)
    padding = empty_row(set_cfg.seq_len + 1, tokenizer.pad_id, weighted="loss_weights" in rows[0])
    row_at = lambda r, rows=rows, padding=padding: rows[r] if r < rows.rows_per_epoch else padding
    global_batches = GlobalBatches(row_at, global_batch_size, set_cfg.seq_len, sharding)
    count = min(num_batches, math.ceil(rows.rows_per_epoch / global_batch_size))
    batches[name] = [global_batches.at(step * global_batch_size) for step in range(count)]
  return batches
