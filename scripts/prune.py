"""Prune a trained run's projections and write the result as a run that training starts from.

  python scripts/prune.py --workdir runs/tiny --out runs/tiny_wanda --method wanda --sparsity 0.5
      [--calibration_batches 8] [--checkpoint STEP|PATH]

--method magnitude | wanda | 2:4 (model/sparsity.py): magnitude and wanda zero the --sparsity fraction of lowest
scores among the weights of each output; Wanda's score is |W| times the norm of the weight's input feature over
--calibration_batches batches of the run's training data; 2:4 keeps the 2 of highest Wanda score in every 4
consecutive inputs (--sparsity is then 0.5). Attention and MLP projections of dense models are pruned; embeddings,
head, norms and biases are not.

Writes `<out>/params` (as scripts/export_params.py does), the run's config.json and tokenizer, and
`<out>/prune.json` with the method and the held-out loss before and after. A pruned weight is exactly zero: the
zeros are the mask, and fine-tuning with `--config.checkpoint.init_from=<out> --config.train.keep_sparsity=true`
keeps them zero. Ends with one JSON line: method, sparsity, eval_loss_before, eval_loss_after.
"""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402


def eval_loss(graphdef, params, batches) -> float:
  """Mean next-token loss of `params` over `batches` (their target tokens)."""
  import jax

  from objectives.losses import next_token_loss, token_count

  loss_fn = next_token_loss(graphdef)
  step = jax.jit(lambda p, b: (loss_fn(p, {}, b, None)[0][0], token_count(b)))
  sums = jax.device_get([step(params, b) for b in batches])
  return sum(float(n) for n, _ in sums) / max(sum(float(t) for _, t in sums), 1.0)


def run_batches(run, calibration_batches: int) -> tuple[list[dict], list[dict]]:
  """(held-out batches, the first `calibration_batches` training batches) of the run's data, on one device."""
  import itertools

  import jax

  import data
  import objectives

  cfg, device = run.cfg, jax.sharding.SingleDeviceSharding(jax.devices()[0])
  tokenizer = data.Tokenizer(run.tokenizer_path)
  token_cache = objectives.get("lm").load_documents(cfg.data, tokenizer)
  rows = cfg.train.global_batch_size
  held_out = data.make_eval_batches(
    cfg.data, tokenizer, global_batch_size=rows, num_batches=cfg.train.eval_batches, sharding=device,
    token_cache=token_cache,
  )  # fmt: skip
  if not held_out:
    raise ValueError(f"{run.source} holds no data out (data.eval_fraction=0): no held-out loss to report")
  calibration = []
  if calibration_batches > 0:
    train_iter = data.make_train_iterator(
      cfg.data, tokenizer, global_batch_size=rows, seed=cfg.train.seed, sharding=device, token_cache=token_cache
    )
    try:
      calibration = list(itertools.islice(train_iter, calibration_batches))
    finally:
      getattr(train_iter, "close", lambda: None)()
  return held_out, calibration


def check(run, method: str, sparsity: float, calibration_batches: int) -> None:
  """Raises a one-line ValueError when `run` cannot be pruned as asked."""
  from model.params import abstract_model

  if method == "2:4":
    if sparsity != 0.5:
      raise ValueError(f"--method=2:4 prunes exactly half the weights; drop --sparsity={sparsity} (or give 0.5)")
  elif not 0.0 <= sparsity < 1.0:
    raise ValueError(f"--sparsity={sparsity}; give a fraction in [0, 1)")
  if method != "magnitude" and calibration_batches < 1:
    raise ValueError(f"--method={method} needs --calibration_batches >= 1 (its input norms come from them)")
  if run.model_cfg.num_experts > 0:
    raise ValueError(f"{run.source} is an MoE model; pruning covers dense models (config.moe.num_experts=0)")
  if run.cfg.lora.rank > 0:
    raise ValueError(f"{run.source} is a LoRA run; export it merged (scripts/export_params.py) and prune the export")
  if method == "2:4":
    bad = [n for n, w in _inputs(abstract_model(run.model_cfg)[1]) if w % 4]
    if bad:
      raise ValueError(f"--method=2:4 needs input sizes divisible by 4; {', '.join(bad)} are not")


def pruned_params(graphdef, params, method: str, sparsity: float, calibration: list[dict]) -> dict:
  """`params` pruned by `method`, Wanda's input norms (wanda, 2:4) from the `calibration` batches."""
  import jax

  from model import sparsity as sp

  norms = sp.input_norms(graphdef, params, calibration) if method != "magnitude" else None
  return jax.jit(lambda p, n: sp.prune_params(p, method, sparsity, n))(params, norms)


def prune(
  workdir: str,
  out: str,
  method: str,
  sparsity: float = 0.5,
  calibration_batches: int = 8,
  checkpoint: str | None = None,
) -> dict:
  """Prunes the run in `workdir` into the run `out`; -> the figures of the JSON line. Bad input raises a one-line
  ValueError, ConfigError, DataError or CheckpointError."""
  import shutil

  import jax
  import orbax.checkpoint as ocp

  from data.tokenizer import copy_run_tokenizer
  from model import sparsity as sp
  from model.params import abstract_model
  from parallel.partition import with_shardings
  from storage import as_path
  from storage.run import open_run

  if as_path(out).exists():
    raise ValueError(f"--out={out} exists; pass an --out that does not, so nothing is overwritten")
  run = open_run(workdir, checkpoint)
  check(run, method, sparsity, calibration_batches)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  graphdef, abstract, _ = abstract_model(run.model_cfg)
  params = run.load_params(with_shardings(abstract, jax.tree.map(lambda _: device, abstract)))
  held_out, calibration = run_batches(run, calibration_batches if method != "magnitude" else 0)
  pruned = pruned_params(graphdef, params, method, sparsity, calibration)
  figures = {
    "method": method,
    "sparsity": round(sp.sparsity_of(pruned), 6),
    "calibration_batches": len(calibration),
    "eval_loss_before": eval_loss(graphdef, params, held_out),
    "eval_loss_after": eval_loss(graphdef, pruned, held_out),
  }
  os.makedirs(out)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(os.path.join(out, "params")), {"params": pruned})
  with open(os.path.join(out, "prune.json"), "w") as f:
    json.dump({**figures, "source": run.source}, f, indent=2)
  shutil.copy(str(as_path(workdir) / "config.json"), os.path.join(out, "config.json"))
  copy_run_tokenizer(workdir, out)
  return figures


def _inputs(abstract: dict):
  """(kernel path, the size of its last input axis) of every projection."""
  from model.quant import PROJECTIONS
  from model.sparsity import kernel_paths

  for path, value in kernel_paths(abstract):
    yield "/".join(path), value.shape[value.ndim - PROJECTIONS[path[-1]][1] - 1]


def _define_flags() -> None:
  """The command line's flags, defined only when this file runs as the script: tests and benchmarks import its
  functions beside other scripts that define --workdir and --out too."""
  flags.DEFINE_string("workdir", None, "Run directory (config.json, tokenizer, checkpoints) or export.")
  flags.DEFINE_string("out", None, "Output run directory (must not exist).")
  flags.DEFINE_enum("method", None, ["magnitude", "wanda", "2:4"], "Pruning method.")
  flags.DEFINE_float("sparsity", 0.5, "Fraction of each output's weights set to zero (2:4: 0.5).")
  flags.DEFINE_integer("calibration_batches", 8, "Training batches that Wanda's input norms come from.")
  flags.DEFINE_string("checkpoint", None, "Step number, or path to a checkpoint or export.")


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  f = flags.FLAGS
  if not f.workdir or not f.out or not f.method:
    sys.exit("error: pass --workdir RUN --out RUN2 --method magnitude|wanda|2:4")
  logging.set_verbosity(logging.WARNING)
  from data import DataError
  from settings import ConfigError
  from storage.checkpoint import CheckpointError

  try:
    figures = prune(f.workdir, f.out, f.method, f.sparsity, f.calibration_batches, f.checkpoint)
  except (ValueError, ConfigError, DataError, CheckpointError) as e:
    sys.exit(f"error: {e}")
  print(json.dumps(figures))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
