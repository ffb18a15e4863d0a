"""scripts/accelerator_check.py: its smoke run on CPU passes every check, and a missing package is one line."""

import json
import math
import os
import subprocess
import sys

import pytest

from scripts import accelerator_check

SCRIPT = os.path.join(accelerator_check.REPO, "scripts", "accelerator_check.py")


@pytest.mark.slow
def test_smoke_run_ends_with_one_json_line_and_every_check_passes():
  # Two emulated devices, so the MoE exchange really moves tokens between devices and the train step is sharded.
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
    [sys.executable, SCRIPT, "--smoke", "--budget_s", "1500"], env=env, capture_output=True, text=True, timeout=1200
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["ok"] and report["failed"] == [] and report["skipped"] == [], report
  assert report["device"] == {"device_kind": "cpu", "platform": "cpu", "count": 2}
  assert set(report["versions"]) >= {"python", "jax", "jaxlib", "flax", "optax", "orbax", "numpy"}
  for section in ("attention", "moe", "train_py", "train_step", "decode", "grpo"):
    assert report[section]["status"] == "pass", (section, report[section])

  attention = report["attention"]
  assert (attention["impl"], attention["reference"], attention["dtype"]) == ("chunked", "xla", "bfloat16")
  assert set(attention["max_abs_err"]) == {"out", "dq", "dk", "dv"}
  assert all(err <= attention["tolerance"] for err in attention["rel_err"].values())

  moe = report["moe"]
  assert moe["expert_devices"] == 2
  assert moe["results"]["buffer"]["status"] == "pass"
  assert moe["results"]["ragged"]["status"] == "skip"  # XLA:CPU has no ragged_all_to_all

  train_py = report["train_py"]
  assert train_py["returncode"] == 0 and train_py["steps"] == 3 and math.isfinite(train_py["final_loss"])

  step = report["train_step"]
  assert step["attention"] == "chunked" and step["compute_dtype"] == "bfloat16"
  (row,) = step["results"]
  assert row["tokens_per_sec"] > 0 and 0 < row["mfu"] < 1 and row["compile_s"] > 0
  assert math.isfinite(row["final_loss"])

  decode = report["decode"]
  assert sorted(decode["decode_tokens_per_sec"]) == ["1", "4"]
  assert all(r["decode_tokens_per_sec"] > 0 and r["prefill_tokens_per_sec"] > 0 for r in decode["results"])

  grpo = report["grpo"]
  assert grpo["rows"] == 8 and grpo["compute_dtype"] == "bfloat16" and grpo["steps_measured"] == 1
  assert 0 < grpo["rollout_share"] < 1 and grpo["rollout_tokens_per_sec"] > 0


def test_missing_packages_are_named_in_one_line_with_the_wheel_command(monkeypatch, capsys):
  real_find_spec = accelerator_check.importlib.util.find_spec
  hidden = {"ml_collections", "tensorboardX"}
  monkeypatch.setattr(
    accelerator_check.importlib.util, "find_spec", lambda name: None if name in hidden else real_find_spec(name)
  )
  assert accelerator_check.missing_packages()  # else main() would run the whole check in this process
  monkeypatch.setattr(sys, "argv", ["accelerator_check.py", "--smoke"])
  assert accelerator_check.main() == 2
  out, err = capsys.readouterr()
  (line,) = err.strip().splitlines()
  assert line.startswith("missing Python packages: ml-collections, tensorboardX — carry them as wheels: ")
  assert "ml-collections==1.1.0 tensorboardX==2.6.5" in line and "pip download --no-deps --only-binary=:all:" in line
  report = json.loads(out.strip().splitlines()[-1])
  assert report["ok"] is False and report["missing"] == ["ml-collections==1.1.0", "tensorboardX==2.6.5"]


def test_new_jax_asks_for_the_flax_that_imports_with_it(monkeypatch):
  versions = {"jax": "0.11.2", "flax": "0.12.8"}
  monkeypatch.setattr(accelerator_check, "_version", lambda dist: versions.get(dist, "1.0"))
  assert "flax==0.12.12" in accelerator_check.missing_packages()
  versions["flax"] = "0.12.12"
  assert "flax==0.12.12" not in accelerator_check.missing_packages()
