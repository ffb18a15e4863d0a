"""The README stays the reference: every config key appears in it, and CI runs its own install and test lines."""

import re

from configs.base import base_config


def _keys(cfg, prefix=""):
  for key, value in cfg.items():
    if hasattr(value, "items"):
      yield from _keys(value, f"{prefix}{key}.")
    else:
      yield prefix + key


def test_every_config_key_is_documented():
  # Backticked names in the README; `<...>` stands for any word, as in `mesh.dcn_<axis>`.
  spans = set(re.findall(r"`([a-z_]+\.[a-z0-9_<>. ]+)`", open("README.md").read()))
  patterns = [re.compile(re.escape(re.sub(r"<[a-z ]+>", "@", s)).replace("@", r"\w+")) for s in spans]
  missing = [key for key in _keys(base_config()) if not any(p.fullmatch(key) for p in patterns)]
  assert not missing, f"README.md's config reference lacks {missing}"


def test_ci_runs_the_readme_commands():
  readme = open("README.md").read()
  ci = open(".ci/run").read()
  blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
  install, test = blocks[0].strip(), blocks[2].strip()
  assert install in ci and test in ci
