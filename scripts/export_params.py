"""Export a run's parameters (no optimizer state) for inference or as another run's starting point.

  python scripts/export_params.py --run runs/tiny --out exports/tiny [--step 500] [--dtype bfloat16]

Writes `<out>/params` (an orbax checkpoint of {"params": ...}), and copies the run's `config.json` and its
tokenizer (`tokenizer.model`, or `tokenizer.json` with any `tokenizer_config.json`) beside it.
A new run starts from it with `--config.checkpoint.init_from=<out>`.

`--quantize int8|int4 [--group_size G]` writes the projections weight-only quantized (model/quant.py: qwix
QArrays, int8 per output channel, int4 per G inputs) with `<out>/quantization.json`; scripts/generate.py and
score.py load it as saved. It is for inference: training does not start from it.

A LoRA run (config.lora.rank > 0) checkpoints only its adapters. `--merge` (the default) writes the plain
parameters of base + adapters, every adapted kernel W replaced by W + alpha / rank * A B: a model without
adapters, loadable like any export. The base is the run's `checkpoint.init_from`, or the seed's random init
when it had none. `--adapters_only` writes the adapters alone, with `<out>/lora.json` naming the base.
"""

import json
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
from absl import app, flags  # noqa: E402

from data.tokenizer import copy_run_tokenizer  # noqa: E402
from parallel.partition import with_shardings  # noqa: E402

_RUN = flags.DEFINE_string("run", None, "Run directory (holds checkpoints/).", required=True)
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist).", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step; default the latest.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Dtype of the exported parameters.")
_MERGE = flags.DEFINE_bool("merge", True, "LoRA runs: merge the adapters into the base (the default).")
_ADAPTERS_ONLY = flags.DEFINE_bool("adapters_only", False, "LoRA runs: write the adapters alone, not merged.")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8", "int4"], "Write the projections weight-only quantized.")
_GROUP_SIZE = flags.DEFINE_integer("group_size", 128, "--quantize=int4: inputs per scale (per output channel).")


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


def _run_config(run: str):
  """The run's resolved config (config.json) as a ConfigDict; None when the run directory has none."""
  import ml_collections

  path = os.path.join(run, "config.json")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def _lora_on(run_cfg) -> bool:
  return run_cfg is not None and "lora" in run_cfg and run_cfg.lora.rank > 0


def _merge_lora(run: str, run_cfg, adapters: dict) -> dict:
  """Base (init_from or the seed's init) + adapters -> plain parameters with W + alpha / rank * A B."""
  import data
  from model import lora
  from model.params import abstract_model
  from storage.run import model_config
  from trainer.experiment import lora_base

  # The embedding's rows as the run padded them; mesh.tensor=-1 (all remaining devices) counts as 1 here.
  tokenizer_vocab = data.load_tokenizer(run_cfg.data, run).vocab_size
  model_cfg = model_config(run_cfg, tokenizer_vocab, tensor=run_cfg.mesh.tensor, with_lora=True)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  _, abstract_base = lora.split(abstract_model(model_cfg)[1])
  abstract_base = with_shardings(abstract_base, jax.tree.map(lambda _: device, abstract_base))
  base = lora_base(run_cfg.checkpoint.init_from, model_cfg, run_cfg.train.seed, abstract_base)
  return lora.merge(lora.combine(adapters, base), model_cfg.lora_alpha / model_cfg.lora_rank)


def export(
  run: str,
  out: str,
  step: int | None = None,
  dtype: str = "float32",
  adapters_only: bool = False,
  quantize: str | None = None,
  group_size: int = 128,
) -> str:
  if os.path.exists(out):
    sys.exit(f"error: {out} exists; pass an --out that does not, so nothing is overwritten")
  run_cfg = _run_config(run)
  if adapters_only and not _lora_on(run_cfg):
    sys.exit(f"error: {run} is not a LoRA run (its config.lora.rank is 0 or absent); export it without --adapters_only")
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
  params = restored["params"]
  if _lora_on(run_cfg) and not adapters_only:
    params = _merge_lora(run, run_cfg, params)
  params = jax.tree.map(lambda x: x.astype(jnp.dtype(dtype)), params)
  if quantize:
    from model import quant

    if adapters_only:
      sys.exit("error: --quantize and --adapters_only exclude each other; quantize a merged export")
    try:
      params = quant.quantize_params(params, quantize, group_size)
    except ValueError as e:
      sys.exit(f"error: {e}")
  os.makedirs(out)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(os.path.join(out, "params")), {"params": params})
  if quantize:
    with open(os.path.join(out, quant.QUANT_FILE), "w") as f:
      json.dump(quant.describe(quantize, group_size), f)
  if adapters_only:
    lora_cfg, init_from = run_cfg.lora, run_cfg.checkpoint.init_from
    base = init_from or f"random init of train.seed={run_cfg.train.seed} (the run had no checkpoint.init_from)"
    description = {"rank": lora_cfg.rank, "alpha": lora_cfg.alpha, "targets": lora_cfg.targets, "base": base}
    with open(os.path.join(out, "lora.json"), "w") as f:
      json.dump(description, f, indent=2)
  if os.path.exists(os.path.join(run, "config.json")):
    shutil.copy(os.path.join(run, "config.json"), os.path.join(out, "config.json"))
  copy_run_tokenizer(run, out)
  # A QArray counts its weights, not its scales.
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(params, is_leaf=lambda x: hasattr(x, "qvalue")))
  what = "LoRA adapter" if adapters_only else ("merged (base + LoRA)" if _lora_on(run_cfg) else "")
  dtype = f"{dtype}, projections {quantize}" if quantize else dtype
  print(f"exported {count / 1e6:.1f}M {what + ' ' if what else ''}parameters ({dtype}) from "
        f"{os.path.dirname(state_dir)} to {out}")  # fmt: skip
  return out


def main(argv):
  del argv
  if _ADAPTERS_ONLY.value and flags.FLAGS["merge"].present and _MERGE.value:
    sys.exit("error: --merge and --adapters_only exclude each other; pass one of them")
  from data.errors import DataError
  from storage.checkpoint import CheckpointError

  try:
    export(
      _RUN.value, _OUT.value, _STEP.value, _DTYPE.value, adapters_only=_ADAPTERS_ONLY.value or not _MERGE.value,
      quantize=_QUANTIZE.value, group_size=_GROUP_SIZE.value,
    )  # fmt: skip
  except (CheckpointError, DataError) as e:  # a LoRA run's base that cannot be loaded
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main)
