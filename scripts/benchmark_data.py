"""Benchmark the data pipeline on the default corpus (or --files): time to first batch, then loader tokens/s.

  python scripts/benchmark_data.py [--seq_len 256] [--batch_size 16] [--steps 500] [--cache_dir DIR]

Runs a cold start (fresh cache dir: tokenizer training + tokenization) and a warm start (same cache dir) each in
a new Python process, timed from launch to the first batch, then iterates --steps batches in this process.
Prints a table and one JSON line.
"""

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time

_LAUNCHED = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _data_cfg(args: argparse.Namespace):
  from configs.base import base_config

  cfg = base_config().data
  cfg.seq_len = args.seq_len
  cfg.cache_dir = args.cache_dir
  cfg.files = args.files
  return cfg


def _sharding():
  """The batch on this process's first device: the loader's own cost, without a mesh to spread it over."""
  import jax

  mesh = jax.sharding.Mesh(jax.local_devices()[:1], ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))


def _first_batch(args: argparse.Namespace) -> dict:
  """Runs in a child process: build or reuse everything, take one batch, report the phases."""
  imported = time.perf_counter()
  import data

  cfg = _data_cfg(args)
  start = time.perf_counter()
  tokenizer = data.load_tokenizer(cfg, None)
  tokenizer_ready = time.perf_counter()
  iterator = data.make_train_iterator(cfg, tokenizer, global_batch_size=args.batch_size, seed=0, sharding=_sharding())
  next(iterator)
  done = time.perf_counter()
  return {
    "import_s": start - imported,
    "tokenizer_s": tokenizer_ready - start,
    "cache_and_first_batch_s": done - tokenizer_ready,
  }


def _timed_child(args: argparse.Namespace) -> dict:
  command = [sys.executable, os.path.abspath(__file__), "--_first_batch_only"]
  command += ["--seq_len", str(args.seq_len), "--batch_size", str(args.batch_size), "--cache_dir", args.cache_dir]
  command += ["--files", args.files]
  start = time.perf_counter()
  result = subprocess.run(command, check=True, capture_output=True, text=True)
  seconds = time.perf_counter() - start
  phases = json.loads(result.stdout.strip().splitlines()[-1])
  return {"seconds_to_first_batch": seconds, **phases}


def _throughput(args: argparse.Namespace) -> dict:
  import numpy as np

  import data
  from data.token_cache import load_token_cache

  cfg = _data_cfg(args)
  tokenizer = data.load_tokenizer(cfg, None)
  cache = load_token_cache(cfg, tokenizer)
  iterator = data.make_train_iterator(cfg, tokenizer, global_batch_size=args.batch_size, seed=0, sharding=_sharding())
  next(iterator)  # leave the first batch (and its epoch plan) out of the timing
  real_tokens = 0.0
  start = time.perf_counter()
  for _ in range(args.steps):
    real_tokens += float(np.sum(next(iterator)["loss_mask"]))
  seconds = time.perf_counter() - start
  tokens = args.steps * args.batch_size * args.seq_len
  held_out = cache.held_out(cfg.eval_fraction)
  train_lengths, eval_lengths = cache.doc_length[~held_out], cache.doc_length[held_out]
  return {
    "tokens_per_sec": tokens / seconds,
    "batches_per_sec": args.steps / seconds,
    "loss_tokens_fraction": real_tokens / tokens,
    "corpus": cache.corpus_description,
    "vocab_size": tokenizer.vocab_size,
    "train_docs": len(train_lengths),
    "train_tokens": int(train_lengths.sum()),
    "eval_docs": len(eval_lengths),
    "eval_tokens": int(eval_lengths.sum()),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--batch_size", type=int, default=16)
  parser.add_argument("--steps", type=int, default=500)
  parser.add_argument("--files", default="", help="data.files; empty: the default corpus")
  parser.add_argument("--cache_dir", default="", help="warm-start cache; default: a fresh temporary directory")
  parser.add_argument("--_first_batch_only", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args._first_batch_only:
    print(json.dumps(_first_batch(args)))
    return

  logging.basicConfig(level=logging.WARNING)
  with tempfile.TemporaryDirectory(prefix="kiln-benchmark-") as scratch:
    if not args.cache_dir:
      args.cache_dir = os.path.join(scratch, "cache")
    first = _timed_child(args)
    second = _timed_child(args)
    loop = _throughput(args)
  results = {
    "seq_len": args.seq_len,
    "batch_size": args.batch_size,
    "steps": args.steps,
    "cpu_count": os.cpu_count(),
    "first_run_s": first["seconds_to_first_batch"],
    "second_run_s": second["seconds_to_first_batch"],
    "first_run_phases": first,
    "second_run_phases": second,
    **loop,
  }
  rows = [
    ("corpus", loop["corpus"]),
    ("documents train / eval", f"{loop['train_docs']} / {loop['eval_docs']}"),
    ("tokens train / eval", f"{loop['train_tokens']:,} / {loop['eval_tokens']:,}"),
    ("first run, cold cache: s to first batch", f"{first['seconds_to_first_batch']:.2f}"),
    ("  of which tokenizer / tokens + batch", f"{first['tokenizer_s']:.2f} / {first['cache_and_first_batch_s']:.2f}"),
    ("second run, warm cache: s to first batch", f"{second['seconds_to_first_batch']:.2f}"),
    ("  of which imports", f"{second['import_s']:.2f}"),
    (f"loader tokens/s (B={args.batch_size}, L={args.seq_len})", f"{loop['tokens_per_sec']:,.0f}"),
    ("fraction of positions with loss", f"{loop['loss_tokens_fraction']:.4f}"),
  ]
  width = max(len(name) for name, _ in rows)
  for name, value in rows:
    print(f"{name:<{width}}  {value}")
  print(json.dumps(results))


if __name__ == "__main__":
  main()
