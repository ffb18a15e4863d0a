"""The pure train and eval steps: (state, batch) -> (state, metrics), jitted once by the loop."""

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax

from model.sparsity import keep_zeros
from objectives import LossFn
from objectives.losses import SUM_PREFIX, next_token_loss, token_count
from parallel import context
from parallel.partition import microbatches
from parallel.pipeline import Pipelined, pipeline_grads
from trainer.state import TrainState


def make_train_step(
  graphdef,
  optimizer,
  schedule,
  *,
  grad_accum: int,
  z_loss_weight: float,
  dropout: bool,
  rules,
  aux_loss_weights: dict[str, float] | None = None,
  grad_shardings=None,
  pipelined: Pipelined | None = None,
  loss_fn: LossFn | None = None,
  count_fn: Callable[[dict], jax.Array] = token_count,
  keep_sparsity: bool = False,
):
  """Builds `train_step(state, batch, frozen) -> (state, metrics)`; `loss_fn` defaults to the next-token loss.

  `count_fn(batch)` is what the loss sums of the whole batch are divided by: its target tokens, or its pairs for
  DPO (objectives/dpo.py). Aux entries named "sum:<metric>" are sums reported as <metric> over the same
  count; the other aux entries are averaged over microbatches. `keep_sparsity` (train.keep_sparsity): every
  projection weight that is zero before the update is zero after it (model/sparsity.py).

  The objective of a batch is (sum of token losses + z_loss_weight * sum log(Z)^2) / target tokens, plus the
  weighted auxiliary losses (MoE) averaged over microbatches; microbatches add gradients of their share, so
  grad_accum=n is the same update as the whole batch at once. With `pipelined`, each of the grad_accum
  microbatches is split again into the schedule's M microbatches, which the pipeline runs (`pipeline_grads`).
  """
  aux_loss_weights = aux_loss_weights or {}
  loss_fn = loss_fn or next_token_loss(graphdef)

  def train_step(state: TrainState, batch: dict, frozen: dict) -> tuple[TrainState, dict]:
    batch = context.balance(batch, context.size())  # mesh.context > 1: each device gets an early and a late chunk
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
        pipeline_grads,
        graphdef,
        pipelined,
        total_tokens=total_tokens,
        z_loss_weight=z_loss_weight,
        aux_loss_weights=aux_loss_weights,
        microbatches_per_step=grad_accum * pipelined.schedule.microbatches,
        dropout=dropout,
      )
    micro = microbatches(batch, grad_accum, rules)
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
    if keep_sparsity:
      params = keep_zeros(state.params, params)
    metrics = {**_step_metrics(stats, total_tokens, grad_accum), "grad_norm": optax.global_norm(grads)}
    metrics["lr"] = schedule(state.step)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def _step_metrics(stats_M: dict, total_tokens, grad_accum: int) -> dict:
  """The step's metrics from the per-microbatch statistics [M, ...]: sums ("nll_sum", "z_sum", "sum:<name>") per
  count, the rest (MoE's) averaged over microbatches."""
  # Sum over microbatches only: per-layer stats such as the MoE expert load [layers, experts] keep their shape.
  stats = jax.tree.map(lambda s: jnp.sum(s, axis=0), stats_M)
  sums = {
    name[len(SUM_PREFIX) :]: stats.pop(name) / total_tokens for name in list(stats) if name.startswith(SUM_PREFIX)
  }
  return {
    "loss": stats.pop("nll_sum") / total_tokens,
    "z_loss": stats.pop("z_sum") / total_tokens,
    "tokens": total_tokens,
    **{name: value / grad_accum for name, value in stats.items()},
    **sums,
  }


def make_eval_step(loss_fn: LossFn):
  """`eval_step(params, batch, frozen) -> (sum of token losses, target tokens)`; the loop sums over eval batches."""

  def eval_step(params, batch, frozen):
    batch = context.balance(batch, context.size())
    (nll_sum, _, tokens), _ = loss_fn(params, frozen, batch, None)
    return nll_sum, tokens

  return eval_step
