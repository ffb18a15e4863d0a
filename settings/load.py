"""Loading a config file and checking command-line overrides against it, before absl parses them."""

import difflib
import importlib.util
import os
from collections.abc import Sequence

import ml_collections

from settings import ConfigError


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports a config file and calls its `get_config()`."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist; pass one of configs/*.py to --config")
  spec = importlib.util.spec_from_file_location("_kiln_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(); define one that returns a ConfigDict")
  return module.get_config()


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in cfg.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_all_keys(v, prefix + k + "."))
  return keys


def _parse_value(text: str, like):
  if isinstance(like, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError
  if isinstance(like, int):
    return int(text)
  if isinstance(like, float):
    return float(text)
  return text


def check_overrides(argv: Sequence[str], config_flag: str = "config") -> None:
  """Checks every `--config.a.b=value` in argv against the config file before absl parses them.

  absl's own errors for these cases are tracebacks from deep inside ml_collections; this gives one line.
  """
  prefix = f"--{config_flag}"
  path, overrides = None, []
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == prefix and i + 1 < len(args):
      path = args[i + 1]
    elif arg.startswith(prefix + "="):
      path = arg.split("=", 1)[1]
    elif arg.startswith(prefix + "."):
      key, sep, value = arg[len(prefix) + 1 :].partition("=")
      if not sep:
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else "true"
      overrides.append((key, value))
  if path is None:
    raise ConfigError("no config given; pass --config configs/<name>.py")
  cfg = load_config_file(path)
  valid_keys = _all_keys(cfg)
  for key, value in overrides:
    node, parts = cfg, key.split(".")
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        close = difflib.get_close_matches(key, valid_keys, n=1, cutoff=0.5)
        hint = f"; did you mean config.{close[0]}?" if close else "; see docs/config.md"
        raise ConfigError(f"unknown config key config.{key}{hint}")
      node = node[part]
      if depth == len(parts) - 1 and isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"config.{key} is a group; set one of its keys, e.g. config.{key}.{next(iter(node))}")
    if isinstance(node, (bool, int, float)):
      try:
        _parse_value(value, node)
      except ValueError:
        raise ConfigError(
          f"config.{key} must be {type(node).__name__}, got {value!r}; e.g. --config.{key}={node}"
        ) from None


def load_with_overrides(path: str, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """The config file at `path` with `--config.a.b=value` overrides applied, for scripts that take a config without
  absl's config flags (prepare_data.py, inspect_data.py); each bad key or value is one ConfigError line."""
  check_overrides(["", "--config", path, *overrides])
  cfg = load_config_file(path)
  for arg in overrides:
    key, sep, value = arg[len("--config.") :].partition("=")
    *groups, name = key.split(".")
    node = cfg
    for group in groups:
      node = node[group]
    node[name] = _parse_value(value if sep else "true", node[name])
  return cfg
