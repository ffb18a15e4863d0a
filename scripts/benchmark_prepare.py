"""Benchmark corpus preparation and reading a prepared cache; ends with one JSON line.

  python scripts/benchmark_prepare.py [--files GLOB] [--workers 1,2] [--cache_gb 1.0] [--read_mb 64] [--work DIR]

1. The tokenizer's own single-core rate over the corpus (MB of text per second), then scripts/prepare_data.py
   (Beam DirectRunner, multi-processing) over the same corpus with each worker count: MB/s of the whole pipeline.
   Default corpus: the standard library's Python files (about 31 MB), in units of 2 MB.
2. Trainer start-up from a prepared cache of `--cache_gb` GB of synthetic tokens (random ids, documents of 1-2,000
   tokens, 16 MB unit files): a new process loads the tokenizer, opens the cache and builds its first batch.
3. Read rate in rows/s of a `--read_mb` MB synthetic prepared cache, local and in a bucket of the GCS emulator
   (gcp-storage-emulator on 127.0.0.1): batches of 32 rows of 2,048 tokens from the trainer's iterator.
"""

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

_SEQ_LEN, _BATCH = 2048, 32


def _cfg(files: str, cache_dir: str, tokenizer: str = ""):
  from configs.base import base_config

  cfg = base_config().data
  cfg.files, cfg.cache_dir, cfg.tokenizer = files, cache_dir, tokenizer
  cfg.seq_len, cfg.num_workers = _SEQ_LEN, 0
  return cfg


def _prepare_rates(files: str, work: str, workers: list[int], unit_mb: float) -> tuple[dict, str]:
  import data
  from data.prepare import tokenizer_rate

  tokenizer = data.load_tokenizer(_cfg(files, os.path.join(work, "tokenizer")), None)
  out = {"tokenizer_single_core": tokenizer_rate(_cfg(files, ""), tokenizer, 1 << 40)}
  for n in workers:
    proc = subprocess.run(
      [
        sys.executable,
        os.path.join(REPO, "scripts/prepare_data.py"),
        "--config",
        os.path.join(REPO, "configs/tiny.py"),
        f"--config.data.files={files}",
        f"--config.data.tokenizer={tokenizer.model_path}",
        f"--config.data.unit_bytes={int(unit_mb * 1e6)}",
        f"--out={os.path.join(work, f'prepared_{n}')}",
        f"--direct_num_workers={n}",
      ],
      capture_output=True,
      text=True,
      env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out[f"direct_runner_{n}_workers"] = json.loads(proc.stdout.strip().splitlines()[-1])
  return out, tokenizer.model_path


def synthetic_prepared_cache(root: str, tokenizer_path: str, total_bytes: int, vocab_size: int) -> str:
  """A prepared cache of random tokens (uint16), written with the cache's own writer and manifest; returns files."""
  import numpy as np
  from etils import epath

  from data import prepared, token_cache
  from data.sources import Unit

  rng = np.random.default_rng(0)
  files = "synthetic/*.txt"  # recorded in the manifest, never listed
  cfg = _cfg(files, root, tokenizer_path)
  units, unit_tokens, written = [], 8 << 20, 0  # 16 MB of uint16 tokens per unit
  while written < total_bytes:
    lengths = rng.integers(1, 2000, size=unit_tokens // 1000)
    ids = rng.integers(4, vocab_size, size=int(lengths.sum())).astype(np.uint16)
    hashes = rng.random(len(lengths))
    unit = Unit(len(units), "text", (), 0, 0)
    path = epath.Path(root) / "tokens" / f"synthetic-{unit.index:05d}.bin"
    token_cache.write_unit(path, unit, [((ids, lengths), list(hashes))], np.dtype(np.uint16))
    units.append(f"tokens/{path.name}")
    written += ids.nbytes
  prepared.write_manifest(cfg, tokenizer_path, [("", files, units)])
  return files


def _start_up(root: str, files: str, tokenizer_path: str) -> dict:
  """In a new process: seconds from launch to the first batch, with a breakdown."""
  code = f"""
import time, json, sys
launched = time.perf_counter()
sys.path.insert(0, {REPO!r})
import jax, data
from scripts.benchmark_prepare import _cfg, _one_device
imported = time.perf_counter()
cfg = _cfg({files!r}, {root!r}, {tokenizer_path!r})
tokenizer = data.load_tokenizer(cfg, None)
cache = data.load_token_cache(cfg, tokenizer)
opened = time.perf_counter()
next(data.make_train_iterator(cfg, tokenizer, global_batch_size={_BATCH}, seed=0, sharding=_one_device(),
                              token_cache=cache))
done = time.perf_counter()
print(json.dumps({{"import_s": imported - launched, "open_cache_s": opened - imported,
                  "first_batch_s": done - opened, "start_up_s": done - imported, "documents": len(cache)}}))
"""
  start = time.perf_counter()
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                        "JAX_PLATFORMS": "cpu"})  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-2000:]
  return {**json.loads(proc.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - start}


def _one_device():
  import jax

  mesh = jax.sharding.Mesh(jax.local_devices()[:1], ("data",))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", None))


def _read_rate(root: str, files: str, tokenizer_path: str, batches: int) -> float:
  import data

  cfg = _cfg(files, root, tokenizer_path)
  tokenizer = data.load_tokenizer(cfg, None)
  iterator = data.make_train_iterator(cfg, tokenizer, global_batch_size=_BATCH, seed=0, sharding=_one_device())
  next(iterator)
  start = time.perf_counter()
  for _ in range(batches):
    next(iterator)
  rate = batches * _BATCH / (time.perf_counter() - start)
  iterator.close()
  return rate


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--files", default=os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"))
  parser.add_argument("--unit_mb", type=float, default=2.0, help="data.unit_bytes of the preparation, in MB")
  parser.add_argument("--workers", default="1,2")
  parser.add_argument("--cache_gb", type=float, default=1.0)
  parser.add_argument("--read_mb", type=float, default=64)
  parser.add_argument("--read_batches", type=int, default=10)
  parser.add_argument("--work", default="")
  args = parser.parse_args()
  work = args.work or tempfile.mkdtemp(prefix="kiln-bench-prepare-")
  result = {"machine": f"{os.cpu_count()} CPU cores", "files": args.files}
  workers = [int(n) for n in args.workers.split(",")]
  result["prepare"], tokenizer_path = _prepare_rates(args.files, work, workers, args.unit_mb)
  print(json.dumps(result), file=sys.stderr)  # so far, in case a later part fails
  import data

  vocab_size = data.Tokenizer(tokenizer_path).vocab_size
  big = os.path.join(work, "synthetic_big")
  files = synthetic_prepared_cache(big, tokenizer_path, int(args.cache_gb * 1e9), vocab_size)
  result["start_up"] = {"cache_bytes": sum(e.stat().st_size for e in os.scandir(os.path.join(big, "tokens"))),
                        **_start_up(big, files, tokenizer_path)}  # fmt: skip
  small = os.path.join(work, "synthetic_small")
  files = synthetic_prepared_cache(small, tokenizer_path, int(args.read_mb * 1e6), vocab_size)
  result["read_rows_per_s"] = {"local": _read_rate(small, files, tokenizer_path, args.read_batches)}
  from etils import epath

  from storage.emulator import local_gcs

  with local_gcs("kiln-bench") as bucket_url:
    bucket = f"{bucket_url}/prepared"
    for directory, _, names in os.walk(small):
      for name in names:
        path = os.path.join(directory, name)
        (epath.Path(bucket) / os.path.relpath(path, small)).write_bytes(open(path, "rb").read())
    result["read_rows_per_s"]["gcs_emulator"] = _read_rate(bucket, files, tokenizer_path, args.read_batches)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
