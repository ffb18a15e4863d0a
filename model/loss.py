"""Next-token cross-entropy in fp32 with a loss mask and an optional z-loss."""

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
