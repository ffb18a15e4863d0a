"""docs/config.md, the config reference, is generated from configs/base.py and documents every config key."""

import re
from pathlib import Path

from configs.base import base_config
from scripts import config_reference

ROOT = Path(__file__).resolve().parent.parent


def _keys(cfg, prefix=""):
  for key, value in cfg.items():
    if hasattr(value, "items"):
      yield from _keys(value, f"{prefix}{key}.")
    else:
      yield prefix + key


def test_config_reference_is_generated_from_base():
  assert (ROOT / "docs" / "config.md").read_text() == config_reference.render(), (
    "docs/config.md is stale: run python scripts/config_reference.py"
  )


def test_every_config_key_is_documented():
  # Rows of docs/config.md: | `key` | `default` | description |
  text = (ROOT / "docs" / "config.md").read_text()
  described = dict(re.findall(r"^\| `([\w.]+)` \| `.*?` \| (.*?) \|$", text, re.M))
  missing = [key for key in _keys(base_config()) if not described.get(key, "").strip()]
  assert not missing, f"docs/config.md describes no {missing}: write a comment beside each in configs/base.py"


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
