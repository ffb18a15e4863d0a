"""A prepared token cache: the unit files and tokenizer that `scripts/prepare_data.py` wrote, and their manifest.

`<cache dir>/prepared.json` lists what a run needs: the tokenizer (a file in the cache dir, or the sha256 of the
`data.tokenizer` it was given), the settings the cache depends on, and each source's unit files in corpus order.
A run whose `data.cache_dir` holds a manifest reads the units it lists and never lists, reads or tokenizes the
corpus, so its start-up does not grow with the corpus; the files are a snapshot, used as they are even if the
corpus changed since. A manifest that does not fit the config (other settings, another tokenizer, a unit
missing or damaged) stops the run with one line saying what differs and how to rebuild; nothing in the cache
dir is written, locked or rebuilt.

The unit files are the same bytes as those a run builds for itself (token_cache.py writes both), so a
prepared cache and a self-built one give the same batches. Weights of a mixture are not part of it: the same
cache serves any weights.
"""

import json

from etils import epath

from data import cache, sources
from data.errors import DataError

MANIFEST_NAME = "prepared.json"
_FORMAT = 1


def settings(data_cfg) -> dict:
  """The config fields a prepared cache depends on, as the manifest records them."""
  mixture = sources.mixture(data_cfg.files)
  out = {
    "files": [s.files for s in mixture] if mixture else data_cfg.files,
    "text_field": data_cfg.text_field,
    "invalid_utf8": data_cfg.invalid_utf8,
    "unit_bytes": int(data_cfg.unit_bytes),
    "hf_dataset": data_cfg.hf_dataset,
    "hf_split": data_cfg.hf_split if data_cfg.hf_dataset else "",
  }
  if data_cfg.tokenizer:
    out["tokenizer"] = "given"  # compared by content (tokenizer_sha256), not by path
  else:
    out["tokenizer"] = "trained"
    out["tokenizer_type"] = data_cfg.tokenizer_type
    out["vocab_size"] = int(data_cfg.vocab_size)
    out["tokenizer_sample_bytes"] = int(data_cfg.tokenizer_sample_bytes)
    out["eval_fraction"] = float(data_cfg.eval_fraction)  # the tokenizer trains on training documents only
  return out


def manifest_path(data_cfg) -> epath.Path:
  return cache.cache_root(data_cfg.cache_dir) / MANIFEST_NAME


def write_manifest(data_cfg, tokenizer_path: str, source_units: list[tuple[str, str, list[str]]]) -> dict:
  """Writes `prepared.json`; `source_units` is [(name, files, [unit path relative to the cache dir])]."""
  root = cache.cache_root(data_cfg.cache_dir)
  relative = _relative_to(tokenizer_path, root) if not data_cfg.tokenizer else None
  manifest = {
    "format": _FORMAT,
    "settings": settings(data_cfg),
    "tokenizer": relative,
    "tokenizer_sha256": cache.file_sha256(tokenizer_path),
    "sources": [{"name": name, "files": files, "units": units} for name, files, units in source_units],
  }
  cache.write_file_atomically(root / MANIFEST_NAME, (json.dumps(manifest, indent=1) + "\n").encode())
  return manifest


def read_manifest(data_cfg) -> dict | None:
  """The manifest of `data.cache_dir` checked against the config; None when the dir holds none (self-built)."""
  path = manifest_path(data_cfg)
  if not path.exists():
    return None
  where = str(path.parent)
  try:
    manifest = json.loads(path.read_text())
    recorded = manifest["settings"]
    manifest["sources"], manifest["tokenizer_sha256"]  # noqa: B018 (present, or the manifest is damaged)
  except (ValueError, KeyError, TypeError, OSError) as e:
    raise DataError(f"{path}: not a readable manifest ({type(e).__name__}: {e}); {_rebuild(where)}") from None
  wanted = settings(data_cfg)
  for key in sorted(set(recorded) | set(wanted), key=lambda k: (k != "tokenizer", k)):
    if recorded.get(key) != wanted.get(key):
      raise DataError(
        f"data.cache_dir={where} was prepared with {_say(key, recorded.get(key))}, this config has "
        f"{_say(key, wanted.get(key))}; {_rebuild(where)}"
      )
  return manifest


def tokenizer_path(data_cfg, manifest: dict) -> str:
  """The tokenizer a run of this config uses with the prepared cache: the cache's own, or data.tokenizer."""
  if data_cfg.tokenizer:
    return data_cfg.tokenizer
  path = cache.cache_root(data_cfg.cache_dir) / manifest["tokenizer"]
  if not path.is_file():
    where = str(cache.cache_root(data_cfg.cache_dir))
    raise DataError(f"data.cache_dir={where} lacks its tokenizer {manifest['tokenizer']}; {_rebuild(where)}")
  return str(path)


def check_tokenizer(data_cfg, manifest: dict, model_path: str) -> None:
  """Stops when the run's tokenizer is not the one the prepared cache was tokenized with."""
  if cache.file_sha256(model_path) != manifest["tokenizer_sha256"]:
    where = str(cache.cache_root(data_cfg.cache_dir))
    raise DataError(
      f"data.cache_dir={where} was tokenized with another tokenizer than this run's {model_path} (sha256 differs); "
      f"{_rebuild(where)}, or use the run directory the cache was made for"
    )


def unit_paths(data_cfg, manifest: dict) -> list[tuple[str, list[epath.Path]]]:
  """[(source name, its unit files)] in corpus order, every file checked to exist."""
  root = cache.cache_root(data_cfg.cache_dir)
  out, missing, total = [], [], 0
  for source in manifest["sources"]:
    paths = [root / unit for unit in source["units"]]
    total += len(paths)
    missing += [unit for unit, path in zip(source["units"], paths) if not path.exists()]
    out.append((source["name"], paths))
  if missing:
    raise DataError(
      f"data.cache_dir={root} lacks {len(missing)} of its {total} unit files (e.g. {missing[0]}); {_rebuild(str(root))}"
    )
  return out


def _rebuild(where: str) -> str:
  return (
    f"rebuild it with `python scripts/prepare_data.py --config CONFIG --out NEW_DIR` and set data.cache_dir=NEW_DIR "
    f"(nothing in {where} was changed)"
  )


def _say(key: str, value) -> str:
  if key == "tokenizer":
    return "a given data.tokenizer" if value == "given" else "a tokenizer trained on the corpus (data.tokenizer='')"
  return f"data.{key}={value!r}"


def _relative_to(path: str, root: epath.Path) -> str:
  path, root_text = str(path), str(root).rstrip("/") + "/"
  assert path.startswith(root_text), f"{path} is not inside the cache dir {root}"
  return path[len(root_text) :]
