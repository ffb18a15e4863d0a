"""scripts/prepare_data.py: the token cache built by Apache Beam (DirectRunner, 2 worker processes) into a bucket of
a real GCS server on 127.0.0.1 (gcp-storage-emulator), against the cache a run builds itself and a run's losses.

One pipeline runs per module (Beam's start-up costs seconds): a three-source mixture of text files, a JSONL file
and a Parquet file of two row groups, so every format and the mixture go through it at once.
"""

import glob
import json
import os
import subprocess
import sys
import sysconfig

import pytest

pytest.importorskip(
  "apache_beam", reason="apache-beam 2.77.0 needs numpy < 2.5 and pyarrow < 26: not installable on the newest stack"
)
pytest.importorskip("gcp_storage_emulator", reason="the GCS emulator of requirements-dev.txt is not installed")

import numpy as np  # noqa: E402
from etils import epath  # noqa: E402

import data  # noqa: E402
from data import token_cache  # noqa: E402
from data.sources import Corpus  # noqa: E402
from tests.helpers import mini_run_config  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = sysconfig.get_paths()["stdlib"]
BUCKET = "kiln-test"
WEIGHTS = {"text": 0.5, "records": 0.3, "table": 0.2}


@pytest.fixture(scope="module")
def gcs():
  """A GCS JSON API server on 127.0.0.1 with one bucket; this process and its children talk to it."""
  from storage.emulator import local_gcs

  with local_gcs(BUCKET) as url:
    yield url


def _corpus(directory) -> str:
  """Text files, a JSONL file and a Parquet file of two row groups, from standard library source."""
  import pyarrow as pa
  import pyarrow.parquet as pq

  texts = [open(p, encoding="utf-8").read() for p in sorted(glob.glob(os.path.join(STDLIB, "email", "*.py")))]
  (directory / "text").mkdir()
  for i, text in enumerate(texts[:8]):
    (directory / "text" / f"doc_{i}.txt").write_text(text)
  (directory / "records").mkdir()
  chunks = [text[j : j + 2000] for text in texts[8:] for j in range(0, len(text), 2000)]
  lines = [json.dumps({"text": chunk}) + "\n" for chunk in chunks[:60]]
  (directory / "records" / "part.jsonl").write_text("".join(lines))
  (directory / "table").mkdir()
  json_texts = [open(p, encoding="utf-8").read() for p in sorted(glob.glob(os.path.join(STDLIB, "json", "*.py")))]
  rows = [t[j : j + 1500] for t in json_texts for j in range(0, len(t), 1500)]
  pq.write_table(pa.table({"text": rows}), directory / "table" / "part.parquet", row_group_size=len(rows) // 2 + 1)
  extensions = {"text": "txt", "records": "jsonl", "table": "parquet"}
  return ",".join(f"{w}:{directory / name}/*.{extensions[name]}" for name, w in WEIGHTS.items())


def _overrides(files: str, cache_dir: str) -> dict:
  return {"data.files": files, "data.cache_dir": cache_dir, "data.unit_bytes": 20_000, "data.vocab_size": 512,
          "data.eval_fraction": 0.1, "train.compilation_cache": False}  # fmt: skip


@pytest.fixture(scope="module")
def prepared(gcs, tmp_path_factory):
  """(files, the prepared cache URL, the script's JSON line): one Beam pipeline, DirectRunner over 2 processes."""
  directory = tmp_path_factory.mktemp("prepare")
  files, out = _corpus(directory), f"{gcs}/prepared"
  overrides = [f"--config.{k}={v}" for k, v in _overrides(files, "").items() if k.startswith("data.")]
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "scripts/prepare_data.py"),
      "--config",
      os.path.join(REPO, "configs/tiny.py"),
      *overrides,
      f"--out={out}",
      "--direct_num_workers=2",
    ],  # fmt: skip
    capture_output=True,
    text=True,
    timeout=300,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return files, out, json.loads(proc.stdout.strip().splitlines()[-1])


def _files_under(root: epath.Path) -> dict[str, bytes]:
  return {
    str(p)[len(str(root)) + 1 :]: p.read_bytes()
    for sub in ("tokens", "tokenizers")
    for p in (root / sub).iterdir()
    if p.name.endswith((".bin", ".model"))
  }


@pytest.fixture(scope="module")
def self_built(tmp_path_factory):
  """The cache dir of the runs that tokenize for themselves (shared, so the second run compiles nothing)."""
  return str(tmp_path_factory.mktemp("self_built"))


def test_the_prepared_cache_is_the_self_built_cache(prepared, self_built):
  files, out, line = prepared
  assert line["runner"] == "DirectRunner" and line["units"] >= 5 and line["text_bytes"] > 0
  cfg = mini_run_config(self_built, **_overrides(files, self_built))
  tokenizer = data.load_tokenizer(cfg.data, None)
  built = token_cache.load_token_cache(cfg.data, tokenizer)
  units = {name: c for name, _, c in built.sources}
  # Every format is there: the text source's units, the JSONL's byte ranges, the Parquet's two row groups.
  assert [len(units[n]._units) for n in WEIGHTS][2] == 2 and len(units["records"]._units) > 1
  want = _files_under(epath.Path(self_built))
  got = _files_under(epath.Path(out))
  assert sorted(got) == sorted(want) and len(want) == 1 + line["units"]
  for name, content in want.items():
    assert got[name] == content, name


def test_a_run_from_the_prepared_bucket_logs_the_self_built_runs_losses(prepared, self_built, tmp_path, monkeypatch):
  from trainer.loop import train

  files, out, _ = prepared

  def run(cache_dir, workdir, **overrides):
    overrides = {"train.steps": 4, "train.eval_every": 4, "mesh.data": -1, "train.global_batch_size": 8, **overrides}
    cfg = mini_run_config(cache_dir, **{**_overrides(files, cache_dir), **overrides})
    train(cfg, str(workdir))
    return [json.loads(line) for line in open(workdir / "metrics.jsonl")]

  # The first run leaves JAX's compilation cache in its local cache dir; the second finds its programs there.
  self_built = run(self_built, tmp_path / "run_self", **{"train.compilation_cache": True})
  # From the bucket: the corpus is never listed nor tokenized.
  monkeypatch.setattr(Corpus, "__init__", lambda *a: pytest.fail("listed the corpus of a prepared cache"))
  from_bucket = run(out, tmp_path / "run_prepared")
  losses = lambda records, key: [r[key] for r in records if key in r]  # noqa: E731
  np.testing.assert_allclose(losses(from_bucket, "loss"), losses(self_built, "loss"), rtol=1e-6)
  assert len(losses(self_built, "loss")) == 4
  evals = [r for r in from_bucket if "eval_loss" in r]
  assert sorted(k for k in evals[-1] if k.startswith("eval_loss/")) == sorted(f"eval_loss/{n}" for n in WEIGHTS)
  for name in WEIGHTS:
    np.testing.assert_allclose(losses(from_bucket, f"eval_loss/{name}"), losses(self_built, f"eval_loss/{name}"))
