"""Sharded, asynchronous orbax checkpoints: exact resume, and a clear line between "damaged" and "does not fit".

A checkpoint `<workdir>/checkpoints/<step>/` holds three items: `state` (parameters, optimizer state, step,
rng; every process writes its own shards through tensorstore/OCDBT), `data` (the data position: the global
row cursor, the same for any number of processes) and `config` (the resolved config, JSON). Orbax writes into
a temporary directory and renames it on commit, so a run killed mid-save leaves the previous checkpoint as
the latest; old checkpoints are deleted only after a newer one has committed. The directory may be a URL.

On resume, two different things can be wrong with the newest checkpoint:
- it cannot be read back (truncated or missing files): after one retry it is set aside as `<step>.corrupt`
  (kept, never deleted) and the one before it is used;
- it reads fine but does not fit the current config (another model shape, architecture or optimizer): nothing
  is renamed or skipped; the run stops with one line naming the first differing array or the config keys that
  changed.
"""

import dataclasses
import json
import logging
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from model.config import architecture_changes
from storage import as_path

_log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"
_RETRY_PAUSE_S = 2.0  # a read that fails is tried once more after this pause (a flaky disk or bucket)


class CheckpointError(ValueError):
  """A checkpoint or run directory that cannot be used, in the user's terms."""


@dataclasses.dataclass
class Restored:
  state: object
  step: int
  path: str
  data: dict | None  # the saved data position ({"next_row": int}); None for checkpoints written without one


def check_writable(directory: epath.Path | str) -> None:
  """Fails at start-up, not at the first save, when the run directory cannot be written."""
  directory = as_path(directory)
  try:
    directory.mkdir(parents=True, exist_ok=True)
    probe = directory / f".write_test.{jax.process_index()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise CheckpointError(
      f"run directory {directory} is not writable ({e.strerror or e}); pass a --workdir you can write to"
    ) from None


class Checkpointer:
  """Saves every `every_steps` and on request; restores the newest checkpoint that reads back whole."""

  def __init__(self, workdir: str, ckpt_cfg):
    self.directory = as_path(workdir) / "checkpoints"
    check_writable(self.directory)
    self.every_steps = ckpt_cfg.every_steps
    options = ocp.CheckpointManagerOptions(
      max_to_keep=ckpt_cfg.max_to_keep,
      keep_period=ckpt_cfg.keep_period or None,
      enable_async_checkpointing=ckpt_cfg.async_save,
      create=True,
    )
    handlers = {
      "state": ocp.StandardCheckpointHandler(),
      "data": ocp.JsonCheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
    }
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_position: dict | None = None, config_json: str | None = None) -> float:
    """Starts saving `step`; returns the seconds the train loop was blocked (the rest runs in the background)."""
    start = time.perf_counter()
    items = {"state": ocp.args.StandardSave(state)}
    if data_position is not None:
      items["data"] = ocp.args.JsonSave(data_position)
    if config_json is not None:
      items["config"] = ocp.args.JsonSave(json.loads(config_json))
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    blocked = time.perf_counter() - start
    _log.info("checkpoint %d: the train loop was blocked %.2f s; writing continues in the background", step, blocked)
    return blocked

  def restore_latest(self, abstract_state, config: dict | None = None) -> Restored | None:
    """Restores the newest readable checkpoint into `abstract_state`'s shardings; None when there is none.

    `config` (the current resolved config as a dict) lets a checkpoint that does not fit name the config keys
    that changed since it was saved. Every process takes the same decision.
    """
    for step in reversed(self.steps()):
      path = self.directory / str(step)
      saved = self._read(step, lambda step=step: _leaf_shapes(self._state_metadata(step)))
      if saved is not None:
        self._check_optimizer(step, config)  # first: another optimizer's state also has other arrays
        self._check_fits(step, saved, abstract_state, config)
        self._check_resumable(step, config)
      state = None
      if saved is not None:
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state))
        state = self._read(step, lambda step=step, args=args: self._manager.restore(step, args=args).state)
      if not _everywhere(state is not None):
        self._set_aside(step)
        continue
      _log.info("resumed from checkpoint %s (step %d)", path, step)
      return Restored(state=state, step=step, path=str(path), data=self._read_json(step, "data"))
    return None

  def _state_metadata(self, step: int):
    metadata = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state")
    return getattr(metadata, "tree", metadata)

  def _read(self, step: int, read):
    """`read()`, tried twice with a pause between; None (and a warning naming the checkpoint) if both fail."""
    for attempt in range(2):
      try:
        return read()
      except Exception as e:  # noqa: BLE001 (a read failure of a committed checkpoint is damage or a hiccup)
        reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        if attempt == 0:
          _log.warning("reading checkpoint %s failed (%s); trying again", self.directory / str(step), reason)
          time.sleep(_RETRY_PAUSE_S)
          self._manager.reload()
        else:
          _log.warning("checkpoint %s cannot be read (%s)", self.directory / str(step), reason)
    return None

  def saved_config(self, step: int) -> dict | None:
    """The resolved config checkpoint `step` was saved with (None for checkpoints written without one)."""
    return self._read_json(step, "config")

  def _read_json(self, step: int, item: str) -> dict | None:
    """A small JSON item of a checkpoint, or None where the checkpoint has none (or an older format)."""
    try:
      return self._manager.restore(step, args=ocp.args.Composite(**{item: ocp.args.JsonRestore()}))[item]
    except Exception:  # noqa: BLE001 (absent or unreadable: the caller has a fallback)
      return None

  def _check_fits(self, step: int, saved: dict[str, tuple], abstract_state, config: dict | None) -> None:
    """A readable checkpoint of another shape is a config change, not damage: stop and say what differs."""
    wanted = _leaf_shapes(abstract_state)
    if saved == wanted:
      return
    differing = [k for k in saved.keys() | wanted.keys() if saved.get(k) != wanted.get(k)]
    name = min(differing, key=lambda k: (not k.startswith("params."), k))  # a parameter says most
    if name not in wanted:
      difference = f"{name} is in the checkpoint but not in this config's state"
    elif name not in saved:
      difference = f"{name} is in this config's state but not in the checkpoint"
    else:
      difference = f"{name} has shape {saved[name]} in the checkpoint and {wanted[name]} in this config"
    saved_config = self._read_json(step, "config")
    if config is not None and saved_config is not None:
      changes = config_changes(saved_config, config)
      changed = f"config changed since it was saved: {', '.join(changes[:6]) or 'nothing'}"
      changed += f" (+{len(changes) - 6} more)" if len(changes) > 6 else ""
    else:
      changed = "the checkpoint holds no config to compare with"
    path = self.directory / str(step)
    raise CheckpointError(
      f"checkpoint {path} does not fit this config: {difference}; {changed}. Nothing was changed on disk. "
      f"Resume with the config it was saved with ({path}/config/metadata), use a new --workdir, or start a "
      f"new run from its weights with --config.checkpoint.init_from={path}"
    )

  def _check_optimizer(self, step: int, config: dict | None) -> None:
    """The optimizer state means what optim.optimizer says (Adam's moments, Muon's momentum, Adafactor's factored
    statistics): another optimizer cannot continue it. Checkpoints older than the key hold AdamW's."""
    saved = self._read_json(step, "config") if config is not None else None
    if saved is None:
      return
    old, new = saved.get("optim", {}).get("optimizer", "adamw"), config["optim"]["optimizer"]
    if old != new:
      path = self.directory / str(step)
      raise CheckpointError(
        f"checkpoint {path} holds the optimizer state of config.optim.optimizer={old}, not {new}. Nothing was "
        f"changed on disk. Resume with --config.optim.optimizer={old}, use a new --workdir, or start a new run "
        f"from its weights with --config.checkpoint.init_from={path}"
      )

  def _check_resumable(self, step: int, config: dict | None) -> None:
    """What a resume compares besides shapes: the saved config's architecture (model/config.py: Architecture;
    weights resumed under another would train another model even where the shapes agree) and a LoRA run's base.
    Execution fields may change on any resume."""
    saved = self._read_json(step, "config") if config is not None else None
    if saved is None:
      return
    path = self.directory / str(step)
    changes = architecture_changes(saved, config)
    if changes:
      raise CheckpointError(
        f"checkpoint {path} was saved with another architecture: {', '.join(changes[:4])}. Nothing was changed on "
        f"disk. Resume with the config it was saved with ({path}/config/metadata), use a new --workdir, or start a "
        f"new run from its weights with --config.checkpoint.init_from={path}"
      )
    check_lora_base(saved, config, str(path))

  def _set_aside(self, step: int) -> None:
    """Renames an unreadable checkpoint to `<step>.corrupt`, once every process has stopped reading it."""
    path = self.directory / str(step)
    _log.warning("checkpoint %s cannot be read back; keeping it as %s%s and trying the previous one", path, path,
                 CORRUPT_SUFFIX)  # fmt: skip
    _sync(f"kiln_set_aside_{step}_read")
    if jax.process_index() == 0:
      target = path.parent / f"{step}{CORRUPT_SUFFIX}"
      if target.exists():
        target = path.parent / f"{step}{CORRUPT_SUFFIX}.{int(time.time())}"
      path.rename(target)
    _sync(f"kiln_set_aside_{step}_renamed")
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def check_lora_base(saved: dict | None, config: dict, path: str) -> None:
  """A LoRA checkpoint holds adapters trained on one base (checkpoint.init_from, or the random init of
  train.seed when that is empty): resuming them on another base would silently train another model."""

  def base(c: dict) -> str:
    return c["checkpoint"]["init_from"] or f"the random init of train.seed={c['train']['seed']}"

  if saved is None or saved.get("lora", {}).get("rank", 0) == 0 or base(saved) == base(config):
    return
  raise CheckpointError(
    f"checkpoint {path} holds LoRA adapters trained on {base(saved)}, but this run's base is {base(config)}; "
    "resume with the checkpoint.init_from and train.seed it was saved with, or use a new --workdir"
  )


def config_changes(saved: dict, current: dict) -> list[str]:
  """`group.key: old -> new` for every leaf that differs between two resolved configs (as dicts)."""
  old, new = _flatten(saved), _flatten(current)
  return [f"{k}: {old.get(k, '(absent)')} -> {new.get(k, '(absent)')}" for k in sorted(old.keys() | new.keys())
          if old.get(k) != new.get(k)]  # fmt: skip


def _flatten(tree: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _leaf_shapes(tree) -> dict[str, tuple]:
  """{dotted path: shape} of every array in a state tree or in orbax's metadata of one (same names both ways)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {".".join(_key_name(k) for k in path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def _key_name(key) -> str:
  for attribute in ("key", "name", "idx"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _everywhere(ok: bool) -> bool:
  """True when `ok` holds on every process (all processes then take the same decision)."""
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils

  return bool(np.all(multihost_utils.process_allgather(np.array(ok))))


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)


def load_params(path: str, abstract_params, abstract_opt_state=None):
  """Parameters (and optionally optimizer state) from another run for `config.checkpoint.init_from`.

  `path` (local or a URL) is a run directory (its latest checkpoint), one checkpoint `<run>/checkpoints/<step>`,
  or a directory written by scripts/export_params.py. Arrays come back in the shardings of the abstract trees.
  """
  from model.quant import is_quantized, saved_quantization

  item_dir = _find_state_item(path)
  quantized = saved_quantization(str(item_dir.parent))
  wants_floats = not any(map(is_quantized, jax.tree.leaves(abstract_params, is_leaf=is_quantized)))
  if quantized and wants_floats:  # training, a teacher, pruning: the QArrays are not float weights, nor hold them
    raise CheckpointError(
      f"config.checkpoint.init_from={path} is an export quantized to {quantized['mode']} (quantization.json); start "
      "from the full-precision run or an export without --quantize (for QLoRA, set lora.base_quant instead)"
    )
  item = {"params": abstract_params}
  if abstract_opt_state is not None:
    item["opt_state"] = abstract_opt_state
  restore_args = ocp.checkpoint_utils.construct_restore_args(item)
  with ocp.PyTreeCheckpointer() as checkpointer:
    try:
      restored = checkpointer.restore(
        item_dir, args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True)
      )
    except Exception as e:  # noqa: BLE001
      same = "model" if abstract_opt_state is None else "model and config.optim.optimizer (init_optimizer_state=True)"
      raise CheckpointError(
        f"cannot load parameters from {item_dir} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
        f"check that config.checkpoint.init_from points at a run of the same {same}"
      ) from None
  return restored["params"], restored.get("opt_state")


def _find_state_item(path: str) -> epath.Path:
  path = as_path(path)
  candidates = [path / "state", path / "params"]
  checkpoints = path / "checkpoints"
  if checkpoints.is_dir():
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    if steps:
      candidates.insert(0, checkpoints / str(steps[-1]) / "state")
  for candidate in candidates:
    if candidate.is_dir():
      return candidate
  raise CheckpointError(
    f"config.checkpoint.init_from={path} holds no checkpoint; point it at a run directory, "
    "<run>/checkpoints/<step>, or the output of scripts/export_params.py"
  )
