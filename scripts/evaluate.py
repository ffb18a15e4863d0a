"""Evaluate a run (or an export) on lm-evaluation-harness tasks, with kiln as the model.

  python scripts/evaluate.py --workdir runs/tiny --tasks kiln_mc,kiln_ppl --include_path examples/eval
      [--checkpoint STEP|PATH] [--num_fewshot K] [--limit N] [--batch_size B] [--apply_chat_template]
      [--mesh data=2,tensor=4] [--quantize int8|int4 [--group_size 128]] [--output DIR]

--tasks: lm-eval task names (its catalogue, or YAML files under --include_path) or paths of task YAML files.
Tasks whose data must be downloaded need the network (or a filled Hugging Face datasets cache); offline they
fail in one line. The model runs on a mesh of all devices laid out as the run's `config.mesh` (or --mesh);
loglikelihood requests are packed many to a row, --batch_size rows per device call. Results go to
RUN/eval/<step>/ (or --output): results.json (lm-eval's results and task configs) and results.md (its table),
and the last line printed is one JSON object: {"tasks", "step", "metrics": {"eval/<task>/<metric>": value},
"documents", "seconds", "out"}.

Multi-host: start it on every host with the same flags as train.py (--coordinator_address, --num_processes,
--process_id, or their KILN_ environment variables); process 0 runs the harness, the others follow its calls.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json, tokenizer, checkpoints) or export.")
_TASKS = flags.DEFINE_list("tasks", [], "lm-eval task names or task YAML paths, comma separated.")
_INCLUDE = flags.DEFINE_string("include_path", None, "A directory of task YAML files (e.g. examples/eval).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Step number, or path to a checkpoint or export.")
_FEWSHOT = flags.DEFINE_integer("num_fewshot", None, "Few-shot examples per prompt (default: each task's own).")
_LIMIT = flags.DEFINE_float("limit", None, "At most this many documents per task (< 1: a fraction).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Rows per device call (packed requests) or prompts per batch.")
_PACK = flags.DEFINE_bool("pack", True, "Pack many loglikelihood requests into a row (--nopack: one per row).")
_CHAT = flags.DEFINE_bool("apply_chat_template", False, "Render prompts with the run's config.data.chat_template.")
_OUTPUT = flags.DEFINE_string("output", None, "Directory for results.json and results.md (default RUN/eval/<step>).")
_MESH = flags.DEFINE_string("mesh", None, "Mesh sizes over all devices, e.g. data=2,tensor=4 (default the run's).")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8", "int4"], "Weight-only quantization of the projections.")
_GROUP_SIZE = flags.DEFINE_integer("group_size", 128, "--quantize=int4: inputs per scale (per output channel).")
_DTYPE = flags.DEFINE_string("compute_dtype", None, "Override the run's compute dtype (float32, bfloat16).")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap_iters", 1000, "Bootstrap resamples for standard errors (0: none).")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed of generation tasks that sample.")
_COORDINATOR = flags.DEFINE_string(
  "coordinator_address", os.environ.get("KILN_COORDINATOR_ADDRESS"), "HOST:PORT of process 0 (multi-process)."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the job (multi-process).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  return int(value) if value and value.isdigit() else None


def eval_mesh(mesh_cfg, sizes: str | None):
  """The run's mesh (pipeline stages and slices folded away) over all devices, with `sizes` (axis=n,...) set."""
  from parallel.mesh import MESH_AXES, MeshError, make_mesh

  mesh_cfg = mesh_cfg.copy_and_resolve_references()
  for axis in MESH_AXES:
    mesh_cfg[f"dcn_{axis}"] = 1
  mesh_cfg.stage = 1
  if sizes:
    given = {}
    for item in sizes.split(","):
      axis, _, n = item.partition("=")
      if axis.strip() not in MESH_AXES or not n.strip().lstrip("-").isdigit():
        raise MeshError(f"--mesh={sizes}: give axis=size pairs over {', '.join(MESH_AXES)}, e.g. data=2,tensor=4")
      given[axis.strip()] = int(n)
    for axis in MESH_AXES:
      mesh_cfg[axis] = given.get(axis, 1)
  elif all(mesh_cfg[a] != -1 for a in MESH_AXES):
    mesh_cfg.fsdp = -1  # a run trained on another device count: its fixed sizes may not fit; fsdp takes the rest
    for axis in ("data", "expert"):
      mesh_cfg[axis] = 1
  try:
    return make_mesh(mesh_cfg)
  except MeshError as e:
    raise MeshError(f"--mesh={sizes}: {e}" if sizes else f"the run's mesh: {e}; pass --mesh") from None


def _step_name(source: str) -> str:
  """The checkpoint's step, or the export's directory name."""
  name = os.path.basename(source.rstrip("/"))
  return name if name.isdigit() else "params"


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)
  import logging as std_logging

  for noisy in ("lm_eval", "huggingface_hub", "datasets"):  # per-task notes and retries drown the results
    std_logging.getLogger(noisy).setLevel(std_logging.ERROR)
  if not _WORKDIR.value:
    sys.exit("error: --workdir is required; pass a run directory or an export")
  if not _TASKS.value:
    sys.exit("error: --tasks is required; e.g. --tasks kiln_mc,kiln_ppl --include_path examples/eval")
  if _BATCH.value < 1:
    sys.exit(f"error: --batch_size={_BATCH.value}; give at least 1")
  import json
  import time

  from data import DataError
  from evaluation.tasks import TaskError, flat_metrics, resolve_tasks, run_tasks, write_results
  from parallel.mesh import MeshError
  from settings import ConfigError
  from storage.checkpoint import CheckpointError
  from trainer.distributed import DistributedError, initialize

  try:
    resolve_tasks(_TASKS.value, _INCLUDE.value)  # a mistyped task answers before the model loads
    initialize(_COORDINATOR.value, _NUM_PROCESSES.value or _env_int("KILN_NUM_PROCESSES"),
               _PROCESS_ID.value if _PROCESS_ID.value is not None else _env_int("KILN_PROCESS_ID"))  # fmt: skip
    import jax

    from evaluation.harness import KilnLM
    from generation.run import load_run, report_quantization
    from storage.run import read_run_config

    mesh = eval_mesh(read_run_config(_WORKDIR.value).mesh, _MESH.value)
    loaded = load_run(
      _WORKDIR.value, _CHECKPOINT.value, compute_dtype=_DTYPE.value, mesh=mesh, quantize=_QUANTIZE.value,
      group_size=_GROUP_SIZE.value,
    )  # fmt: skip
    if jax.process_index() == 0:
      report_quantization(loaded)
    lm = KilnLM(
      loaded.decoder, loaded.params, loaded.tokenizer, batch_size=_BATCH.value, pack=_PACK.value,
      chat_template=loaded.cfg.data.chat_template or None, seed=_SEED.value,
    )  # fmt: skip
    if jax.process_index() != 0:
      lm.follow()
      return
    start = time.perf_counter()
    try:
      results = run_tasks(
        lm, _TASKS.value, include_path=_INCLUDE.value, num_fewshot=_FEWSHOT.value, limit=_LIMIT.value,
        apply_chat_template=_CHAT.value, bootstrap_iters=_BOOTSTRAP.value,
      )  # fmt: skip
    finally:
      lm.release()
    seconds = time.perf_counter() - start
    step = _step_name(loaded.source)
    out = _OUTPUT.value or os.path.join(_WORKDIR.value, "eval", step)
    paths = write_results(out, results)
  except (TaskError, ValueError, ConfigError, DataError, CheckpointError, MeshError, DistributedError, OSError) as e:
    sys.exit(f"error: {e}")
  print(open(paths["markdown"]).read())
  documents = sum(n.get("effective", 0) for n in results.get("n-samples", {}).values())
  line = {
    "tasks": list(results["results"]), "step": step, "metrics": flat_metrics(results), "documents": documents,
    "seconds": round(seconds, 3), "out": out,
  }  # fmt: skip
  print(json.dumps(line))


if __name__ == "__main__":
  app.run(main)
