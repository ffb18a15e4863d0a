"""Next-token cross-entropy in fp32 with a loss mask and an optional z-loss, whole or a chunk at a time."""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def cross_entropy_sums(
  logits_BxLxV: jax.Array, targets_BxL: jax.Array, loss_mask_BxL: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Returns (sum of masked token losses, sum of masked log(Z)^2, number of target tokens).

  Sums rather than means, so microbatches of gradient accumulation and shards of a batch combine exactly:
  the loss of a batch is sum / tokens, whatever way it was split.
  """
  logits = logits_BxLxV.astype(jnp.float32)
  log_z_BxL = jax.nn.logsumexp(logits, axis=-1)
  target_logit_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  mask = loss_mask_BxL.astype(jnp.float32)
  nll_sum = jnp.sum((log_z_BxL - target_logit_BxL) * mask)
  z_sum = jnp.sum(jnp.square(log_z_BxL) * mask)
  return nll_sum, z_sum, jnp.sum(mask)


def chunked_cross_entropy_sums(
  x_BxLxD: jax.Array,
  logits_fn: Callable[[jax.Array], jax.Array],
  targets_BxL: jax.Array,
  loss_mask_BxL: jax.Array,
  *,
  chunk: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """`cross_entropy_sums(logits_fn(x_BxLxD), ...)`, computed `chunk` positions at a time.

  A scan over chunks of the sequence whose body is checkpointed: forward and backward each hold one chunk's
  fp32 logits [B, chunk, V] and their gradient, never the whole [B, L, V]; the backward recomputes each chunk's
  logits (one extra head matmul). The sequence is padded with masked positions to a multiple of `chunk`.
  """
  b, length, d = x_BxLxD.shape
  chunk = min(chunk, length)
  pad = -length % chunk

  def chunks(a_BxL___):
    a = jnp.pad(a_BxL___, [(0, 0), (0, pad)] + [(0, 0)] * (a_BxL___.ndim - 2))
    return jnp.moveaxis(a.reshape(b, (length + pad) // chunk, chunk, *a.shape[2:]), 1, 0)

  @jax.checkpoint
  def chunk_sums(x_BxCxD, targets_BxC, loss_mask_BxC):
    return cross_entropy_sums(logits_fn(x_BxCxD), targets_BxC, loss_mask_BxC)

  def body(totals, xs):
    return jax.tree.map(jnp.add, totals, chunk_sums(*xs)), None

  zeros = (jnp.zeros((), jnp.float32),) * 3
  totals, _ = jax.lax.scan(body, zeros, (chunks(x_BxLxD), chunks(targets_BxL), chunks(loss_mask_BxL)))
  return totals
