"""Train a model: `python train.py --config configs/tiny.py [--config.group.key=value ...] [--workdir DIR]`."""

import logging as std_logging
import os
import sys

if __name__ == "__main__":
  import compat
  from trainer import cpu_host

  try:
    compat.check_flax_matches_jax()  # before anything imports flax, which fails with a traceback of its own
  except compat.VersionError as e:
    sys.exit(f"error: {e}")
  cpu_host.prepare_heap()  # CPU runs: glibc's heap settings, before JAX (imported below) starts any thread

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from settings import ConfigError
from settings.load import check_overrides
from settings.validate import validate


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value else None


_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<config file stem>.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step ahead of time and print the plan as JSON.")
_TOPOLOGY = flags.DEFINE_string(
  "topology",
  None,
  "With --dry_run: compile for this TPU slice instead of the devices here, e.g. v5p:4x4x4, v5e:4x4, v5p-128, "
  "v5litepod-16, v6e-256, v4-32 (libtpu describes it; no TPU needed).",
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "With --topology: how many such slices, joined over DCN.")
# Multi-process jobs; each flag has an environment variable of the same name in capitals, prefixed KILN_.
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", os.environ.get("KILN_COORDINATOR_ADDRESS"), "HOST:PORT of process 0 (multi-process)."
)
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", _env_int("KILN_NUM_PROCESSES"), "Processes in the job (multi-process)."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", _env_int("KILN_PROCESS_ID"), "This process's index, 0-based.")
_TIMEOUT = flags.DEFINE_integer(
  "distributed_timeout_s", _env_int("KILN_DISTRIBUTED_TIMEOUT_S") or 120, "Seconds to wait for all processes."
)


def _user_errors() -> tuple[type[Exception], ...]:
  import data
  from parallel.mesh import MeshError
  from parallel.target import TargetError
  from storage import StorageError
  from storage.checkpoint import CheckpointError
  from trainer.distributed import DistributedError

  return (ConfigError, MeshError, data.DataError, CheckpointError, DistributedError, StorageError, TargetError)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and jax log every step of a save at INFO
  cfg = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
    "runs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  )
  try:
    validate(cfg)
    if _TOPOLOGY.value is not None and not _DRY_RUN.value:
      raise ConfigError("--topology plans for a TPU slice that is not attached; add --dry_run")
    if _NUM_SLICES.value != 1 and _TOPOLOGY.value is None:
      raise ConfigError("--num_slices counts the slices of --topology; give --topology too")
    from storage import check_urls

    # URLs answer now, before anything is built or written anywhere.
    check_urls(
      [
        ("--workdir", workdir, True),
        ("config.data.files", cfg.data.files, False),
        ("config.data.tokenizer", cfg.data.tokenizer, False),
        ("config.data.cache_dir", cfg.data.cache_dir, True),
        ("config.checkpoint.init_from", cfg.checkpoint.init_from, False),
      ]
    )
    from trainer import cpu_host
    from trainer.distributed import initialize

    if _TOPOLOGY.value is not None:
      # The slice is only described: the devices here (a CPU, or a TPU that is not the target) stay unused.
      import jax

      jax.config.update("jax_platforms", "cpu")
    cpu_host.prepare()  # CPU runs: settings that must precede the backend, which initialize may create
    initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _TIMEOUT.value)
    if _DRY_RUN.value:
      import json

      from parallel.target import tpu_target
      from trainer.plan import plan

      target = tpu_target(_TOPOLOGY.value, _NUM_SLICES.value) if _TOPOLOGY.value is not None else None
      print(json.dumps(plan(cfg, workdir, target), indent=2))
      return
    from trainer.loop import train

    train(cfg, workdir)
  except _user_errors() as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  try:
    check_overrides(sys.argv)
  except ConfigError as e:
    sys.exit(f"error: {e}")
  # Our own packages log progress at INFO; libraries (orbax, jax) only warnings and errors.
  for package in ("trainer", "data", "parallel", "model", "objectives", "storage"):
    std_logging.getLogger(package).setLevel(std_logging.INFO)
  app.run(main)
