"""docs/: the config reference is generated from configs/base.py and documents every config key, and every
relative link in the README and docs/ leads to a file (and heading) that exists."""

import re
from pathlib import Path

import pytest

from configs.base import base_config
from scripts import config_reference

ROOT = Path(__file__).resolve().parent.parent


def _keys(cfg, prefix=""):
  for key, value in cfg.items():
    if hasattr(value, "items"):
      yield from _keys(value, f"{prefix}{key}.")
    else:
      yield prefix + key


@pytest.mark.fast
def test_config_reference_is_generated_from_base():
  assert (ROOT / "docs" / "config.md").read_text() == config_reference.render(), (
    "docs/config.md is stale: run python scripts/config_reference.py"
  )


@pytest.mark.fast
def test_every_config_key_is_documented():
  # Rows of docs/config.md: | `key` | `default` | description |
  text = (ROOT / "docs" / "config.md").read_text()
  described = dict(re.findall(r"^\| `([\w.]+)` \| `.*?` \| (.*?) \|$", text, re.M))
  missing = [key for key in _keys(base_config()) if not described.get(key, "").strip()]
  assert not missing, f"docs/config.md describes no {missing}: write a comment beside each in configs/base.py"


@pytest.mark.fast
def test_reference_reads_comments_beside_and_above_assignments():
  source = """
def base_config():
  c = ml_collections.ConfigDict()
  # The group's own words.
  c.g = ml_collections.ConfigDict()  # and more
  c.g.beside = 1  # beside it
  # above it,
  # two lines
  c.g.above = 2
  c.g.both = 3  # not this one's
  # an orphan, a blank line away

  c.g.bare = 4
  for axis in ("x", "y"):
    setattr(c.g, axis, 5)  # each axis
    setattr(c.g, f"n_{axis}", 6)
  # every key under it
  c.g.rules = ml_collections.ConfigDict({"a": "x"})
  return c
"""
  keys, groups = config_reference.descriptions(source)
  assert groups == {"g": "The group's own words. and more"}
  assert keys == {
    "g.beside": "beside it",
    "g.above": "above it, two lines",
    "g.both": "not this one's",
    "g.bare": "",
    "g.x": "each axis",
    "g.n_x": "",
    "g.y": "each axis",
    "g.n_y": "",
    "g.rules": "every key under it",
  }


def _pages():
  return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _prose(text: str) -> str:
  """The text without fenced code blocks and code spans, where brackets are not links."""
  return re.sub(r"`[^`\n]*`", "", re.sub(r"^```.*?^```", "", text, flags=re.M | re.S))


def relative_links(page: Path) -> list[str]:
  targets = re.findall(r"\[[^\]]*\]\(([^)\s]+)\)", _prose(page.read_text()))
  return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ...


def _anchors(page: Path) -> set[str]:
  """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
  seen, anchors = {}, set()
  for heading in re.findall(r"^#+ (.+)$", re.sub(r"^```.*?^```", "", page.read_text(), flags=re.M | re.S), re.M):
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
    anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
    seen[slug] = seen.get(slug, 0) + 1
  return anchors


@pytest.mark.fast
def test_relative_links_resolve():
  broken = []
  for page in _pages():
    for target in relative_links(page):
      path, _, anchor = target.partition("#")
      dest = (page.parent / path).resolve() if path else page
      if not dest.exists():
        broken.append(f"{page.relative_to(ROOT)}: {target} (no such file)")
      elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
        broken.append(f"{page.relative_to(ROOT)}: {target} (no such heading)")
  assert not broken, "broken links:\n" + "\n".join(broken)


@pytest.mark.fast
def test_the_resume_table_lists_exactly_the_execution_fields():
  """docs/checkpoints.md's "how the step computes" cell names the config keys of model/config.py's Execution,
  the settings a resume never compares."""
  import dataclasses
  import re

  from configs.base import base_config
  from model.config import Execution, field_of_key

  cfg, fields = base_config(), {f.name for f in dataclasses.fields(Execution)}
  keys = {f"{g}.{k}" for g in ("model", "moe", "lora") for k in cfg[g] if field_of_key(f"{g}.{k}") in fields}
  row = next(line for line in open("docs/checkpoints.md") if line.startswith("| how the step computes"))
  cell = row.split("|")[1]
  assert set(re.findall(r"`((?:model|moe|lora)\.\w+)`", cell)) == keys
