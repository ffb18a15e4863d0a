"""What the model will see: the first training steps' rows of a config, as the trainer builds them.

  python scripts/inspect_data.py --config configs/C.py [--config.data.KEY=VALUE ...] [--steps N] [--rows K]

Prints each source's share of the real (non-padding) tokens over the first N steps against its weight, the
padding fraction, document length statistics per source (in tokens, training documents), and the first K rows
decoded; ends with one JSON line {"steps", "rows", "tokens", "padding_fraction", "sources": {name: {"weight",
"token_share", "documents", "doc_tokens_mean", "doc_tokens_p50", "doc_tokens_p90", "doc_tokens_max"}}}. Uses the
config's cache dir (a prepared one is read as it is; otherwise the cache is built as a run would build it).
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def inspect(cfg, steps: int, decode_rows: int = 3) -> dict:
  """The summary of the first `steps` steps' rows of `cfg` (rows by global index, the trainer's row function)."""
  import data
  from data import pipeline
  from data.token_cache import MixtureCache

  tokenizer = data.load_tokenizer(cfg.data, None)
  cache = data.load_token_cache(cfg.data, tokenizer)
  rows = pipeline.train_rows(cache, cfg.data, tokenizer, seed=cfg.train.seed)
  sources = cache.sources if isinstance(cache, MixtureCache) else [("corpus", 1.0, cache)]
  count = steps * cfg.train.global_batch_size
  real = np.zeros(len(sources), np.int64)
  of_source = rows.source_of(np.arange(count)) if isinstance(cache, MixtureCache) else np.zeros(count, np.int64)
  built, padding = [], 0
  for r in range(count):
    row = rows[r]
    built.append(row)
    tokens = int(np.sum(row["segment_ids"] != 0))
    real[of_source[r]] += tokens
    padding += row["segment_ids"].size - tokens
  total_weight = sum(w for _, w, _ in sources)
  summary = {"steps": steps, "rows": count, "tokens": int(real.sum() + padding)}
  summary["padding_fraction"] = padding / max(summary["tokens"], 1)
  summary["sources"] = {}
  for s, (name, weight, source_cache) in enumerate(sources):
    lengths = source_cache.doc_length[~source_cache.held_out(cfg.data.eval_fraction)]
    summary["sources"][name] = {
      "weight": weight / total_weight,
      "token_share": float(real[s] / max(real.sum(), 1)),
      "documents": len(lengths),
      "doc_tokens_mean": float(lengths.mean()) if len(lengths) else 0.0,
      "doc_tokens_p50": float(np.percentile(lengths, 50)) if len(lengths) else 0.0,
      "doc_tokens_p90": float(np.percentile(lengths, 90)) if len(lengths) else 0.0,
      "doc_tokens_max": int(lengths.max()) if len(lengths) else 0,
    }
  summary["_decoded"] = [
    (sources[of_source[r]][0], tokenizer.decode(built[r]["tokens"])) for r in range(min(decode_rows, count))
  ]
  return summary


def main(argv: list[str]) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--steps", type=int, default=10, help="training steps whose rows are inspected")
  parser.add_argument("--rows", type=int, default=3, help="rows printed decoded")
  args, rest = parser.parse_known_args(argv)
  from data import DataError
  from settings import ConfigError
  from settings.load import load_with_overrides

  overrides = [a for a in rest if a.startswith("--config.")]
  if len(overrides) != len(rest):
    parser.error(f"unknown arguments: {' '.join(a for a in rest if a not in overrides)}")
  try:
    cfg = load_with_overrides(args.config, overrides)
    if args.steps < 1:
      raise ConfigError(f"--steps={args.steps} must be at least 1")
    summary = inspect(cfg, args.steps, args.rows)
  except (DataError, ConfigError) as e:
    print(f"inspect_data: {e}", file=sys.stderr)
    return 2
  decoded = summary.pop("_decoded")
  print(f"{summary['rows']} rows ({summary['steps']} steps x {cfg.train.global_batch_size}), "
        f"{summary['tokens']} tokens, padding {summary['padding_fraction']:.2%}")  # fmt: skip
  for name, s in summary["sources"].items():
    lengths = f"mean {s['doc_tokens_mean']:.0f} p50 {s['doc_tokens_p50']:.0f} p90 {s['doc_tokens_p90']:.0f}"
    print(f"  {name}: weight {s['weight']:.3f}, token share {s['token_share']:.3f}; {s['documents']} training "
          f"documents, tokens {lengths} max {s['doc_tokens_max']}")  # fmt: skip
  for r, (name, text) in enumerate(decoded):
    print(f"--- row {r} ({name}) ---\n{text}")
  print(json.dumps(summary))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
