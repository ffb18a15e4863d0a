"""Tokens/s of context parallelism's two strategies, ring and all_gather, on one sequence split over the devices.

  python scripts/benchmark_context.py [--config configs/tiny.py] [--seq_lens 4096,16384] [--context 8] [--steps 3]

Each (sequence length, strategy) builds the config's train step with mesh.context = --context (every other axis
1), one sequence per step, and times --steps steps after two warm-up steps (compilation). Prints a table and one
JSON line. On a CPU host the devices are emulated (XLA_FLAGS=--xla_force_host_platform_device_count, set here
to --context when unset): they share the host's cores, so the figures measure the compute each strategy does and
XLA:CPU's cost of its collectives (memory copies), never an interconnect: a ring's overlap of transfer and compute
cannot show, and neither can all_gather's traffic. On accelerators the same script times the real program.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_EMULATION = (
  "emulated CPU devices share the host's cores: compute and in-memory collectives, no interconnect, no overlap"
)


def measure(config: str, seq_len: int, strategy: str, context: int, steps: int) -> dict:
  """One setting's `step_s` (mean over `steps` after two warm-up steps), `tokens_per_sec` and `compile_s`."""
  import jax
  import numpy as np

  from data import synthetic
  from parallel.mesh import make_mesh
  from settings.load import load_config_file
  from trainer.experiment import build

  cfg = load_config_file(config)
  cfg.data.seq_len = seq_len
  cfg.train.global_batch_size = 1
  for axis in ("data", "fsdp", "expert", "tensor", "stage"):
    cfg.mesh[axis] = 1
  cfg.mesh.context = context
  cfg.model.context_parallel = strategy
  exp = build(cfg, cfg.data.vocab_size, make_mesh(cfg.mesh, jax.devices()[:context]))
  start = time.perf_counter()
  step = exp.train_step.lower(exp.abstract_state(), exp.abstract_batch(), {}).compile()
  compile_s = time.perf_counter() - start
  state = exp.init_state()
  rng = np.random.default_rng(0)
  batch = jax.device_put(synthetic.packed_batch(rng, 1, seq_len, cfg.data.vocab_size, 4), exp.batch_sharding)
  times = []
  for i in range(steps + 2):
    start = time.perf_counter()
    state, metrics = step(state, batch, {})
    jax.block_until_ready(metrics["loss"])
    if i >= 2:
      times.append(time.perf_counter() - start)
  step_s = float(np.mean(times))
  return {
    "seq_len": seq_len,
    "strategy": strategy,
    "context": context,
    "step_s": round(step_s, 4),
    "tokens_per_sec": round(seq_len / step_s, 1),
    "compile_s": round(compile_s, 1),
    "loss": round(float(metrics["loss"]), 4),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/tiny.py")
  parser.add_argument("--seq_lens", default="4096,16384")
  parser.add_argument("--context", type=int, default=8)
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args()
  if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (
      os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={args.context}"
    ).strip()
  import jax

  results = []
  for seq_len in (int(s) for s in args.seq_lens.split(",")):
    for strategy in ("ring", "all_gather"):
      results.append(measure(args.config, seq_len, strategy, args.context, args.steps))
      r = results[-1]
      print(f"seq {seq_len:>6}  {strategy:<10}  {r['tokens_per_sec']:>9.1f} tokens/s  step {r['step_s']:.3f} s  "
            f"compile {r['compile_s']:.1f} s", file=sys.stderr, flush=True)  # fmt: skip
  device = jax.devices()[0]
  print(
    json.dumps(
      {
        "device": f"{device.platform}: {device.device_kind} x {len(jax.devices())}",
        "config": args.config,
        "measures": _EMULATION if device.platform == "cpu" else "the accelerator's program, interconnect included",
        "results": results,
      }
    )
  )


if __name__ == "__main__":
  main()
