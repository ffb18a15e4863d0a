"""The training objectives of `config.train.objective`, as loss functions of the one train step (step.py).

A loss function maps (params, frozen, batch, dropout_key) to ((loss_sum, z_sum, count), aux): sums, so
microbatches and shards combine exactly, and the step divides by the count of the whole batch (`count_fn`).
  lm, sft   next-token cross-entropy over the loss mask (sft data weighs only assistant tokens); count: tokens
  dpo       -log sigmoid(beta * ((pc - rc) - (pr - rr))) per pair (data/preference.py rows: segment 1 chosen,
            2 rejected), p* the policy's and r* the frozen reference's summed log-probabilities of the
            response; count: pairs
  distill   alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy per target token, *_T the
            softmax at temperature T of the frozen teacher's and the student's logits; count: tokens
`frozen` holds the parameter trees that are inputs but never trained: {"reference": ...} for dpo,
{"teacher": ...} for distill. The reported `loss` is the objective itself; dpo and distill add metrics.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model import cross_entropy_sums

OBJECTIVES = ("lm", "sft", "dpo", "distill")
CHOSEN_SEGMENT, REJECTED_SEGMENT = 1, 2  # as data/preference.py lays out a pair's row
SUM_PREFIX = "sum:"  # an aux entry "sum:<metric>" is a batch sum that the step reports as <metric> per count


def _logits(graphdef, params, batch: dict, dropout_key=None):
  """fp32 logits [B, L, V] and the model's auxiliary outputs."""
  model = nnx.merge(graphdef, nnx.State(params))
  return model(batch["inputs"], batch["positions"], batch["segment_ids"], dropout_key=dropout_key)


def token_logprobs(logits_BxLxV: jax.Array, targets_BxL: jax.Array) -> jax.Array:
  """log p(target) per position, in fp32."""
  logits = logits_BxLxV.astype(jnp.float32)
  target_BxL = jnp.take_along_axis(logits, targets_BxL[..., None], axis=-1)[..., 0]
  return target_BxL - jax.nn.logsumexp(logits, axis=-1)


def pair_logprobs(logp_BxL: jax.Array, loss_mask_BxL: jax.Array, segment_ids_BxL: jax.Array):
  """(chosen [B], rejected [B]): the weighted log-probabilities summed over each side of a pair row."""
  weighted_BxL = logp_BxL * loss_mask_BxL
  chosen_B = jnp.sum(jnp.where(segment_ids_BxL == CHOSEN_SEGMENT, weighted_BxL, 0.0), axis=-1)
  rejected_B = jnp.sum(jnp.where(segment_ids_BxL == REJECTED_SEGMENT, weighted_BxL, 0.0), axis=-1)
  return chosen_B, rejected_B


def dpo_terms(policy_chosen_B, policy_rejected_B, reference_chosen_B, reference_rejected_B, beta: float) -> dict:
  """Per pair: the DPO loss, the implicit rewards beta * (policy - reference) of each side and their margin."""
  chosen_reward_B = beta * (policy_chosen_B - reference_chosen_B)
  rejected_reward_B = beta * (policy_rejected_B - reference_rejected_B)
  margin_B = chosen_reward_B - rejected_reward_B
  return {
    "loss": -jax.nn.log_sigmoid(margin_B),
    "margin": margin_B,
    "chosen_reward": chosen_reward_B,
    "rejected_reward": rejected_reward_B,
  }


def pair_count(batch: dict) -> jax.Array:
  """Rows that hold a pair (any target weight); padding rows of an eval batch count for nothing."""
  return jnp.sum(jnp.any(batch["loss_mask"] > 0, axis=-1).astype(jnp.float32))


def token_count(batch: dict) -> jax.Array:
  return jnp.sum(batch["loss_mask"])


def distill_kl_sums(student_BxLxV, teacher_BxLxV, loss_mask_BxL, temperature: float) -> jax.Array:
  """Sum over weighted targets of KL(softmax(teacher / T) || softmax(student / T))."""
  log_q = jax.nn.log_softmax(student_BxLxV.astype(jnp.float32) / temperature, axis=-1)
  log_p = jax.nn.log_softmax(teacher_BxLxV.astype(jnp.float32) / temperature, axis=-1)
  kl_BxL = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return jnp.sum(kl_BxL * loss_mask_BxL)


def make_dpo_loss(graphdef, *, beta: float) -> Callable:
  """DPO against frozen["reference"] (same model shape as the policy)."""

  def loss_fn(params, frozen, batch, dropout_key):
    logits, aux = _logits(graphdef, params, batch, dropout_key)
    reference_logits, _ = _logits(graphdef, frozen["reference"], batch)
    mask, segments = batch["loss_mask"], batch["segment_ids"]
    policy = pair_logprobs(token_logprobs(logits, batch["targets"]), mask, segments)
    reference = pair_logprobs(token_logprobs(jax.lax.stop_gradient(reference_logits), batch["targets"]), mask, segments)
    terms = dpo_terms(*policy, *reference, beta)
    valid_B = jnp.any(mask > 0, axis=-1).astype(jnp.float32)
    count = jnp.sum(valid_B)
    loss_sum = jnp.sum(terms["loss"] * valid_B)
    stats = {f"dpo_{k}": jnp.sum(v * valid_B) for k, v in terms.items() if k != "loss"}
    stats["dpo_accuracy"] = jnp.sum((terms["margin"] > 0).astype(jnp.float32) * valid_B)
    return (loss_sum, jnp.zeros((), jnp.float32), count), {**aux, **_as_sums(stats)}

  return loss_fn


def make_distill_loss(graphdef, teacher_graphdef, *, temperature: float, alpha: float, vocab_size: int) -> Callable:
  """Distillation from frozen["teacher"] (any shape, same tokenizer: logits compared over its `vocab_size`)."""

  def loss_fn(params, frozen, batch, dropout_key):
    logits, aux = _logits(graphdef, params, batch, dropout_key)
    teacher_logits, _ = _logits(teacher_graphdef, frozen["teacher"], batch)
    teacher_logits = jax.lax.stop_gradient(teacher_logits[..., :vocab_size])
    mask = batch["loss_mask"]
    nll_sum, z_sum, tokens = cross_entropy_sums(logits, batch["targets"], mask)
    kl_sum = distill_kl_sums(logits[..., :vocab_size], teacher_logits, mask, temperature)
    loss_sum = alpha * temperature**2 * kl_sum + (1.0 - alpha) * nll_sum
    return (loss_sum, z_sum, tokens), {**aux, **_as_sums({"distill_kl": kl_sum, "distill_ce": nll_sum})}

  return loss_fn


def _as_sums(stats: dict) -> dict:
  """Marks metrics that are sums over the batch: the step divides them by the batch's count, as the loss."""
  return {SUM_PREFIX + name: value for name, value in stats.items()}
