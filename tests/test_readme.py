"""The README is the entry: CI runs exactly its install and test commands, and it links every page of docs/."""

import re
from pathlib import Path

import pytest

from tests.test_docs import relative_links

ROOT = Path(__file__).resolve().parent.parent


def _commands(text: str) -> list[str]:
  """Command lines of a shell text: no blank lines, comments, shebang."""
  return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


@pytest.mark.fast
def test_ci_runs_the_readme_commands():
  readme = (ROOT / "README.md").read_text()
  blocks = re.findall(r"^```bash\n(.*?)^```", readme, re.M | re.S)
  install = [b for b in blocks if "python3 -m venv" in b and "pip install" in b]
  test = [b for b in blocks if _commands(b) and _commands(b)[0].startswith("python -m pytest")]
  newest = [b for b in blocks if "requirements-next.txt" in b and "python -m pytest" in b]
  assert len(install) == 1, f"README needs one bash block that creates the venv and installs, found {len(install)}"
  assert len(test) == 1, f"README needs one bash block that runs pytest, found {len(test)}"
  assert len(newest) == 1, f"README needs one bash block that installs and tests the newest stack, found {len(newest)}"
  readme_commands = _commands(install[0]) + _commands(test[0])
  newest_commands = _commands(newest[0])
  # .ci/run: set -euo pipefail and cd to the repository, then exactly the README's commands, in order; then, once
  # it has found a Python 3.12, exactly the README's commands for the newest stack, last.
  ci = [c for c in _commands((ROOT / ".ci" / "run").read_text()) if not c.startswith(("set ", "cd "))]
  assert ci[: len(readme_commands)] == readme_commands, f".ci/run runs {ci}, the README says {readme_commands}"
  assert ci[-len(newest_commands) :] == newest_commands, f".ci/run runs {ci}, the README says {newest_commands}"
  assert newest_commands[-1].split()[-2:] == ["-m", "fast"], "the newest stack runs the fast tests"


@pytest.mark.fast
def test_readme_links_every_docs_page():
  linked = {(ROOT / t.partition("#")[0]).resolve() for t in relative_links(ROOT / "README.md")}
  unlinked = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.resolve() not in linked]
  assert not unlinked, f"README.md links no {unlinked}"
