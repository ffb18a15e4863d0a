"""`--dry_run`: compile the train step ahead of time from abstract arrays and report the per-device plan.

The program is compiled for the run's target (parallel/target.py): the devices JAX sees, or with `--topology` a
TPU slice that is not attached, compiled by libtpu from any machine. A CPU plan describes the CPU's program,
whose code paths, temporaries and collectives are not those of a TPU or GPU program.
"""

import json
import logging
import math
import time

import jax

from model import quant
from parallel import context
from parallel.hlo import collectives
from parallel.mesh import MESH_AXES, make_mesh
from parallel.partition import bytes_per_device
from parallel.target import Target, live_target
from settings import ConfigError
from storage import as_path
from trainer.experiment import build
from trainer.metrics import flops_per_token

_log = logging.getLogger(__name__)

CPU_NOTE = (
  "planned for the CPU: this is XLA:CPU's program (its own code paths, temporaries and collectives), not a TPU "
  "or GPU program; add --topology (e.g. v5p:4x4x4) to compile for a TPU slice"
)


PROGRAM_PARTS = ("argument", "temp", "output", "alias")


def program_bytes(memory) -> dict[str, int]:
  """A compiled program's memory per device (XLA's memory analysis), as plan.json's `target` names it: its
  arguments, temporaries, outputs, the part of the outputs that reuses donated arguments (alias), and `total_bytes`,
  what it holds at its peak."""
  sizes = {f"{name}_bytes": int(getattr(memory, f"{name}_size_in_bytes", 0) or 0) for name in PROGRAM_PARTS}
  sizes["total_bytes"] = sizes["argument_bytes"] + sizes["output_bytes"] - sizes["alias_bytes"] + sizes["temp_bytes"]
  return sizes


def _check_slices(cfg, target: Target) -> None:
  dcn = math.prod(cfg.mesh[f"dcn_{a}"] for a in MESH_AXES)
  if dcn != target.slices:
    raise ConfigError(
      f"the target has {target.slices} slice(s) but config.mesh's dcn_* sizes multiply to {dcn}; set them to "
      f"split the mesh over {target.slices} slice(s) (e.g. --config.mesh.dcn_data={target.slices})"
    )


def compile_train_step(cfg, target: Target):
  """(experiment, the train step compiled for `target`, seconds the compile took), from abstract arrays: nothing
  is allocated, and the tokenizer is not needed (the plan uses `config.data.vocab_size`)."""
  if target.topology is not None:
    _check_slices(cfg, target)
  mesh = make_mesh(cfg.mesh, target.devices)
  exp = build(cfg, cfg.data.vocab_size, mesh)
  start = time.perf_counter()
  lowered = exp.train_step.lower(exp.abstract_state(), exp.abstract_batch(), exp.abstract_frozen())
  try:
    compiled = lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    # The TPU compiler refuses a program larger than the chip's memory: a fact about the layout, not a crash.
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    reason = str(e).strip().splitlines()[0].rstrip(".")
    raise ConfigError(
      f"the train step does not fit on {target.device_kind} x {target.chips}: {reason}; "
      "give each chip fewer sequences (config.train.grad_accum, more fsdp or data devices) or keep fewer "
      "activations (config.model.remat=full)"
    ) from None
  return exp, compiled, time.perf_counter() - start


def plan(cfg, workdir: str | None = None, target: Target | None = None) -> dict:
  """The plan of `cfg`'s train step compiled for the target's devices (default: JAX's), written to
  `workdir`/plan.json when given."""
  target = target or live_target()
  result = describe(cfg, target, *compile_train_step(cfg, target))
  if workdir is not None and jax.process_index() == 0:
    run = as_path(workdir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "plan.json").write_text(json.dumps(result, indent=2))
  return result


def describe(cfg, target: Target, exp, compiled, compile_seconds: float) -> dict:
  """plan.json's entries for a train step `compile_train_step` compiled."""
  mesh, abstract_state = exp.mesh, exp.abstract_state()
  program = program_bytes(compiled.memory_analysis())
  details = collectives(compiled.as_text())
  hbm = target.hbm_bytes_per_chip
  tokens = cfg.train.global_batch_size * cfg.data.seq_len
  trainable = int(sum(x.size for x in jax.tree.leaves(exp.abstract_params)))
  lora_base = quant.count_weights(exp.frozen_shapes.get("base", {}))  # a QLoRA base counts weights, not scales
  result = {
    "devices": target.chips,
    "mesh": dict(mesh.shape),
    # The model's parameters: those the run trains (and the optimizer state holds), plus a LoRA run's frozen base.
    "params": trainable + lora_base,
    "trainable_params": trainable,
    # Every weight a device holds: the trained ones and every frozen tree the steps read (a LoRA base, ...).
    "params_bytes_per_device": bytes_per_device(exp.abstract_params, exp.shardings.params)
    + bytes_per_device(exp.frozen_shapes, exp.frozen_sharding),
    "opt_state_bytes_per_device": bytes_per_device(abstract_state.opt_state, exp.shardings.opt_state),
    "temp_bytes_per_device": program["temp_bytes"],
    # The model's FLOPs (docs/performance.md), all devices together. XLA's cost analysis is no substitute: it counts
    # the body of the layer scan once, not once per layer.
    "flops_per_step": float(flops_per_token(exp.model_cfg, cfg.data.seq_len) * tokens),
    # Per collective op: executions per step, layer loops' trips included (parallel/hlo.py; docs/parallelism.md);
    # `collective_details` adds the bytes each moves per device and step, and where they sit (loops, branches).
    "collectives": {op: stats["count"] for op, stats in details.items()},
    "collective_details": details,
    # The kernel each device runs: what `model.attention=auto` stands for on the target's platform and this sequence
    # length (with mesh.context > 1, parallel/context.py: resolve).
    "attention": context.resolve(
      cfg.model.attention,
      target.platform,
      cfg.data.seq_len,
      exp.model_cfg.dtype,
      mesh.shape["context"],
      cfg.model.context_parallel,
    ),
    "target": {
      **target.describe(),
      **program,
      "fits": None if hbm is None else program["total_bytes"] <= hbm,
      "compile_seconds": round(compile_seconds, 1),
    },
  }
  if target.platform == "cpu":
    result["target"]["note"] = CPU_NOTE
    _log.info(CPU_NOTE)
  if exp.pipeline is not None:  # mesh.stage > 1: schedule, stages, microbatches, repeats, bubble, activations
    result["pipeline"] = exp.pipeline
  return result
