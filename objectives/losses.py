"""Pieces every objective shares: the model's forward and next-token loss as sums, log-probabilities, counts.

Sums, not means: microbatches, shards and pipeline stages combine exactly, and the step divides by the count
of the whole batch. An aux entry named "sum:<metric>" is such a sum; the step reports it as <metric> per count.
"""

import jax
import jax.numpy as jnp
from flax import nnx

from objectives import LossFn

SUM_PREFIX = "sum:"


def model_logits(graphdef, params: dict, batch: dict, dropout_key=None):
  """fp32 logits [B, L, V] of the model (`graphdef`, `params`) on a batch, and its auxiliary outputs."""
  model = nnx.merge(graphdef, nnx.State(params))
  return model(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=dropout_key)


def next_token_sums(graphdef, params: dict, batch: dict, dropout_key=None):
  """The model's next-token loss sums on a batch (`Transformer.loss_sums`): ((nll_sum, z_sum, tokens), aux)."""
  model = nnx.merge(graphdef, nnx.State(params))
  inputs = (batch[k] for k in ("inputs", "positions", "segment_ids", "targets", "loss_mask"))
  return model.loss_sums(*inputs, dropout_key=dropout_key)


def next_token_loss(graphdef) -> LossFn:
  """The LossFn of next-token cross-entropy over the loss mask; `frozen` is unused."""

  def loss_fn(params, frozen, batch, dropout_key):
    del frozen
    return next_token_sums(graphdef, params, batch, dropout_key)

  return loss_fn


def token_logprobs(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """log p(target) per position, in fp32."""
  logits = logits_BxLxV.astype(jnp.float32)
  target_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return target_BxL - jax.nn.logsumexp(logits, axis=-1)


def token_count(batch: dict) -> jax.Array:
  """Weighted target tokens: what the next-token loss sums are divided by."""
  return jnp.sum(batch["loss_mask"])


def as_sums(stats: dict) -> dict:
  """Marks metrics that are sums over the batch: the step divides them by the batch's count, as the loss."""
  return {SUM_PREFIX + name: value for name, value in stats.items()}
