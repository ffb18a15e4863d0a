"""Export a run's parameters (no optimizer state) for inference or as another run's starting point.

  python scripts/export_params.py --run runs/tiny --out exports/tiny [--step 500] [--dtype bfloat16]

Writes `<out>/params` (an orbax checkpoint of {"params": ...}), and copies the run's `config.json` and its
tokenizer (`tokenizer.model`, or `tokenizer.json` with any `tokenizer_config.json`) beside it.
A new run starts from it with `--config.checkpoint.init_from=<out>`.
"""

import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from absl import app, flags  # noqa: E402

from data.tokenizer import copy_run_tokenizer  # noqa: E402

_RUN = flags.DEFINE_string("run", None, "Run directory (holds checkpoints/).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype of the exported parameters.")


def _checkpoint_dir(run: str, step: int | None) -> str:
  root = os.path.join(run, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []
  if not steps:
    sys.exit(f"error: {root} holds no checkpoint; pass --run a run directory that has saved one")
  if step is None:
    step = steps[-1]
  if step not in steps:
    sys.exit(f"error: no checkpoint for step {step} in {root}; available: {steps}")
  return os.path.join(root, str(step), "state")


def export(run: str, out: str, step: int | None = None, dtype: str = "float32") -> str:
  if os.path.exists(out):
    sys.exit(f"error: {out} exists; pass an --out that does not, so nothing is overwritten")
  state_dir = _checkpoint_dir(run, step)
  metadata = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree["params"]
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), metadata)
  item = {"params": abstract}
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(
      state_dir,
      args=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
      ),
    )
  params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), restored["params"])
  os.makedirs(out)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(os.path.join(out, "params")), {"params": params})
  if os.path.exists(os.path.join(run, "config.json")):
    shutil.copy(os.path.join(run, "config.json"), os.path.join(out, "config.json"))
  copy_run_tokenizer(run, out)
  count = sum(x.size for x in jax.tree.leaves(params))
  print(f"exported {count / 1e6:.1f}M parameters ({dtype}) from {os.path.dirname(state_dir)} to {out}")
  return out


def main(argv):
  del argv
  export(_RUN.value, _OUT.value, _STEP.value, _DTYPE.value)


if __name__ == "__main__":
  app.run(main)
