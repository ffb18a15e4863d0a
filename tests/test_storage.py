"""Run directories on URLs: one path abstraction for every file, and a one-line error for a URL out of reach."""

import json
import os
import subprocess
import sys

import jax
import pytest

from storage import StorageError, check_urls
from tests.helpers import mini_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# gcsfs pointed at a closed port on this machine: a bucket out of reach without sending traffic anywhere else
# (NO_GCE_CHECK keeps google-auth from looking for a cloud metadata server).
UNREACHABLE_GCS = {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9", "NO_GCE_CHECK": "true", "KILN_STORAGE_TIMEOUT_S": "1"}


def _train_py(cwd, *args: str) -> subprocess.CompletedProcess:
  env = {**os.environ, **UNREACHABLE_GCS, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu", "XDG_CACHE_HOME": str(cwd / "xdg")}
  command = [sys.executable, os.path.join(REPO, "train.py"), "--config", os.path.join(REPO, "configs/tiny.py"), *args]
  return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
  "flag,name",
  [
    ("--workdir=gs://kiln-no-such-bucket/run", "--workdir=gs://kiln-no-such-bucket/run"),
    ("--config.data.files=gs://kiln-no-such-bucket/corpus/*.txt", "config.data.files=gs://kiln-no-such-bucket/corpus/"),
    ("--config.checkpoint.init_from=gs://kiln-no-such-bucket/old", "config.checkpoint.init_from=gs://kiln-no-such"),
  ],
)
def test_an_unreachable_url_is_one_line_and_creates_nothing_locally(tmp_path, flag, name):
  args = [flag] if flag.startswith("--workdir") else [f"--workdir={tmp_path / 'run'}", flag]
  proc = _train_py(tmp_path, *args)
  assert proc.returncode != 0
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith(f"error: {name}"), proc.stderr[-2000:]
  assert "did not answer within 1 s" in lines[0] or "cannot be reached" in lines[0]
  assert os.listdir(tmp_path) == []  # no `gs:` directory, no run directory, no cache


def test_local_paths_are_left_to_the_code_that_uses_them(tmp_path):
  check_urls([("--workdir", str(tmp_path / "not" / "yet"), True), ("config.data.files", "", False)])
  assert not (tmp_path / "not").exists()


@pytest.mark.fast
def test_a_missing_client_library_names_the_scheme():
  with pytest.raises(StorageError, match=r"config\.data\.tokenizer=az://x/t\.model cannot be reached .*install"):
    check_urls([("config.data.tokenizer", "az://x/t.model", False)], timeout_s=10)


@pytest.mark.slow
def test_a_run_directory_written_through_the_url_code_path_is_complete(tmp_path, monkeypatch, mini_run_cache):
  """Metric files take the staged route of object stores (written whole at each flush), checkpoints and the
  rest go through epath as for any URL; the run directory must end up exactly as a local run's."""
  from trainer.loop import train

  monkeypatch.setattr("trainer.metrics.is_url", lambda path: True)
  overrides = {"mesh.data": -1, "train.global_batch_size": 8, "train.steps": 8, "train.profile_steps": 2}
  cfg = mini_run_config(mini_run_cache, **overrides)
  workdir = tmp_path / "run"
  train(cfg, str(workdir))
  assert sorted(os.listdir(workdir)) == ["checkpoints", "config.json", "loss.png", "metrics.jsonl", "tb",
                                         "tokenizer.model"]  # fmt: skip
  assert sorted(os.listdir(workdir / "checkpoints")) == ["4", "8"]
  assert json.loads((workdir / "config.json").read_text())["train"]["steps"] == 8
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "loss" in r] == list(range(1, 9))
  assert any("eval_loss" in r for r in records)
  assert [name for name in os.listdir(workdir / "tb") if name.startswith("events.out.tfevents")]
  assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert list((workdir / "tb" / "plugins" / "profile").rglob("*.xplane.pb"))  # train.profile_steps's trace

  # The same run started again (a new build, as after a restart): its steps come from the persistent
  # compilation cache, not the compiler.
  hits = []
  listener = lambda event, **kw: hits.append(event) if event.endswith("/compilation_cache/cache_hits") else None
  jax.monitoring.register_event_listener(listener)
  try:
    train(mini_run_config(mini_run_cache, **overrides), str(tmp_path / "again"))
  finally:
    jax.monitoring.unregister_event_listener(listener)
  assert len(hits) >= 2  # at least the train and the eval step
