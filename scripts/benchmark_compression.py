"""Compression of a trained run, side by side: `python scripts/benchmark_compression.py --workdir runs/tiny
[--group_size 128] [--calibration_batches 8] [--prompts 8] [--new_tokens 128]`.

For the weights as trained (float32), cast to bfloat16, quantized int8 and int4 (model/quant.py), and pruned 50%
by magnitude, 50% by Wanda and 2:4 (model/sparsity.py): held-out loss (the run's eval batches), greedy agreement
(the fraction of --new_tokens greedy tokens after --prompts held-out prompts of 16 tokens equal to float32's),
parameter bytes per device, and decode tokens/s at batch 1 (scripts/benchmark_generate.py's measure). Prints a
table and one JSON line `{"device", "workdir", "results": [{"weights", "eval_loss", "greedy_agreement",
"params_bytes_per_device", "decode_tokens_per_sec"}]}`.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

# Its flags are this script's too: --new_tokens (greedy tokens per prompt, and decode steps timed), --group_size (int4).
from scripts.benchmark_generate import measure  # noqa: E402
from scripts.prune import eval_loss, pruned_params, run_batches  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "A trained run directory.")
_CALIBRATION = flags.DEFINE_integer("calibration_batches", 8, "Training batches for Wanda's input norms.")
_PROMPTS = flags.DEFINE_integer("prompts", 8, "Held-out prompts of the greedy agreement.")


def main(argv):
  del argv
  if not _WORKDIR.value:
    sys.exit("error: pass --workdir, a trained run directory")
  logging.set_verbosity(logging.WARNING)
  import jax
  import jax.numpy as jnp

  from generation import Sampling, generate
  from generation.run import load_run
  from model import quant
  from model import sparsity as sp
  from storage.run import open_run

  full = load_run(_WORKDIR.value)
  run = open_run(_WORKDIR.value)
  held_out, calibration = run_batches(run, _CALIBRATION.value)
  prompts = [row[:16].tolist() for row in np.asarray(held_out[0]["inputs"])[: _PROMPTS.value]]
  greedy = dict(max_new_tokens=flags.FLAGS.new_tokens, sampling=Sampling(0.0), stop_ids=[])
  graphdef, params, group = full.decoder.graphdef, full.params, flags.FLAGS.group_size
  bf16 = load_run(_WORKDIR.value, compute_dtype="bfloat16")
  variants = [
    ("float32", full.decoder, params),
    ("bfloat16", bf16.decoder, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)),
    ("int8", full.decoder, quant.quantize_params(params, "int8")),
    (f"int4 (groups of {group})", full.decoder, quant.quantize_params(params, "int4", group)),
    ("50% magnitude", full.decoder, pruned_params(graphdef, params, "magnitude", 0.5, [])),
    ("50% Wanda", full.decoder, pruned_params(graphdef, params, "wanda", 0.5, calibration)),
    ("2:4 (Wanda score)", full.decoder, pruned_params(graphdef, params, "2:4", 0.5, calibration)),
  ]
  want, results = None, []
  for name, decoder, held in variants:
    tokens = np.array([c.tokens for c in generate(decoder, held, prompts, **greedy)])
    want = tokens if want is None else want
    results.append({
      "weights": name,
      "eval_loss": eval_loss(decoder.graphdef, held, held_out),
      "greedy_agreement": float((tokens == want).mean()),
      "params_bytes_per_device": quant.bytes_per_device(held),
      "sparsity": round(sp.sparsity_of(quant.dequantize_params(held)), 4),
      "decode_tokens_per_sec": measure(decoder, held, 1, 16, flags.FLAGS.new_tokens)["decode_tokens_per_sec"],
    })  # fmt: skip
  device = jax.devices()[0].device_kind
  print(f"\n{_WORKDIR.value} on {device}")
  print(f"{'weights':>24} {'eval loss':>9} {'greedy agree':>12} {'MiB/device':>10} {'decode tok/s':>12}")
  for r in results:
    print(
      f"{r['weights']:>24} {r['eval_loss']:9.4f} {r['greedy_agreement']:12.3f} "
      f"{r['params_bytes_per_device'] / 2**20:10.2f} {r['decode_tokens_per_sec']:12.1f}"
    )
  print(json.dumps({"device": device, "workdir": _WORKDIR.value, "results": results}))


if __name__ == "__main__":
  app.run(main)
