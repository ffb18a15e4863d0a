"""Loglikelihood requests per second of kiln's lm-eval model: one request per device call (batch 1, the row as
long as the request) against requests packed many to a row, `--batch_size` rows per call.

  python scripts/benchmark_eval.py --config configs/tiny.py [--config configs/gpt2_small.py]
      [--requests 256] [--batch_size 8] [--compute_dtype float32]

Requests are random token sequences shaped like multiple-choice benchmarks (a context of 32..--max_context
tokens and a continuation of 1..16, both scored as lm-eval scores them) on randomly initialised weights: speed
does not depend on the values. Rows are `data.seq_len` long (capped by --row_len). Every mode runs twice and
the second pass is timed, so compilation is left out (reported as compile_s). The last line is one JSON object:
{"device", "results": [{"config", "mode", "batch_size", "row_len", "requests", "device_calls",
"requests_per_sec", "tokens_per_sec", "compile_s"}]}.
"""

import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_CONFIGS = flags.DEFINE_multi_string("config", ["configs/tiny.py"], "Config files to measure (repeatable).")
_REQUESTS = flags.DEFINE_integer("requests", 256, "Loglikelihood requests per pass.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per device call when packed.")
_ROW_LEN = flags.DEFINE_integer("row_len", 1024, "Longest row (the model's seq_len if shorter).")
_MAX_CONTEXT = flags.DEFINE_integer("max_context", 192, "Longest request context, in tokens.")
_DTYPE = flags.DEFINE_string("compute_dtype", None, "Override the configs' compute dtype (float32, bfloat16).")
_SEED = flags.DEFINE_integer("seed", 0, "Request lengths and tokens.")


class _NoTokenizer:
  """Scoring token ids needs no tokenizer; KilnLM reads only these."""

  eos_id, bos_id, pad_id = 0, 0, 0
  model_path = "none"


def _measure(name: str, cfg, requests, pack: bool, batch_size: int) -> dict:
  import jax

  from evaluation.harness import KilnLM
  from generation.decoding import Decoder
  from generation.run import one_device_mesh
  from model.params import init_params
  from parallel.rules import DEFAULT_RULES, parse_rules
  from storage.run import model_config

  row_len = min(cfg.data.seq_len, _ROW_LEN.value)
  model_cfg = model_config(cfg, cfg.data.vocab_size, max_len=row_len)
  if _DTYPE.value:
    model_cfg = dataclasses.replace(model_cfg, compute_dtype=_DTYPE.value)
  decoder = Decoder(model_cfg, cfg.data.vocab_size, one_device_mesh(), parse_rules(DEFAULT_RULES))
  params = jax.jit(lambda: init_params(decoder.model_cfg, 0), out_shardings=decoder.param_shardings)()
  lm = KilnLM(decoder, params, _NoTokenizer(), batch_size=batch_size, pack=pack, max_length=row_len)
  start = time.perf_counter()
  lm.score_sequences(requests)  # compiles every row shape this pass uses
  first = time.perf_counter() - start
  lm.device_calls = 0
  start = time.perf_counter()
  lm.score_sequences(requests)
  seconds = time.perf_counter() - start
  tokens = sum(len(tokens) - 1 for tokens, _ in requests)
  return {
    "config": name, "mode": "packed" if pack else "batch1", "batch_size": lm.rows_per_call, "row_len": row_len,
    "requests": len(requests), "device_calls": lm.device_calls, "requests_per_sec": round(len(requests) / seconds, 2),
    "tokens_per_sec": round(tokens / seconds, 1), "compile_s": round(max(first - seconds, 0.0), 2),
  }  # fmt: skip


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import jax
  import numpy as np

  from settings import ConfigError
  from settings.load import load_config_file

  results = []
  for path in _CONFIGS.value:
    try:
      cfg = load_config_file(path)
    except (ConfigError, OSError) as e:
      sys.exit(f"error: {e}")
    rng = np.random.default_rng(_SEED.value)
    row_len = min(cfg.data.seq_len, _ROW_LEN.value)
    requests = []
    for _ in range(_REQUESTS.value):
      context, continuation = int(rng.integers(32, _MAX_CONTEXT.value + 1)), int(rng.integers(1, 17))
      total = min(context + continuation, row_len)
      requests.append((rng.integers(1, cfg.data.vocab_size, total + 1).tolist(), min(continuation, total)))
    name = os.path.splitext(os.path.basename(path))[0]
    for pack, batch_size in ((False, 1), (True, _BATCH.value)):
      results.append(_measure(name, cfg, requests, pack, batch_size))
      print(json.dumps(results[-1]), file=sys.stderr)
  print(json.dumps({"device": jax.devices()[0].device_kind, "results": results}))


if __name__ == "__main__":
  app.run(main)
