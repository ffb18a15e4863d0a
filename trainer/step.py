"""The pure train and eval steps: (state, batch) -> (state, metrics), jitted once by the loop."""

import jax
import jax.numpy as jnp
import optax

from sharding.rules import constrain
from trainer.state import TrainState, apply_loss

BATCH_AXES = ("batch", "length")


def _microbatches(batch: dict, n: int) -> dict:
  """[B, L] -> [n, B/n, L], microbatch m = rows m, m+n, ...: every data shard holds part of every microbatch."""

  def split(x):
    b = x.shape[0]
    x = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, *BATCH_AXES))

  return jax.tree.map(split, batch)


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
):
  """Builds `train_step(state, batch) -> (state, metrics)`.

  The objective of a batch is (sum of token losses + z_loss_weight * sum log(Z)^2) / target tokens, plus the
  weighted auxiliary losses (MoE) averaged over microbatches; microbatches add gradients of their share, so
  grad_accum=n is the same update as the whole batch at once.
  """
  aux_loss_weights = aux_loss_weights or {}

  def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
    total_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
    step_key = jax.random.fold_in(state.rng, state.step)

    def objective(params, micro, key):
      (nll_sum, z_sum, _), aux = apply_loss(graphdef, params, micro, dropout_key=key if dropout else None)
      value = (nll_sum + z_loss_weight * z_sum) / total_tokens
      value += sum(w * aux[name] for name, w in aux_loss_weights.items()) / grad_accum
      return value, {"nll_sum": nll_sum, "z_sum": z_sum, **aux}

    grad_fn = jax.grad(objective, has_aux=True)
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
    metrics = {
      "loss": stats.pop("nll_sum") / total_tokens,
      "z_loss": stats.pop("z_sum") / total_tokens,
      "grad_norm": optax.global_norm(grads),
      "lr": schedule(state.step),
      "tokens": total_tokens,
      **{name: value / grad_accum for name, value in stats.items()},
    }
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

  return train_step


def make_eval_step(graphdef):
  """`eval_step(params, batch) -> (sum of token losses, target tokens)`; the loop sums over eval batches."""

  def eval_step(params, batch):
    (nll_sum, _, tokens), _ = apply_loss(graphdef, params, batch)
    return nll_sum, tokens

  return eval_step
