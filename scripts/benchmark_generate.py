"""Decoding throughput with random weights: `python scripts/benchmark_generate.py --config configs/tiny.py
[--batch_sizes 1,8] [--prompt_len 128] [--new_tokens 128] [--config.k=v]`.

For each batch size: prefill tokens/s (prompt tokens written into the KV cache per second) and decode tokens/s
(new tokens per second over all rows, greedy, one jitted step per token), after a warm-up run that compiles
both. One device (the decode mesh has every axis of size 1). Prints a table and one JSON line
`{"device": ..., "results": [{"batch", "prompt_len", "new_tokens", "prefill_tokens_per_sec",
"decode_tokens_per_sec", "compile_s", ...}]}`.

`--weights float32,bfloat16,int8,int4` measures each way of holding the weights (default: as the config makes
them): bfloat16 casts every parameter; int8 and int4 (groups of --group_size inputs) quantize the projections
(model/quant.py). Each result then adds "weights" and "params_bytes_per_device".
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from generation import Decoder, Sampling  # noqa: E402
from generation.run import one_device_mesh
from model import quant  # noqa: E402
from model.params import init_params  # noqa: E402
from parallel.rules import DEFAULT_RULES, parse_rules  # noqa: E402
from settings import ConfigError  # noqa: E402
from settings.load import check_overrides  # noqa: E402
from settings.validate import validate  # noqa: E402
from storage.run import model_config  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_BATCHES = flags.DEFINE_list("batch_sizes", ["1", "8"], "Batch sizes to measure.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "Decode steps timed.")
_WEIGHTS = flags.DEFINE_list("weights", [], "Among float32, bfloat16, int8, int4; empty: as the config has them.")
_GROUP_SIZE = flags.DEFINE_integer("group_size", 128, "int4: inputs per scale.")


def held_as(params, weights: str, group_size: int):
  """`params` held as `weights` (float32 | bfloat16 | int8 | int4)."""
  import jax.numpy as jnp

  from model import quant

  if weights in ("float32", "bfloat16"):
    return jax.tree.map(lambda x: x.astype(jnp.dtype(weights)), params)
  if weights in quant.MODES:
    return quant.quantize_params(params, weights, group_size)
  raise ValueError(f"--weights={weights}; give float32, bfloat16, int8 or int4")


def measure(decoder: Decoder, params, batch: int, prompt_len: int, new_tokens: int) -> dict:
  rng = np.random.default_rng(0)
  tokens_BxP = rng.integers(0, decoder.vocab_size, (batch, prompt_len), dtype=np.int32)
  lengths_B = np.full((batch,), prompt_len, np.int32)
  greedy, key = Sampling(temperature=0.0), jax.random.PRNGKey(0)

  def run():
    cache = decoder.new_cache(batch, prompt_len + new_tokens)
    start = time.perf_counter()
    next_B, _, cache = decoder.prefill(params, tokens_BxP, lengths_B, cache, key, greedy)
    jax.block_until_ready(next_B)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    for t in range(new_tokens):
      next_B, _, cache = decoder.step(params, next_B, lengths_B + t, cache, key, greedy)
    jax.block_until_ready(next_B)
    return prefill_s, time.perf_counter() - start

  start = time.perf_counter()
  run()  # compiles the prefill and the step
  compile_s = time.perf_counter() - start
  prefill_s, decode_s = run()
  return {
    "batch": batch,
    "prompt_len": prompt_len,
    "new_tokens": new_tokens,
    "prefill_tokens_per_sec": batch * prompt_len / prefill_s,
    "decode_tokens_per_sec": batch * new_tokens / decode_s,
    "decode_step_ms": 1e3 * decode_s / new_tokens,
    "compile_s": compile_s,
  }


def main(argv):
  del argv
  cfg = _CONFIG.value
  validate(cfg)
  model_cfg = model_config(cfg, cfg.data.vocab_size)
  decoder = Decoder(model_cfg, cfg.data.vocab_size, one_device_mesh(), parse_rules(DEFAULT_RULES))
  params = jax.jit(lambda: init_params(decoder.model_cfg, 0), out_shardings=decoder.param_shardings)()
  results = []
  for weights in _WEIGHTS.value or [None]:
    try:
      held = params if weights is None else held_as(params, weights, _GROUP_SIZE.value)
    except ValueError as e:
      sys.exit(f"error: {e}")
    extra = {} if weights is None else {"weights": weights, "params_bytes_per_device": quant.bytes_per_device(held)}
    for b in _BATCHES.value:
      results.append({**extra, **measure(decoder, held, int(b), _PROMPT_LEN.value, _NEW_TOKENS.value)})
  device = jax.devices()[0].device_kind
  print(
    f"\n{flags.FLAGS['config'].config_filename} ({model_config(cfg, cfg.data.vocab_size).compute_dtype}) on {device}"
  )
  print(
    f"{'weights':>8} {'MiB':>7} {'batch':>5} {'prompt':>6} {'new':>5} {'prefill tok/s':>13} {'decode tok/s':>12} "
    f"{'step ms':>8} {'compile s':>9}"
  )
  for r in results:
    print(
      f"{r.get('weights', '-'):>8} {r.get('params_bytes_per_device', 0) / 2**20:7.1f} "
      f"{r['batch']:>5} {r['prompt_len']:>6} {r['new_tokens']:>5} {r['prefill_tokens_per_sec']:13.0f} "
      f"{r['decode_tokens_per_sec']:12.1f} {r['decode_step_ms']:8.2f} {r['compile_s']:9.1f}"
    )
  print(json.dumps({"device": device, "results": results}))


if __name__ == "__main__":
  try:
    check_overrides(sys.argv)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  app.run(main)
