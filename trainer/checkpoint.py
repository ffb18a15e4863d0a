"""Sharded, asynchronous orbax checkpoints with exact resume and fallback past damaged checkpoints.

A checkpoint `<workdir>/checkpoints/<step>/` holds three items: `state` (parameters, optimizer state, step,
rng; every process writes its own shards through tensorstore/OCDBT), `data` (the grain iterator's position,
one file per process) and `config` (the resolved config, JSON). Orbax writes into a temporary directory and
renames it on commit, so a run killed mid-save leaves the previous checkpoint as the latest; old checkpoints
are deleted only after a newer one has committed.
"""

import logging
import os
import time

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath

_log = logging.getLogger(__name__)

CORRUPT_SUFFIX = ".corrupt"


class CheckpointError(ValueError):
  """A checkpoint or run directory that cannot be used, in the user's terms."""


def check_writable(directory: str) -> None:
  """Fails at start-up, not at the first save, when the run directory cannot be written."""
  try:
    os.makedirs(directory, exist_ok=True)
    probe = os.path.join(directory, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    raise CheckpointError(
      f"run directory {directory} is not writable ({e.strerror}); pass a --workdir you can write to"
    ) from None


class Checkpointer:
  """Saves every `every_steps` and on request; restores the newest checkpoint that reads back whole."""

  def __init__(self, workdir: str, ckpt_cfg):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
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
      "data": grain.checkpoint.CheckpointHandler(),
      "config": ocp.JsonCheckpointHandler(),
    }
    self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def save(self, step: int, state, data_iterator, config_json: str | None = None) -> float:
    """Starts saving `step`; returns the seconds the train loop was blocked (the rest runs in the background)."""
    start = time.perf_counter()
    items = {"state": ocp.args.StandardSave(state)}
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    if config_json is not None:
      import json

      items["config"] = ocp.args.JsonSave(json.loads(config_json))
    self._manager.save(step, args=ocp.args.Composite(**items), force=True)
    blocked = time.perf_counter() - start
    _log.info("checkpoint %d: the train loop was blocked %.2f s; writing continues in the background", step, blocked)
    return blocked

  def restore_latest(self, abstract_state, data_iterator):
    """Restores the newest readable checkpoint into `abstract_state`'s shardings and `data_iterator` (if any).

    Returns the state, or None when there is no checkpoint. A checkpoint that fails to read back (missing or
    truncated files) is reported by name, renamed to `<step>.corrupt` (kept, never deleted) and skipped in
    favour of the one before it.
    """
    for step in reversed(self.steps()):
      self._check_matches(step, abstract_state)
      try:
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if data_iterator is not None:
          items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
      except Exception as e:  # noqa: BLE001 (any read failure of a committed checkpoint means damage)
        path = os.path.join(self.directory, str(step))
        _log.warning(
          "checkpoint %s cannot be read (%s: %s); keeping it as %s%s and trying the previous one",
          path,
          type(e).__name__,
          str(e).splitlines()[0][:200] if str(e) else "",
          path,
          CORRUPT_SUFFIX,
        )
        self._set_aside(step)
        continue
      _log.info("resumed from checkpoint %s (step %d)", os.path.join(self.directory, str(step)), step)
      return restored.state
    return None

  def _check_matches(self, step: int, abstract_state) -> None:
    """A checkpoint of another model is a config mistake, not damage: say so instead of skipping it."""
    try:
      saved = self._manager.item_metadata(step).state
    except Exception:  # noqa: BLE001 (unreadable metadata is damage, which restore_latest handles)
      return
    saved = getattr(saved, "tree", saved)
    if not saved or "params" not in saved:
      return
    saved_params = _shapes(saved["params"])
    want_params = _shapes(abstract_state.params)
    if saved_params and saved_params != want_params:
      differing = sorted(set(saved_params.items()) ^ set(want_params.items()))[0][0]
      raise CheckpointError(
        f"checkpoint {os.path.join(self.directory, str(step))} holds a different model (first difference at "
        f"{differing}); use the config it was trained with, or a new --workdir"
      )

  def _set_aside(self, step: int) -> None:
    if jax.process_index() == 0:
      path = epath.Path(self.directory) / str(step)
      target = path.parent / f"{step}{CORRUPT_SUFFIX}"
      if target.exists():
        target = path.parent / f"{step}{CORRUPT_SUFFIX}.{int(time.time())}"
      path.rename(target)
    self._manager.reload()

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def _shapes(tree) -> dict[str, tuple]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(path): tuple(getattr(leaf, "shape", ())) for path, leaf in leaves}


def load_params(path: str, abstract_params, abstract_opt_state=None):
  """Parameters (and optionally optimizer state) from another run for `config.checkpoint.init_from`.

  `path` is a run directory (its latest checkpoint), one checkpoint `<run>/checkpoints/<step>`, or a
  directory written by scripts/export_params.py. Arrays come back in the shardings of the abstract trees.
  """
  item_dir = _find_state_item(path)
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
      raise CheckpointError(
        f"cannot load parameters from {item_dir} ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
        "check that config.checkpoint.init_from points at a run of the same model"
      ) from None
  return restored["params"], restored.get("opt_state")


def _find_state_item(path: str) -> str:
  path = os.path.abspath(path)
  candidates = [os.path.join(path, "state"), os.path.join(path, "params")]
  checkpoints = os.path.join(path, "checkpoints")
  if os.path.isdir(checkpoints):
    steps = sorted(int(name) for name in os.listdir(checkpoints) if name.isdigit())
    if steps:
      candidates.insert(0, os.path.join(checkpoints, str(steps[-1]), "state"))
  for candidate in candidates:
    if os.path.isdir(candidate):
      return candidate
  raise CheckpointError(
    f"config.checkpoint.init_from={path} holds no checkpoint; point it at a run directory, "
    "<run>/checkpoints/<step>, or the output of scripts/export_params.py"
  )
