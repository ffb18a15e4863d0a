"""Everything the loop, the dry run and the tests need, built from a config and a mesh, before any data."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from model import ModelConfig
from model.config import padded_vocab_size
from sharding.mesh import MeshError
from sharding.partition import StateShardings, state_shardings
from sharding.rules import activate, entry_axes, logical_to_spec, parse_rules
from trainer.config import check_backend
from trainer.optim import make_optimizer
from trainer.state import TrainState, abstract_model, init_params, new_state
from trainer.step import BATCH_AXES, make_eval_step, make_train_step

BATCH_FIELDS = {
  "inputs": jnp.int32,
  "targets": jnp.int32,
  "segment_ids": jnp.int32,
  "positions": jnp.int32,
  "loss_mask": jnp.float32,
}


def _with_rules(fn, mesh, rules):
  """Traces `fn` with the mesh and rules active, so activation constraints apply whenever jit traces."""

  @functools.wraps(fn)
  def wrapped(*args):
    with activate(mesh, rules):
      return fn(*args)

  return wrapped


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
  train_step: object  # jitted (state, batch) -> (state, metrics); donates state
  eval_step: object  # jitted (params, batch) -> (nll_sum, tokens)
  init_state: object  # jitted () -> TrainState, created in its shardings

  def abstract_state(self) -> TrainState:
    """ShapeDtypeStructs with shardings: for ahead-of-time compilation and for restoring checkpoints."""
    shapes = jax.eval_shape(self.init_state)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, self.state_sharding)

  def abstract_batch(self) -> dict:
    shape = (self.cfg.train.global_batch_size, self.cfg.data.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, dt, sharding=self.batch_sharding) for k, dt in BATCH_FIELDS.items()}


def _check_batch_divides(cfg, mesh: Mesh, batch_spec: PartitionSpec) -> None:
  axes = entry_axes(batch_spec[0])
  shards = math.prod(mesh.shape[a] for a in axes)
  micro = cfg.train.global_batch_size // cfg.train.grad_accum
  if micro % shards:
    raise MeshError(
      f"the batch of {micro} sequences per microbatch (config.train.global_batch_size="
      f"{cfg.train.global_batch_size} / grad_accum={cfg.train.grad_accum}) does not split over the "
      f"{shards} devices of mesh axes {axes}; make it a multiple of {shards}"
    )
  if cfg.train.global_batch_size % jax.process_count():
    raise MeshError(
      f"config.train.global_batch_size={cfg.train.global_batch_size} does not split over "
      f"{jax.process_count()} processes; make it a multiple of the process count"
    )


def build(cfg, tokenizer_vocab_size: int, mesh: Mesh) -> Experiment:
  check_backend(cfg, jax.default_backend())
  rules = parse_rules(cfg.mesh.rules)
  batch_spec = logical_to_spec(BATCH_AXES, rules, mesh)
  _check_batch_divides(cfg, mesh, batch_spec)
  vocab = padded_vocab_size(tokenizer_vocab_size, cfg.model.vocab_multiple, mesh.shape["tensor"])
  model_cfg = ModelConfig.from_config(cfg.model, cfg.moe, vocab_size=vocab, max_len=cfg.data.seq_len)
  graphdef, abstract_params, logical_names = abstract_model(model_cfg)
  optimizer, schedule = make_optimizer(cfg.optim, cfg.train.steps, logical_names)
  shardings = state_shardings(abstract_params, logical_names, optimizer, rules, mesh, cfg.optim.zero_stage)
  replicated = shardings.replicated
  state_sharding = TrainState(step=replicated, params=shardings.params, opt_state=shardings.opt_state, rng=replicated)
  batch_sharding = NamedSharding(mesh, batch_spec)

  aux_weights = {}
  if cfg.moe.num_experts > 0:
    aux_weights = {"moe_aux_loss": cfg.moe.aux_loss_weight, "moe_z_loss": cfg.moe.z_loss_weight}
  step_fn = make_train_step(
    graphdef,
    optimizer,
    schedule,
    grad_accum=cfg.train.grad_accum,
    z_loss_weight=cfg.train.z_loss_weight,
    dropout=cfg.model.dropout_rate > 0,
    aux_loss_weights=aux_weights,
    grad_shardings=shardings.grads,
  )
  train_step = jax.jit(
    _with_rules(step_fn, mesh, rules),
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, replicated),
    donate_argnums=0,
  )
  eval_step = jax.jit(
    _with_rules(make_eval_step(graphdef), mesh, rules),
    in_shardings=(shardings.params, batch_sharding),
    out_shardings=replicated,
  )
  seed = cfg.train.seed
  init_state = jax.jit(lambda: new_state(init_params(model_cfg, seed), optimizer, seed), out_shardings=state_sharding)
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
  )
