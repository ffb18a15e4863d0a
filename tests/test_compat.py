"""compat.py: the pairs of flax and jax that import together pass, the ones that do not are one line naming both
(each pair below was installed and imported on Python 3.12; 3.11 for jax 0.10.2)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import compat

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.fast
@pytest.mark.parametrize(
  "jax_version, flax_version",
  [("0.10.2", "0.12.8"), ("0.11.2", "0.12.10"), ("0.11.2", "0.12.12"), ("0.12.0.1", "0.12.12")],
)
def test_pairs_that_import_together_pass(jax_version, flax_version):
  compat.check_flax_matches_jax(jax_version, flax_version)


@pytest.mark.fast
@pytest.mark.parametrize("jax_version, flax_version", [("0.11.2", "0.12.8"), ("0.12.0.1", "0.12.9")])
def test_a_flax_that_fails_to_import_with_this_jax_is_named(jax_version, flax_version):
  with pytest.raises(compat.VersionError, match=rf"^flax {flax_version} does not import with jax {jax_version}; "):
    compat.check_flax_matches_jax(jax_version, flax_version)


@pytest.mark.fast
def test_train_py_stops_with_one_line_before_importing_flax(tmp_path):
  """jax 0.11.2 and flax 0.12.8 installed (their metadata first on the path): train.py exits non-zero with
  compat's line, before flax's import would fail with an AttributeError, and writes nothing."""
  for name, version in (("jax", "0.11.2"), ("flax", "0.12.8")):
    info = tmp_path / "site" / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
  out = subprocess.run(
    [sys.executable, "train.py", "--config", "configs/tiny.py", "--workdir", str(tmp_path / "run")],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=120,
    env={**os.environ, "PYTHONPATH": str(tmp_path / "site"), "JAX_PLATFORMS": "cpu"},
  )
  assert out.returncode != 0
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: flax 0.12.8 does not import with jax 0.11.2; "), out.stderr
  assert not (tmp_path / "run").exists()
