"""Everything the loop, the dry run and the tests need, built from a config and a mesh, before any data."""

import dataclasses
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

import objectives
from model import ModelConfig, lora, quant
from model.params import abstract_model, init_params
from objectives import LossFn, TrainedModel
from objectives.frozen import frozen_loader
from objectives.losses import next_token_loss
from parallel import pipeline
from parallel.partition import BATCH_AXES, StateShardings, param_specs, state_shardings, with_shardings
from parallel.pipeline import Pipelined
from parallel.rules import freeze, logical_to_spec, parse_rules, stage_head_rules, stage_rules, traced_under
from parallel.target import mesh_platform
from settings import ConfigError
from settings.validate import validate_layout
from storage.checkpoint import load_params
from storage.run import model_config
from trainer.optim import make_optimizer
from trainer.state import TrainState, init_trainable, new_state
from trainer.step import make_eval_step, make_train_step

_log = logging.getLogger(__name__)

BATCH_FIELDS = {
  "inputs": jnp.int32,
  "targets": jnp.int32,
  "segment_ids": jnp.int32,
  "positions": jnp.int32,
  "loss_mask": jnp.float32,
}


@dataclasses.dataclass
class Experiment:
  cfg: object
  mesh: Mesh
  model_cfg: ModelConfig
  graphdef: object
  abstract_params: dict
  logical_names: dict
  shardings: StateShardings
  state_sharding: TrainState  # TrainState of shardings
  batch_sharding: NamedSharding
  train_step: object  # jitted (state, batch, frozen) -> (state, metrics); donates state
  eval_step: object  # jitted (params, batch, frozen) -> (nll_sum, tokens)
  init_state: object  # jitted () -> TrainState, created in its shardings
  pipeline: dict | None = None  # with mesh.stage > 1: the plan's `pipeline` entry (schedule, S, M, R, ...)
  # The steps' `frozen` input (step.LossFn), by name: trees of ShapeDtypeStructs, of shardings, and a loader
  # () -> the tree of arrays in those shardings (a checkpoint read, or an init), called once per run.
  frozen_shapes: dict = dataclasses.field(default_factory=dict)
  frozen_sharding: dict = dataclasses.field(default_factory=dict)
  frozen_loaders: dict[str, Callable[[], dict]] = dataclasses.field(default_factory=dict)
  rules: dict = dataclasses.field(default_factory=dict)  # logical axis -> mesh axes, as the step lays arrays out

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings: for ahead-of-time compilation and for restoring checkpoints."""
    return with_shardings(jax.eval_shape(self.init_state), self.state_sharding)

  def abstract_frozen(self) -> dict:
    """The `frozen` input as ShapeDtypeStructs with shardings, for ahead-of-time compilation."""
    return with_shardings(self.frozen_shapes, self.frozen_sharding)

  def load_frozen(self) -> dict:
    """The `frozen` input of every step, loaded once at start ({} when the objective reads no frozen model)."""
    return {name: load() for name, load in self.frozen_loaders.items()}

  def abstract_batch(self) -> dict:
    """The train step's batch as ShapeDtypeStructs: BATCH_FIELDS and the fields the objective adds."""
    shape = (self.cfg.train.global_batch_size, self.cfg.data.seq_len)
    fields = {**BATCH_FIELDS, **objectives.get(self.cfg.train.objective).batch_fields(self.cfg)}
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=self.batch_sharding) for k, dt in fields.items()}


def _objective(cfg, model: TrainedModel, params_sharding, mesh: Mesh, rules):
  """train.objective's loss_fn and count_fn, and its frozen models' shapes, shardings (by the same rules as the
  trained model) and loaders."""
  seed = cfg.train.seed
  setup = objectives.get(cfg.train.objective).setup(model)
  initial_params = jax.jit(lambda: init_params(model.model_cfg, seed), out_shardings=params_sharding)
  shapes, shardings, loaders = {}, {}, {}
  for name, frozen in setup.frozen.items():
    specs = param_specs(frozen.abstract_params, frozen.logical_names, rules, mesh, where=f"{name} parameter")
    shapes[name] = frozen.abstract_params
    shardings[name] = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    loaders[name] = frozen_loader(name, frozen, with_shardings(shapes[name], shardings[name]), initial_params)
  return setup.loss_fn, setup.count_fn, shapes, shardings, loaders


def _pipelined(schedule, mesh: Mesh, model_cfg: ModelConfig, rules: dict) -> Pipelined | None:
  """What the step needs to run a pipelined stack (None without stages): the head inside the stages has its own
  rules."""
  if schedule is None:
    return None
  head_cfg = dataclasses.replace(model_cfg, rules=freeze(stage_head_rules(rules)))
  return Pipelined(schedule, mesh, model_cfg, head_graphdef=abstract_model(head_cfg)[0])


def _check_pipelinable(cfg, schedule, loss_fn, frozen_loaders) -> None:
  """A pipeline runs the next-token loss (`loss_fn` None) of the trained model alone; what else an objective
  computes is known once its setup has run, so this is the one check of a run's config made here."""
  if schedule is not None and (loss_fn is not None or frozen_loaders):
    raise ConfigError(
      f"config.train.objective={cfg.train.objective} computes its own loss or reads frozen models, and pipeline "
      "parallelism (mesh.stage > 1) trains the next-token loss only; set mesh.stage=1"
    )


def build(cfg, tokenizer_vocab_size: int, mesh: Mesh) -> Experiment:
  """The experiment of `cfg` on `mesh`. Objectives that read frozen models (LoRA's base, DPO's reference, a
  distillation teacher) add a `loss_fn` and entries to `frozen_sharding` / `frozen_loaders` here."""
  rules = stage_rules(parse_rules(cfg.mesh.rules), mesh.shape["stage"])
  # The target is the mesh's devices (live ones, or a TPU slice's descriptions for a compile-only plan): their
  # platform decides every per-platform choice of the program.
  platform = mesh_platform(mesh)
  validate_layout(cfg, dict(mesh.shape), rules, jax.process_count(), platform)
  batch_spec = logical_to_spec(BATCH_AXES, rules, mesh)
  model_cfg = model_config(
    cfg, tokenizer_vocab_size, tensor=mesh.shape["tensor"], with_lora=True, rules=rules, platform=platform
  )
  stage_schedule, pipeline_plan = pipeline.plan_entry(cfg, dict(mesh.shape), batch_spec, model_cfg)
  graphdef, full_params, full_names = abstract_model(model_cfg)
  # LoRA: the state (and so the optimizer and the checkpoints) holds the adapters only; the base is frozen.
  (abstract_params, logical_names), lora_frozen_base = lora_split(model_cfg, full_params, full_names)
  optimizer, schedule = make_optimizer(cfg.optim, cfg.train.steps, logical_names)
  shardings = state_shardings(abstract_params, logical_names, optimizer, rules, mesh, cfg.optim.zero_stage)
  replicated = shardings.replicated
  state_sharding = TrainState(step=replicated, params=shardings.params, opt_state=shardings.opt_state, rng=replicated)
  batch_sharding = NamedSharding(mesh, batch_spec)

  # What the steps compute and which frozen trees they read.
  trained = TrainedModel(cfg, model_cfg, graphdef, full_params, full_names, tokenizer_vocab_size, mesh.shape["tensor"])
  loss_fn, count_fn, frozen_shapes, frozen_sharding, frozen_loaders = _objective(
    cfg, trained, shardings.params, mesh, rules
  )
  if lora_frozen_base is not None:  # LoRA: the objective's loss of the adapters merged with the frozen base
    loss_fn, frozen_shapes["base"], frozen_sharding["base"], frozen_loaders["base"] = lora_frozen(
      cfg, model_cfg, graphdef, lora_frozen_base, rules, mesh, loss_fn
    )
  _check_pipelinable(cfg, stage_schedule, loss_fn, frozen_loaders)

  aux_weights = {}
  if cfg.moe.num_experts > 0:
    aux_weights = {"moe_aux_loss": cfg.moe.aux_loss_weight, "moe_z_loss": cfg.moe.z_loss_weight}
  step_fn = make_train_step(
    graphdef,
    optimizer,
    schedule,
    grad_accum=cfg.train.grad_accum,
    z_loss_weight=cfg.train.z_loss_weight,
    dropout=cfg.model.dropout_rate > 0 or model_cfg.lora_dropout > 0,
    rules=rules,
    aux_loss_weights=aux_weights,
    grad_shardings=shardings.grads,
    pipelined=_pipelined(stage_schedule, mesh, model_cfg, rules),
    loss_fn=loss_fn or next_token_loss(graphdef),
    count_fn=count_fn,
    keep_sparsity=cfg.train.keep_sparsity,
  )
  train_step = jax.jit(
    traced_under(mesh, step_fn),
    in_shardings=(state_sharding, batch_sharding, frozen_sharding),
    out_shardings=(state_sharding, replicated),
    donate_argnums=0,
  )
  eval_step = jax.jit(
    traced_under(mesh, make_eval_step(loss_fn or next_token_loss(graphdef))),
    in_shardings=(shardings.params, batch_sharding, frozen_sharding),
    out_shardings=replicated,
  )
  seed = cfg.train.seed
  init_state = jax.jit(
    lambda: new_state(init_trainable(model_cfg, seed), optimizer, seed), out_shardings=state_sharding
  )
  return Experiment(
    cfg=cfg,
    mesh=mesh,
    model_cfg=model_cfg,
    graphdef=graphdef,
    abstract_params=abstract_params,
    logical_names=logical_names,
    shardings=shardings,
    state_sharding=state_sharding,
    batch_sharding=batch_sharding,
    train_step=train_step,
    eval_step=eval_step,
    init_state=init_state,
    pipeline=pipeline_plan,
    frozen_shapes=frozen_shapes,
    frozen_sharding=frozen_sharding,
    frozen_loaders=frozen_loaders,
    rules=rules,
  )


# LoRA (config.lora.rank > 0): the adapters are the train state's parameters, the rest of the model is the frozen
# base, an input of every step that is neither trained nor checkpointed.


def lora_split(model_cfg: ModelConfig, abstract_params: dict, logical_names: dict):
  """((trainable params, their logical names), (frozen base, its logical names) or None), as abstract trees.

  Without LoRA everything is trainable and there is no base. With it the trainable part is the adapters.
  """
  if model_cfg.lora_rank == 0:
    return (abstract_params, logical_names), None
  adapters, base = lora.split(abstract_params)
  adapter_names, base_names = lora.split(logical_names)
  count = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
  _log.info(
    "LoRA rank %d (alpha %g) on %s: %d trainable adapter parameters, %d frozen in the base",
    model_cfg.lora_rank, model_cfg.lora_alpha, ",".join(model_cfg.lora_targets), count(adapters), count(base),
  )  # fmt: skip
  return (adapters, adapter_names), (base, base_names)


def lora_base(init_from: str, model_cfg: ModelConfig, seed: int, abstract_base: dict) -> dict:
  """The frozen base of a LoRA run in the shardings of `abstract_base` (ShapeDtypeStructs with shardings): the
  parameters of `init_from` (config.checkpoint.init_from), else the random init of `seed`, exactly the one a
  model without adapters gets, so a resumed or exported run rebuilds the same base."""
  if init_from:
    base, _ = load_params(init_from, abstract_base)
    _log.info("LoRA: the frozen base is %s", init_from)
    return base
  _log.warning("LoRA without config.checkpoint.init_from: the frozen base is the random init of train.seed=%d", seed)
  shardings = jax.tree.map(lambda s: s.sharding, abstract_base)
  return jax.jit(lambda: lora.split(init_params(model_cfg, seed))[1], out_shardings=shardings)()


def lora_frozen(
  cfg, model_cfg: ModelConfig, graphdef, frozen_base: tuple[dict, dict], rules, mesh: Mesh, loss_fn: LossFn | None
):
  """(loss_fn, base shapes, base shardings, base loader) of a LoRA run: the objective's `loss_fn` (None: the
  next-token loss) of the model made of the trained adapters and the frozen base, which is sharded by the same
  rules as a full model's parameters (fsdp, tensor) and loaded once per run (`lora_base`)."""
  base_shapes, base_names = frozen_base
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(base_shapes, base_names, rules, mesh))
  abstract = with_shardings(base_shapes, shardings)
  objective = loss_fn or next_token_loss(graphdef)

  def lora_loss_fn(params, frozen, batch, dropout_key):
    return objective(lora.combine(params, frozen["base"]), frozen, batch, dropout_key)

  load = lambda: lora_base(cfg.checkpoint.init_from, model_cfg, cfg.train.seed, abstract)  # noqa: E731
  if cfg.lora.base_quant:  # QLoRA: the base is held quantized (model/quant.py), in the shardings of its kernels
    mode, group = cfg.lora.base_quant, cfg.lora.base_group_size
    quantize = lambda base: quant.quantize_params(base, mode, group)  # noqa: E731
    try:
      base_shapes = jax.eval_shape(quantize, base_shapes)
    except ValueError as e:
      raise ConfigError(f"config.lora.base_quant={mode}: {e} (config.lora.base_group_size)") from None
    shardings = quant.shardings_of(base_shapes, shardings)
    full_load = load
    # Loaded in full precision, then quantized into place; the full-precision copy is donated and freed.
    load = lambda: jax.jit(quantize, out_shardings=shardings, donate_argnums=0)(full_load())  # noqa: E731
  return lora_loss_fn, base_shapes, shardings, load
