"""What differs between the versions of kiln's stack, in one place: the rest of kiln is the same code on each.

The stacks tested: the pinned one (Python 3.11, requirements.txt: jax 0.10.2, flax 0.12.8) and the newest (Python
3.12, requirements-next.txt: jax 0.12.0.1, flax 0.12.12), on each of which the suite passes (on the newest without
the torch-based tests); jax 0.11.2 with flax 0.12.12 (a GPU image's jax) trains `tiny` too. kiln's calls into JAX,
Flax, optax and orbax behave the same on all of them, so the shims are few:

- `check_flax_matches_jax`: flax and jax come in pairs. With jax >= 0.11, flax up to 0.12.9 fails at its own import
  (`jax.experimental.hijax` has no `HiPrimitive`), though 0.12.9 declares jax >= 0.11.1; 0.12.10 imports, and kiln
  is tested with 0.12.12. The other way round pip keeps them apart (flax >= 0.12.9 declares jax >= 0.11.1).
  train.py and the tests call it first, so a mismatched pair is one line naming both versions, not flax's
  traceback. It reads the installed versions without importing either package.

Differences that are not the code's (kept where they apply):
- torch: PyPI's Linux torch for Python 3.12 is the CUDA build (GBs; the CPU build is not on PyPI), so the newest
  stack installs neither torch nor transformers and the tests that compare against transformers skip there.
- XLA:CPU's heap (tests/test_cpu_host.py): with jax >= 0.11 the first dozen steps of a CPU run may still grow the
  heap (fault a step's temporaries in), where with 0.10.2 the first three did; every step after reuses it.
"""

import re
from importlib import metadata

# (from this jax on, flax at least this to import, the flax kiln is tested with there), as described above.
_FLAX_FOR_JAX = (((0, 11, 0), (0, 12, 10), "0.12.12"),)


class VersionError(RuntimeError):
  """Installed packages whose versions do not work together."""


def _release(version: str) -> tuple[int, ...]:
  """'0.12.0.1' -> (0, 12, 0); '0.12.13.dev20260101' -> (0, 12, 13): the release numbers that decide."""
  return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def flax_for_jax(jax_version: str, flax_version: str | None) -> str | None:
  """The flax version to install with this jax when `flax_version` (None: none installed) does not import with
  it, else None."""
  for since_jax, min_flax, tested_flax in _FLAX_FOR_JAX:
    if _release(jax_version) >= since_jax and (flax_version is None or _release(flax_version) < min_flax):
      return tested_flax
  return None


def check_flax_matches_jax(jax_version: str | None = None, flax_version: str | None = None) -> None:
  """Raises VersionError when flax is too old to import with this jax. Versions default to the installed ones;
  a missing package is left to its import to report."""
  try:
    jax_version = jax_version or metadata.version("jax")
    flax_version = flax_version or metadata.version("flax")
  except metadata.PackageNotFoundError:
    return
  tested_flax = flax_for_jax(jax_version, flax_version)
  if tested_flax is not None:
    raise VersionError(
      f"flax {flax_version} does not import with jax {jax_version}; install flax=={tested_flax} (as "
      "requirements-next.txt does), or the pinned pair of requirements.txt"
    )
