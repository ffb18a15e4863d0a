"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

Pure functions of fixed shapes, traced inside the jitted decode step. Ids >= the tokenizer's vocabulary size are
rows of embedding padding: they get -inf before anything else, so no setting can choose them.
"""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 is greedy (argmax); top_k 0 and top_p 1 turn those filters off."""

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0


def mask_padding(logits_BxV: jax.Array, vocab_size: int) -> jax.Array:
  """-inf on ids >= vocab_size (the embedding's padding rows)."""
  valid_V = jnp.arange(logits_BxV.shape[-1]) < vocab_size
  return jnp.where(valid_V, logits_BxV, -jnp.inf)


def allowed(logits_BxV: jax.Array, top_k: int, top_p: float) -> jax.Array:
  """[B, V] True on the ids sampling may pick: the `top_k` largest logits (0: all), and among those the smallest
  prefix, by descending probability, whose probabilities (renormalised over the top k) sum to at least `top_p`.
  Ties are broken by id, so both sets have exactly the sizes their definitions give."""
  v = logits_BxV.shape[-1]
  order_BxV = jnp.argsort(-logits_BxV, axis=-1, stable=True)  # rank r -> id
  rank_BxV = jnp.argsort(order_BxV, axis=-1)  # id -> rank
  keep_BxV = jnp.broadcast_to(jnp.arange(v) < (top_k if top_k > 0 else v), logits_BxV.shape)
  if top_p < 1.0:
    sorted_BxV = jnp.take_along_axis(logits_BxV, order_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(jnp.where(keep_BxV, sorted_BxV, -jnp.inf), axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the ids ranked above
    keep_BxV = keep_BxV & (before_BxV < top_p)
  return jnp.take_along_axis(keep_BxV, rank_BxV, axis=-1) & (logits_BxV > -jnp.inf)


def sample(key: jax.Array, logits_BxV: jax.Array, sampling: Sampling, vocab_size: int) -> jax.Array:
  """The next token of every row, int32 [B]."""
  logits_BxV = mask_padding(logits_BxV.astype(jnp.float32), vocab_size)
  if sampling.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = logits_BxV / sampling.temperature
  if sampling.top_k > 0 or sampling.top_p < 1.0:
    logits_BxV = jnp.where(allowed(logits_BxV, sampling.top_k, sampling.top_p), logits_BxV, -jnp.inf)
  return jax.random.categorical(key, logits_BxV, axis=-1).astype(jnp.int32)
