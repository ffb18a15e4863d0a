"""How long a checkpoint blocks training, how long it takes in all, and its size on disk.

  python scripts/benchmark_checkpoint.py --config configs/gpt2_small.py [--saves 3] [--dir /tmp/ckpt_bench]

Builds the config's train state (parameters + AdamW state, in their shardings; the embedding sized from
data.vocab_size), takes --train_steps steps on a synthetic batch (on a CPU, shrink it with
--config.train.global_batch_size and --config.data.seq_len), then saves it --saves times through the trainer's
Checkpointer: the blocking part is what the train loop waits for, the total runs until the checkpoint has
committed. Prints a table and a JSON line.
"""

import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from data.synthetic import packed_batch  # noqa: E402
from parallel.mesh import make_mesh  # noqa: E402
from storage.checkpoint import Checkpointer  # noqa: E402
from trainer.experiment import build  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.")
_SAVES = flags.DEFINE_integer("saves", 3, "Checkpoints to time.")
_TRAIN_STEPS = flags.DEFINE_integer(
  "train_steps", 2, "Train steps before saving, so Adam's moments are real numbers (zeros compress away)."
)
_DIR = flags.DEFINE_string("dir", None, "Where to write (default: a temporary directory, removed after).")


def _du(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def main(argv):
  del argv
  cfg = _CONFIG.value
  cfg.checkpoint.max_to_keep = _SAVES.value + 1
  exp = build(cfg, cfg.data.vocab_size, make_mesh(cfg.mesh))
  state = exp.init_state()
  batch = packed_batch(np.random.default_rng(0), cfg.train.global_batch_size, cfg.data.seq_len, cfg.data.vocab_size)
  for _ in range(_TRAIN_STEPS.value):
    state, _ = exp.train_step(state, jax.device_put(batch, exp.batch_sharding), {})
  state = jax.block_until_ready(state)
  workdir = _DIR.value or tempfile.mkdtemp(prefix="ckpt_bench_")
  checkpointer = Checkpointer(workdir, cfg.checkpoint)
  rows = []
  for i in range(_SAVES.value):
    state = jax.block_until_ready(state.replace(step=state.step + 1))  # a new step number, same arrays
    start = time.perf_counter()
    blocked = checkpointer.save(int(state.step), state, None)
    checkpointer.wait()
    total = time.perf_counter() - start
    size = _du(os.path.join(checkpointer.directory, str(int(state.step))))
    rows.append({"save": i, "blocked_s": blocked, "total_s": total, "bytes": size})
  checkpointer.close()
  params = sum(x.size for x in jax.tree.leaves(exp.abstract_params))
  print(f"\n{flags.FLAGS['config'].config_filename}: {params / 1e6:.1f}M parameters, {jax.device_count()} device(s)")
  print(f"{'save':>4} {'blocked s':>10} {'total s':>8} {'size MiB':>9}")
  for r in rows:
    print(f"{r['save']:>4} {r['blocked_s']:10.2f} {r['total_s']:8.2f} {r['bytes'] / 2**20:9.1f}")
  print(json.dumps({"params": params, "devices": jax.device_count(), "saves": rows}))
  if _DIR.value is None:
    shutil.rmtree(workdir)


if __name__ == "__main__":
  app.run(main)
