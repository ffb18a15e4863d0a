"""`grpo`: reinforcement learning from verifiable rewards (GRPO, with DAPO's and Dr. GRPO's variants).

Each rollout samples `grpo.group_size` completions of each of `grpo.prompts_per_step` prompts with the current
policy (trainer/rollouts.py), scores them with the reward functions (objectives/rewards.py) and trains on them for
`grpo.iterations` optimizer steps. A batch row is one prompt and one completion; the rows of a prompt's group are
consecutive. Per completion token t of completion i, with r = pi(t) / pi_old(t) the importance ratio against the
policy that sampled it and A_i its group-normalised advantage:

  loss_t = -min(r A_i, clip(r, 1 - epsilon, 1 + epsilon_high) A_i) + beta * (exp(q - p) - (q - p) - 1)

where p, q are log pi(t) and log pi_ref(t) (the k3 estimator of KL(pi || pi_ref)). Log-probabilities are those of
the logits over `grpo.temperature`, the distribution the rollout sampled from. The loss of the batch is
sum_t w_t loss_t, where the weights say how tokens are averaged (`grpo.loss_agg`):
  sequence_mean (GRPO):  w = 1 / (|o_i| * completions)       mean over completions of each one's token mean
  token_mean (DAPO):     w = 1 / (completion tokens)         mean over every completion token of the batch
  constant (Dr. GRPO):   w = 1 / (completions * max_new_tokens)
The weights are computed once per rollout over the whole batch (`rollout_fields`) and travel in the batch's
`loss_mask`, so microbatches, shards and processes add up to exactly this loss; the step divides by 1.
"""

import jax
import jax.numpy as jnp

from model import lora
from objectives import FrozenModel, LossFn, Objective, Setup, TrainedModel
from objectives.losses import as_sums, model_logits
from objectives.sft import chat_data_problems

LOSS_AGGREGATIONS = ("sequence_mean", "token_mean", "constant")
ADVANTAGE_EPS = 1e-4  # added to a group's reward std before dividing (as TRL): a group of near-equal rewards
REWARD_FIELDS = ("advantages", "token_share")  # rollout fields every grpo batch has, [B, L] float32


def group_advantages(rewards_B: jax.Array, group_size: int, scale: bool) -> jax.Array:
  """(r_i - mean of its group) / (std of its group + ADVANTAGE_EPS), or without the division (`scale` False, Dr.
  GRPO). Groups are `group_size` consecutive rows; the std is the sample std (Bessel's correction), as TRL's."""
  rewards_GxN = rewards_B.reshape(-1, group_size).astype(jnp.float32)
  centred_GxN = rewards_GxN - jnp.mean(rewards_GxN, axis=1, keepdims=True)
  if scale:
    std_Gx1 = jnp.std(rewards_GxN, axis=1, keepdims=True, ddof=1)
    centred_GxN = centred_GxN / (std_Gx1 + ADVANTAGE_EPS)
  return centred_GxN.reshape(-1)


def equal_groups(rewards_B: jax.Array, group_size: int) -> jax.Array:
  """bool [B]: the row's group has every reward equal (its advantages are all 0: nothing to learn from)."""
  rewards_GxN = rewards_B.reshape(-1, group_size)
  equal_G = jnp.max(rewards_GxN, axis=1) == jnp.min(rewards_GxN, axis=1)
  return jnp.repeat(equal_G, group_size)


def aggregation_weights(mask_BxL: jax.Array, keep_B: jax.Array, loss_agg: str, max_new_tokens: int) -> jax.Array:
  """w [B, L]: each completion token's weight in the batch's loss (module docstring); rows not kept weigh 0."""
  mask_BxL = mask_BxL * keep_B[:, None].astype(mask_BxL.dtype)
  completions = jnp.maximum(jnp.sum(keep_B.astype(jnp.float32)), 1.0)
  if loss_agg == "sequence_mean":
    lengths_Bx1 = jnp.maximum(jnp.sum(mask_BxL, axis=1, keepdims=True), 1.0)
    return mask_BxL / lengths_Bx1 / completions
  if loss_agg == "token_mean":
    return mask_BxL / jnp.maximum(jnp.sum(mask_BxL), 1.0)
  assert loss_agg == "constant", loss_agg
  return mask_BxL / (completions * max_new_tokens)


def token_terms(logp_BxL, old_logp_BxL, advantages_BxL, *, epsilon: float, epsilon_high: float, beta: float,
                ref_logp_BxL=None) -> dict:  # fmt: skip
  """Per token: the loss (module docstring), whether the clip was active, and the k3 KL estimate (beta > 0)."""
  ratio = jnp.exp(logp_BxL - old_logp_BxL)
  unclipped = ratio * advantages_BxL
  clipped = jnp.clip(ratio, 1.0 - epsilon, 1.0 + epsilon_high) * advantages_BxL
  terms = {
    "loss": -jnp.minimum(unclipped, clipped),
    "clipped": ((ratio < 1.0 - epsilon) & (advantages_BxL < 0)) | ((ratio > 1.0 + epsilon_high) & (advantages_BxL > 0)),
  }
  if beta > 0:
    delta = ref_logp_BxL - logp_BxL
    terms["kl"] = jnp.exp(delta) - delta - 1.0
    terms["loss"] = terms["loss"] + beta * terms["kl"]
  return terms


def policy_logprobs(graphdef, params, batch: dict, temperature: float, dropout_key=None):
  """(log-probabilities [B, L] of the targets under logits / temperature, the entropy [B, L] of that distribution
  (no gradient), the model's aux), from one log-softmax over the vocabulary."""
  logits, aux = model_logits(graphdef, params, batch, dropout_key)
  logp_BxLxV = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  logp_BxL = jnp.take_along_axis(logp_BxLxV, batch["targets"][..., None], axis=-1)[..., 0]
  held = jax.lax.stop_gradient(logp_BxLxV)
  return logp_BxL, -jnp.sum(jnp.exp(held) * held, axis=-1), aux


def make_grpo_loss(graphdef, grpo_cfg) -> LossFn:
  """The LossFn of the module docstring on a rollout batch (trainer/rollouts.py builds its fields)."""
  on_policy = grpo_cfg.iterations == 1
  beta = grpo_cfg.beta

  def loss_fn(params, frozen, batch, dropout_key):
    del frozen  # the reference's log-probabilities come with the batch, computed once per rollout
    logp, entropy, aux = policy_logprobs(graphdef, params, batch, grpo_cfg.temperature, dropout_key)
    # One update per rollout: the sampling policy is this one, so the ratio is 1 with the gradient of pi / pi.
    old = jax.lax.stop_gradient(logp) if on_policy else batch["old_logprobs"]
    terms = token_terms(
      logp, old, batch["advantages"], epsilon=grpo_cfg.epsilon, epsilon_high=grpo_cfg.epsilon_high, beta=beta,
      ref_logp_BxL=batch.get("ref_logprobs"),
    )  # fmt: skip
    share = batch["token_share"]  # token means for the logged statistics, whatever the loss's weights
    stats = {"clip_fraction": jnp.sum(share * terms["clipped"]), "entropy": jnp.sum(share * entropy)}
    if beta > 0:
      stats["kl"] = jnp.sum(share * jax.lax.stop_gradient(terms["kl"]))
    loss_sum = jnp.sum(batch["loss_mask"] * terms["loss"])
    return (loss_sum, jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32)), {**aux, **as_sums(stats)}

  return loss_fn


def extra_fields(grpo_cfg) -> dict:
  """The batch fields a grpo step reads besides BATCH_FIELDS."""
  fields = dict.fromkeys(REWARD_FIELDS, jnp.float32)
  if grpo_cfg.iterations > 1:
    fields["old_logprobs"] = jnp.float32
  if grpo_cfg.beta > 0:
    fields["ref_logprobs"] = jnp.float32
  return fields


def reference_params(params: dict, frozen: dict, lora_rank: int) -> dict:
  """The frozen reference's parameters: `frozen["reference"]`, or with LoRA the base alone (adapters at zero add
  nothing: x A B = 0), which costs no second copy of the model."""
  if lora_rank > 0:
    return lora.combine(jax.tree.map(jnp.zeros_like, params), frozen["base"])
  return frozen["reference"]


def config_problems(cfg) -> list[str]:
  g = cfg.grpo
  problems = chat_data_problems(cfg)  # a chat template and prompt JSONL files
  rows = g.prompts_per_step * g.group_size
  checks = [
    (g.prompts_per_step > 0, f"config.grpo.prompts_per_step={g.prompts_per_step} must be positive"),
    (g.group_size >= 2, f"config.grpo.group_size={g.group_size} must be at least 2: advantages compare a group"),
    (
      cfg.train.global_batch_size == rows,
      f"config.train.global_batch_size={cfg.train.global_batch_size} must equal grpo.prompts_per_step x "
      f"grpo.group_size = {rows} (one row per completion); set --config.train.global_batch_size={rows}",
    ),
    (
      0 < g.max_new_tokens < cfg.data.seq_len,
      f"config.grpo.max_new_tokens={g.max_new_tokens} must be positive and less than data.seq_len="
      f"{cfg.data.seq_len} (a row holds the prompt and its completion); raise data.seq_len or lower it",
    ),
    (g.temperature > 0, f"config.grpo.temperature={g.temperature} must be positive (rollouts sample)"),
    (0 < g.top_p <= 1, f"config.grpo.top_p={g.top_p} must be in (0, 1]"),
    (g.top_k >= 0, f"config.grpo.top_k={g.top_k} must be at least 0 (0: off)"),
    (g.epsilon >= 0 and g.epsilon_high >= 0, "config.grpo.epsilon and epsilon_high must be at least 0"),
    (g.beta >= 0, f"config.grpo.beta={g.beta} must be at least 0 (0: no reference model)"),
    (g.iterations >= 1, f"config.grpo.iterations={g.iterations} must be at least 1"),
    (
      g.loss_agg in LOSS_AGGREGATIONS,
      f"config.grpo.loss_agg={g.loss_agg!r} is not one of {', '.join(LOSS_AGGREGATIONS)}; pick one of them",
    ),
    (bool(g.rewards.strip()), "config.grpo.rewards is empty; name at least one reward function (e.g. exact_answer)"),
    (g.overlong_window >= 0, f"config.grpo.overlong_window={g.overlong_window} must be at least 0"),
    (
      cfg.train.steps % g.iterations == 0 and cfg.checkpoint.every_steps % g.iterations == 0,
      f"config.train.steps={cfg.train.steps} and config.checkpoint.every_steps={cfg.checkpoint.every_steps} must be "
      f"multiples of grpo.iterations={g.iterations}: a run checkpoints between rollout batches",
    ),
    (cfg.model.dropout_rate == 0, "config.model.dropout_rate must be 0 with grpo: the importance ratios compare "
     "two forward passes of the same policy"),
  ]  # fmt: skip
  problems += [message for ok, message in checks if not ok]
  names = [n for n in g.rewards.split(",") if n.strip()]
  weights = [w for w in g.reward_weights.split(",") if w.strip()]
  if weights and len(weights) != len(names):
    problems.append(
      f"config.grpo.reward_weights has {len(weights)} weights for {len(names)} reward functions; give one per "
      "function, or none (all 1)"
    )
  try:
    [float(w) for w in weights]
  except ValueError:
    problems.append(f"config.grpo.reward_weights={g.reward_weights!r}: give comma-separated numbers")
  return problems


def _setup(model: TrainedModel) -> Setup:
  cfg = model.cfg
  frozen = {}
  if cfg.grpo.beta > 0 and cfg.lora.rank == 0:
    source = cfg.grpo.reference or cfg.checkpoint.init_from
    frozen["reference"] = FrozenModel(source, model.model_cfg, model.abstract_params, model.logical_names)
  one = lambda batch: jnp.ones((), jnp.float32)  # noqa: E731 (the weights already normalise the loss)
  return Setup(make_grpo_loss(model.graphdef, cfg.grpo), one, frozen)


def _rollouts(*args):
  from trainer.rollouts import Rollouts  # the trainer's side: generation, rewards, batches

  return Rollouts.start(*args)


OBJECTIVE = Objective(
  name="grpo",
  setup=_setup,
  config_problems=config_problems,
  tokenizer_runs=lambda cfg: [cfg.checkpoint.init_from, cfg.grpo.reference],
  text_corpus=False,
  batch_fields=lambda cfg: extra_fields(cfg.grpo),
  batches=_rollouts,
)
