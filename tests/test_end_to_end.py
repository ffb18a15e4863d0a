"""The README's first command, shortened: train.py on the default corpus from nothing to a written run directory."""

import json
import os
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_tiny_trains_on_the_default_corpus_and_writes_the_run_directory(tmp_path):
  workdir = tmp_path / "run"
  args = [
    sys.executable, "train.py", "--config", "configs/tiny.py", f"--workdir={workdir}",
    "--config.train.steps=40", "--config.train.eval_every=20", "--config.optim.warmup_steps=10",
    f"--config.data.cache_dir={tmp_path / 'cache'}",
  ]  # fmt: skip
  env = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for name in ("config.json", "metrics.jsonl", "loss.png", "tokenizer.model"):
    assert (workdir / name).is_file(), name
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(workdir / "tb"))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["40"]
  records = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  evals = [r for r in records if "eval_loss" in r]
  assert [r["step"] for r in evals] == [0, 20, 40]
  assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 1.5
  train = [r for r in records if "loss" in r]
  assert {"step", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(train[-1])
  assert json.load(open(workdir / "config.json"))["train"]["steps"] == 40
