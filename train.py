"""Train a model: `python train.py --config configs/tiny.py [--config.group.key=value ...] [--workdir DIR]`."""

import logging as std_logging
import os
import sys

from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from trainer.config import ConfigError, check_overrides, validate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file in configs/.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<config file stem>.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step ahead of time and print the plan as JSON.")


def _user_errors() -> tuple[type[Exception], ...]:
  import data
  from sharding.mesh import MeshError
  from trainer.checkpoint import CheckpointError

  return (ConfigError, MeshError, data.DataError, CheckpointError)


def main(argv):
  del argv
  absl_logging.set_verbosity(absl_logging.WARNING)  # orbax and jax log every step of a save at INFO
  cfg = _CONFIG.value
  workdir = _WORKDIR.value or os.path.join(
    "runs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0]
  )
  try:
    validate(cfg)
    if _DRY_RUN.value:
      import json

      from trainer.plan import plan

      print(json.dumps(plan(cfg, workdir), indent=2))
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
  for package in ("trainer", "data", "sharding", "model"):
    std_logging.getLogger(package).setLevel(std_logging.INFO)
  app.run(main)
