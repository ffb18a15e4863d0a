"""Throughput of the train step: `python scripts/benchmark.py --config configs/tiny.py [--layers 4,32] [--config.k=v]`.

Runs warm-up steps, then timed steps on synthetic packed batches (no tokenizer, no data loading: this measures
the model and the step), and prints step time, tokens/s, tokens/s per device, MFU, compile time and peak memory
for each compute dtype asked for, as a table and as one JSON line. The MFU denominator on CPU is the matmul
peak measured in this same process for that dtype, so ratios are comparable across CPU models.
"""

import json
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from trainer import cpu_host  # noqa: E402

cpu_host.prepare_heap()  # as train.py: glibc's heap settings before JAX (imported below) starts any thread

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data.synthetic import packed_batch  # noqa: E402
from parallel.mesh import make_mesh  # noqa: E402
from settings import ConfigError  # noqa: E402
from settings.load import check_overrides  # noqa: E402
from settings.validate import validate  # noqa: E402
from trainer.experiment import build  # noqa: E402
from trainer.metrics import flops_per_token, peak_flops_per_device  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_DTYPES = flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "Compute dtypes to measure, one after the other.")
_LAYERS = flags.DEFINE_list(
  "layers", [], "Layer counts (e.g. 4,32): also measure compile time against depth, in the first dtype."
)


def _peak_memory_bytes() -> tuple[int, str]:
  stats = jax.devices()[0].memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return int(stats["peak_bytes_in_use"]), "device peak_bytes_in_use"
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "host max RSS (whole process)"


def measure(cfg, steps: int, warmup: int) -> dict:
  mesh = make_mesh(cfg.mesh)
  exp = build(cfg, cfg.data.vocab_size, mesh)
  tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
  rng = np.random.default_rng(0)
  shape = (cfg.train.global_batch_size, cfg.data.seq_len, cfg.data.vocab_size)
  batches = [jax.device_put(packed_batch(rng, *shape, docs_per_row=4), exp.batch_sharding) for _ in range(2)]
  state, frozen = exp.init_state(), exp.load_frozen()
  start = time.perf_counter()
  compiled = exp.train_step.lower(exp.abstract_state(), exp.abstract_batch(), exp.abstract_frozen()).compile()
  compile_s = time.perf_counter() - start
  for i in range(warmup):
    state, metrics = compiled(state, batches[i % 2], frozen)
  jax.block_until_ready(state)
  faults_before, start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.perf_counter()
  for i in range(steps):
    state, metrics = compiled(state, batches[i % 2], frozen)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / steps
  faults_per_step = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / steps
  peak, peak_source = peak_flops_per_device(exp.model_cfg.dtype)
  tokens_per_sec = tokens_per_step / step_s
  memory, memory_source = _peak_memory_bytes()
  return {
    "compute_dtype": cfg.model.compute_dtype,
    "devices": jax.device_count(),
    "params": int(sum(x.size for x in jax.tree.leaves(exp.abstract_params))),
    "tokens_per_step": tokens_per_step,
    "step_s": step_s,
    "tokens_per_sec": tokens_per_sec,
    "tokens_per_sec_per_device": tokens_per_sec / jax.device_count(),
    "mfu": tokens_per_sec * flops_per_token(exp.model_cfg, cfg.data.seq_len) / (peak * jax.device_count()),
    "peak_flops_per_device": peak,
    "peak_source": peak_source,
    "compile_s": compile_s,
    "peak_memory_bytes": memory,
    # Host memory first touched during the timed steps (4 KiB pages): near 0 when the step reuses its buffers.
    "page_faults_per_step": faults_per_step,
    "memory_source": memory_source,
    "final_loss": float(metrics["loss"]),
  }


def main(argv):
  del argv
  cpu_host.prepare()  # as train.py does: the same dispatch and heap on a CPU backend
  cfg = _CONFIG.value
  results = []
  for dtype in _DTYPES.value:
    cfg.model.compute_dtype = dtype
    validate(cfg)
    results.append(measure(cfg, _STEPS.value, _WARMUP.value))
  device = jax.devices()[0].device_kind
  print(f"\n{flags.FLAGS['config'].config_filename} on {jax.device_count()} x {device}")
  header = (
    f"{'dtype':>9} {'step s':>8} {'tokens/s':>10} {'tok/s/dev':>10} {'MFU':>6} {'compile s':>9} {'peak mem':>10} "
    f"{'faults/step':>11}"
  )
  print(header)
  for r in results:
    print(
      f"{r['compute_dtype']:>9} {r['step_s']:8.3f} {r['tokens_per_sec']:10.0f} {r['tokens_per_sec_per_device']:10.0f} "
      f"{r['mfu']:6.1%} {r['compile_s']:9.1f} {r['peak_memory_bytes'] / 2**30:8.2f}GiB "
      f"{r['page_faults_per_step']:11.0f}"
    )
  for r in results:
    print(f"MFU peak for {r['compute_dtype']}: {r['peak_flops_per_device']:.3g} FLOP/s per device ({r['peak_source']})")
  summary = {"device": device, "results": results}
  if _LAYERS.value:
    summary["depth"] = _compile_against_depth(cfg, [int(n) for n in _LAYERS.value], _DTYPES.value[0])
  print(json.dumps(summary))


def _compile_against_depth(cfg, layer_counts: list[int], dtype: str) -> list[dict]:
  """Compile and step time at each depth: the stacked layers run under one scan, so compile time should
  barely grow with depth."""
  cfg.model.compute_dtype = dtype
  rows = []
  for layers in layer_counts:
    cfg.model.num_layers = layers
    validate(cfg)
    r = measure(cfg, steps=2, warmup=1)
    rows.append({"layers": layers, "compile_s": r["compile_s"], "step_s": r["step_s"]})
  print(f"\ncompile time against depth ({dtype}):\n{'layers':>6} {'compile s':>9} {'step s':>8} {'compile x':>9}")
  for row in rows:
    ratio = row["compile_s"] / rows[0]["compile_s"]
    print(f"{row['layers']:>6} {row['compile_s']:9.2f} {row['step_s']:8.3f} {ratio:9.2f}")
  return rows


if __name__ == "__main__":
  try:
    check_overrides(sys.argv)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  app.run(main)
