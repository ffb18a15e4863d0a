"""`--dry_run`: compile the train step ahead of time from abstract arrays and report the per-device plan."""

import json

import jax

from model.attend import resolve
from parallel.hlo import collectives
from parallel.mesh import make_mesh
from parallel.partition import bytes_per_device
from storage import as_path
from trainer.experiment import build
from trainer.metrics import flops_per_token


def plan(cfg, workdir: str | None = None) -> dict:
  """Builds the mesh and compiles the train step without allocating the model; the tokenizer is not needed:
  the plan uses `config.data.vocab_size`."""
  mesh = make_mesh(cfg.mesh)
  exp = build(cfg, cfg.data.vocab_size, mesh)
  abstract_state = exp.abstract_state()
  compiled = exp.train_step.lower(abstract_state, exp.abstract_batch(), exp.abstract_frozen()).compile()
  memory = compiled.memory_analysis()
  tokens = cfg.train.global_batch_size * cfg.data.seq_len
  trainable = int(sum(x.size for x in jax.tree.leaves(exp.abstract_params)))
  lora_base = int(sum(x.size for x in jax.tree.leaves(exp.frozen_shapes.get("base", {}))))
  result = {
    "devices": jax.device_count(),
    "mesh": dict(mesh.shape),
    # The model's parameters: those the run trains (and the optimizer state holds), plus a LoRA run's frozen base.
    "params": trainable + lora_base,
    "trainable_params": trainable,
    # Every weight a device holds: the trained ones and every frozen tree the steps read (a LoRA base, ...).
    "params_bytes_per_device": bytes_per_device(exp.abstract_params, exp.shardings.params)
    + bytes_per_device(exp.frozen_shapes, exp.frozen_sharding),
    "opt_state_bytes_per_device": bytes_per_device(abstract_state.opt_state, exp.shardings.opt_state),
    "temp_bytes_per_device": int(getattr(memory, "temp_size_in_bytes", 0)),
    # The model's FLOPs (docs/performance.md), all devices together. XLA's cost analysis is no substitute: it counts
    # the body of the layer scan once, not once per layer.
    "flops_per_step": float(flops_per_token(exp.model_cfg, cfg.data.seq_len) * tokens),
    # Per collective op: executions per step (layer loops' trips included) and bytes moved per device
    # (parallel/hlo.py; docs/parallelism.md).
    "collectives": collectives(compiled.as_text()),
    # What `model.attention=auto` stands for on this backend and sequence length.
    "attention": resolve(cfg.model.attention, jax.default_backend(), cfg.data.seq_len, exp.model_cfg.dtype),
  }
  if exp.pipeline is not None:  # mesh.stage > 1: schedule, stages, microbatches, repeats, bubble, activations
    result["pipeline"] = exp.pipeline
  if workdir is not None and jax.process_index() == 0:
    run = as_path(workdir)
    run.mkdir(parents=True, exist_ok=True)
    (run / "plan.json").write_text(json.dumps(result, indent=2))
  return result
