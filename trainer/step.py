"""The pure train and eval steps: (state, batch) -> (state, metrics), jitted once by the loop."""

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh

from model import ModelConfig, cross_entropy_sums
from model.loss import chunked_cross_entropy_sums
from model.transformer import apply_units, num_units
from objectives import SUM_PREFIX, token_count
from parallel import pipeline
from parallel.rules import constrain
from trainer.state import TrainState, apply_loss

BATCH_AXES = ("batch", "length")

# loss_fn(params, frozen, batch, dropout_key) -> ((nll_sum, z_sum, target tokens), aux): what the train and eval
# steps differentiate and report. `params` are the trained parameters (TrainState.params); `frozen` is a dict of
# parameter trees the step reads but never trains (a LoRA base, a DPO reference, a distillation teacher): they
# are inputs of every step, not in the optimizer and not checkpointed. Empty for plain pre-training.
LossFn = Callable[[dict, dict, dict, jax.Array | None], tuple[tuple[jax.Array, jax.Array, jax.Array], dict]]


def default_loss_fn(graphdef) -> LossFn:
  """Next-token cross-entropy of the model `graphdef` with parameters `params`; `frozen` is unused."""

  def loss_fn(params, frozen, batch, dropout_key):
    del frozen
    return apply_loss(graphdef, params, batch, dropout_key=dropout_key)

  return loss_fn


def _microbatches(batch: dict, n: int, extra: tuple[str, ...] = ()) -> dict:
  """[B, L, ...] -> [n, B/n, L, ...], microbatch m = rows m, m+n, ...: every data shard holds part of every
  microbatch. `extra`: logical names of the dimensions after L."""

  def split(x):
    b = x.shape[0]
    x = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, *BATCH_AXES, *extra))

  return jax.tree.map(split, batch)


@dataclasses.dataclass(frozen=True)
class Pipelined:
  """What the train step needs to run the layer stack as a pipeline over the mesh's `stage` axis."""

  schedule: pipeline.Schedule
  mesh: Mesh
  model_cfg: ModelConfig


def make_train_step(
  graphdef,
  optimizer,
  schedule,
  *,
  grad_accum: int,
  z_loss_weight: float,
  dropout: bool,
  aux_loss_weights: dict[str, float] | None = None,
  grad_shardings=None,
  pipelined: Pipelined | None = None,
  loss_fn: LossFn | None = None,
  count_fn: Callable[[dict], jax.Array] = token_count,
):
  """Builds `train_step(state, batch, frozen) -> (state, metrics)`; `loss_fn` defaults to `default_loss_fn`.

  `count_fn(batch)` is what the loss sums of the whole batch are divided by: its target tokens, or its pairs for
  DPO (trainer/objectives.py). Aux entries named "sum:<metric>" are sums reported as <metric> over the same
  count; the other aux entries are averaged over microbatches.

  The objective of a batch is (sum of token losses + z_loss_weight * sum log(Z)^2) / target tokens, plus the
  weighted auxiliary losses (MoE) averaged over microbatches; microbatches add gradients of their share, so
  grad_accum=n is the same update as the whole batch at once. With `pipelined`, each of the grad_accum
  microbatches is split again into the schedule's M microbatches, which the pipeline runs (`_pipeline_grads`).
  """
  aux_loss_weights = aux_loss_weights or {}
  loss_fn = loss_fn or default_loss_fn(graphdef)

  def train_step(state: TrainState, batch: dict, frozen: dict) -> tuple[TrainState, dict]:
    total_tokens = jnp.maximum(count_fn(batch), 1.0)
    step_key = jax.random.fold_in(state.rng, state.step)

    def objective(params, micro, key):
      (nll_sum, z_sum, _), aux = loss_fn(params, frozen, micro, key if dropout else None)
      value = (nll_sum + z_loss_weight * z_sum) / total_tokens
      value += sum(w * aux[name] for name, w in aux_loss_weights.items()) / grad_accum
      return value, {"nll_sum": nll_sum, "z_sum": z_sum, **aux}

    grad_fn = jax.grad(objective, has_aux=True)
    if pipelined is not None:  # the next-token loss of the stack split over stages; experiment.build checks
      grad_fn = functools.partial(
        _pipeline_grads,
        graphdef,
        pipelined,
        total_tokens=total_tokens,
        z_loss_weight=z_loss_weight,
        aux_loss_weights=aux_loss_weights,
        microbatches_per_step=grad_accum * pipelined.schedule.microbatches,
        dropout=dropout,
      )
    micro = _microbatches(batch, grad_accum)
    keys = jax.random.split(step_key, grad_accum)

    def accumulate(grads, xs):
      micro_batch, key = xs
      g, stats = grad_fn(state.params, micro_batch, key)
      grads = jax.tree.map(jnp.add, grads, g)
      if grad_shardings is not None:  # ZeRO-2: each microbatch's gradients are reduce-scattered into the sum
        grads = jax.lax.with_sharding_constraint(grads, grad_shardings)
      return grads, stats

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    grads, stats = jax.lax.scan(accumulate, zeros, (micro, keys))
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # Sum over microbatches only: per-layer stats such as the MoE expert load [layers, experts] keep their shape.
    stats = jax.tree.map(lambda s: jnp.sum(s, axis=0), stats)
    sums = {
      name[len(SUM_PREFIX) :]: stats.pop(name) / total_tokens for name in list(stats) if name.startswith(SUM_PREFIX)
    }
    metrics = {
      "loss": stats.pop("nll_sum") / total_tokens,
      "z_loss": stats.pop("z_sum") / total_tokens,
      "grad_norm": optax.global_norm(grads),
      "lr": schedule(state.step),
      "tokens": total_tokens,
      **{name: value / grad_accum for name, value in stats.items()},
      **sums,
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def _pipeline_grads(
  graphdef,
  pipelined: Pipelined,
  params: dict,
  batch: dict,
  key,
  *,
  total_tokens,
  z_loss_weight: float,
  aux_loss_weights: dict[str, float],
  microbatches_per_step: int,
  dropout: bool,
):
  """Gradients and statistics of one accumulation microbatch, like `jax.grad(objective)`, through the pipeline.

  The embedding runs before the pipeline and the final norm, LM head and loss inside it on the last stage;
  both are replicated over `stage` (their weights are small next to the stack's, and the tied embedding
  then needs no transfer between the first and last stage): the embedding's gradient is one `jax.vjp`
  around the pipeline, fed the gradient of the first chunk's input.
  """
  cfg, sched = pipelined.model_cfg, pipelined.schedule
  stages, repeats, m_count = sched.stages, sched.repeats, sched.microbatches
  units = num_units(cfg)
  rest = {name: value for name, value in params.items() if name != "blocks"}
  side = _microbatches({k: batch[k] for k in ("positions", "segment_ids", "targets", "loss_mask")}, m_count)

  def assemble(rest, blocks):
    return nnx.merge(graphdef, nnx.State({**rest, "blocks": blocks}))

  embed_key, unit_keys_MxX = None, None
  if dropout:
    embed_key, layers_key = jax.random.split(key)
    unit_keys_MxX = jax.random.split(layers_key, (m_count, units))
    unit_keys_MxX = jax.vmap(lambda k: pipeline.to_stage_major(k, stages, repeats))(unit_keys_MxX)

  def embed(rest):
    x_BxLxD = assemble(rest, params["blocks"]).embed(batch["inputs"], batch["positions"], embed_key)
    return _microbatches({"x": x_BxLxD}, m_count, extra=("embed",))["x"]

  x_MxBxLxD, embed_pullback = jax.vjp(embed, rest)

  def chunk_fn(blocks, rest, x_BxLxD, side, keys):
    model = assemble(rest, blocks)
    y_BxLxD, aux_C = apply_units(cfg, model.blocks, x_BxLxD, side["positions"], side["segment_ids"], keys)
    # Each MoE layer's share of the step's auxiliary loss: stage=1 averages over layers and microbatches.
    loss = sum((w * jnp.sum(aux_C[name]) for name, w in aux_loss_weights.items()), jnp.zeros((), jnp.float32))
    return y_BxLxD, loss / (units * microbatches_per_step), aux_C

  def head_fn(blocks, rest, y_BxLxD, side):
    model = assemble(rest, blocks)
    x_BxLxD, targets, mask = model.final_norm(y_BxLxD), side["targets"], side["loss_mask"]
    if cfg.loss_chunk > 0:  # as Transformer.loss_sums: logits only loss_chunk positions at a time
      nll_sum, z_sum, _ = chunked_cross_entropy_sums(x_BxLxD, model.logits, targets, mask, chunk=cfg.loss_chunk)
    else:
      nll_sum, z_sum, _ = cross_entropy_sums(model.logits(x_BxLxD), targets, mask)
    return (nll_sum + z_loss_weight * z_sum) / total_tokens, {"nll_sum": nll_sum, "z_sum": z_sum}

  chunks = pipeline.to_stage_major(params["blocks"], stages, repeats)
  d_chunks, d_head, dx_MxBxLxD, unit_stats, head_stats = pipeline.run(
    sched, pipelined.mesh, chunk_fn, head_fn, chunks, rest, x_MxBxLxD, side, unit_keys_MxX
  )
  (d_embed,) = embed_pullback(dx_MxBxLxD)
  grads = {**jax.tree.map(jnp.add, d_head, d_embed), "blocks": pipeline.from_stage_major(d_chunks, stages, repeats)}
  unit_stats = pipeline.from_stage_major(unit_stats, stages, repeats)
  # As the stage=1 objective reports them for this accumulation microbatch: MoE scalars averaged over layers,
  # per-layer arrays kept, both averaged over the pipeline's microbatches.
  stats = {name: (v.mean(0) if v.ndim == 1 else v) / m_count for name, v in unit_stats.items()}
  return grads, {**head_stats, **stats}


def make_eval_step(loss_fn: LossFn):
  """`eval_step(params, batch, frozen) -> (sum of token losses, target tokens)`; the loop sums over eval batches."""

  def eval_step(params, batch, frozen):
    (nll_sum, _, tokens), _ = loss_fn(params, frozen, batch, None)
    return nll_sum, tokens

  return eval_step
