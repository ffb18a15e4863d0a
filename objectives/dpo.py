"""`dpo`: direct preference optimisation on preference JSONL (data/preference.py) against a frozen reference.

Per pair: -log sigmoid(beta * ((pc - rc) - (pr - rr))), p* the policy's and r* the frozen reference's summed
log-probabilities of the response (a pair's row holds the chosen side as segment 1, the rejected as 2);
count: pairs. The reference is `dpo.reference`, else `checkpoint.init_from`, else this run's initial parameters.
"""

import jax
import jax.numpy as jnp

from data.preference import load_preferences
from objectives import FrozenModel, LossFn, Objective, Setup, TrainedModel
from objectives.losses import as_sums, model_logits, token_logprobs
from objectives.sft import chat_data_problems

CHOSEN_SEGMENT, REJECTED_SEGMENT = 1, 2  # as data/preference.py lays out a pair's row


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


def make_dpo_loss(graphdef, *, beta: float) -> LossFn:
  """DPO against frozen["reference"] (same model shape as the policy)."""

  def loss_fn(params, frozen, batch, dropout_key):
    logits, aux = model_logits(graphdef, params, batch, dropout_key)
    reference_logits, _ = model_logits(graphdef, frozen["reference"], batch)
    mask, segments = batch["loss_mask"], batch["segment_ids"]
    policy = pair_logprobs(token_logprobs(logits, batch["targets"]), mask, segments)
    reference = pair_logprobs(token_logprobs(jax.lax.stop_gradient(reference_logits), batch["targets"]), mask, segments)
    terms = dpo_terms(*policy, *reference, beta)
    valid_B = jnp.any(mask > 0, axis=-1).astype(jnp.float32)
    loss_sum = jnp.sum(terms["loss"] * valid_B)
    stats = {f"dpo_{k}": jnp.sum(v * valid_B) for k, v in terms.items() if k != "loss"}
    stats["dpo_accuracy"] = jnp.sum((terms["margin"] > 0).astype(jnp.float32) * valid_B)
    return (loss_sum, jnp.zeros((), jnp.float32), jnp.sum(valid_B)), {**aux, **as_sums(stats)}

  return loss_fn


def _problems(cfg) -> list[str]:
  problems = []
  if cfg.lora.rank > 0:
    problems.append(
      f"config.lora.rank={cfg.lora.rank} with config.train.objective=dpo: the DPO reference would need the adapters "
      "switched off, which is not supported yet; use LoRA with lm, sft or distill, or set config.lora.rank=0"
    )
  if cfg.dpo.beta <= 0:
    problems.append(f"config.dpo.beta={cfg.dpo.beta} must be positive (0.1 is usual)")
  return problems + chat_data_problems(cfg)


def _setup(model: TrainedModel) -> Setup:
  cfg = model.cfg
  source = cfg.dpo.reference or cfg.checkpoint.init_from
  reference = FrozenModel(source, model.model_cfg, model.abstract_params, model.logical_names)
  return Setup(make_dpo_loss(model.graphdef, beta=cfg.dpo.beta), pair_count, {"reference": reference})


OBJECTIVE = Objective(
  name="dpo",
  setup=_setup,
  load_documents=load_preferences,
  config_problems=_problems,
  tokenizer_runs=lambda cfg: [cfg.dpo.reference, cfg.checkpoint.init_from],
  text_corpus=False,
)
