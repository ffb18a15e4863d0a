"""`distill`: knowledge distillation from a frozen teacher run of any shape trained with the same tokenizer.

Per weighted target token: alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * cross-entropy, *_T the
softmax at temperature T of the teacher's and the student's logits; count: target tokens. The corpus is the
token cache of data.files, as for `lm`.
"""

import dataclasses

import jax
import jax.numpy as jnp

from model import cross_entropy_sums
from model.params import abstract_model
from objectives import FrozenModel, LossFn, Objective, Setup, TrainedModel
from objectives.losses import as_sums, model_logits, token_count
from storage.run import run_model_config


def distill_kl_sums(student_BxLxV, teacher_BxLxV, loss_mask_BxL, temperature: float) -> jax.Array:
  """Sum over weighted targets of KL(softmax(teacher / T) || softmax(student / T))."""
  log_q = jax.nn.log_softmax(student_BxLxV.astype(jnp.float32) / temperature, axis=-1)
  log_p = jax.nn.log_softmax(teacher_BxLxV.astype(jnp.float32) / temperature, axis=-1)
  kl_BxL = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
  return jnp.sum(kl_BxL * loss_mask_BxL)


def make_distill_loss(graphdef, teacher_graphdef, *, temperature: float, alpha: float, vocab_size: int) -> LossFn:
  """Distillation from frozen["teacher"] (any shape, same tokenizer: logits compared over its `vocab_size`)."""

  def loss_fn(params, frozen, batch, dropout_key):
    logits, aux = model_logits(graphdef, params, batch, dropout_key)
    teacher_logits, _ = model_logits(teacher_graphdef, frozen["teacher"], batch)
    teacher_logits = jax.lax.stop_gradient(teacher_logits[..., :vocab_size])
    mask = batch["loss_mask"]
    nll_sum, z_sum, tokens = cross_entropy_sums(logits, batch["targets"], mask)
    kl_sum = distill_kl_sums(logits[..., :vocab_size], teacher_logits, mask, temperature)
    loss_sum = alpha * temperature**2 * kl_sum + (1.0 - alpha) * nll_sum
    return (loss_sum, z_sum, tokens), {**aux, **as_sums({"distill_kl": kl_sum, "distill_ce": nll_sum})}

  return loss_fn


def _problems(cfg) -> list[str]:
  d, problems = cfg.distill, []
  if not d.teacher:
    problems.append(
      "config.distill.teacher is empty; train a teacher first (python train.py --config configs/tiny.py "
      "--workdir runs/teacher) and pass --config.distill.teacher=runs/teacher"
    )
  if d.temperature <= 0:
    problems.append(f"config.distill.temperature={d.temperature} must be positive")
  if not 0.0 <= d.alpha <= 1.0:
    problems.append(f"config.distill.alpha={d.alpha} must be in [0, 1]")
  return problems


def _setup(model: TrainedModel) -> Setup:
  cfg = model.cfg
  teacher_cfg = run_model_config(
    cfg.distill.teacher, model.tokenizer_vocab, model.tensor_parallelism, cfg.data.seq_len, "config.distill.teacher"
  )
  # The teacher runs inside the student's step: its activations follow the run's rules, on the run's target.
  teacher_cfg = dataclasses.replace(teacher_cfg, rules=model.model_cfg.rules, platform=model.model_cfg.platform)
  teacher_graphdef, teacher_params, teacher_names = abstract_model(teacher_cfg)
  loss_fn = make_distill_loss(
    model.graphdef,
    teacher_graphdef,
    temperature=cfg.distill.temperature,
    alpha=cfg.distill.alpha,
    vocab_size=model.tokenizer_vocab,
  )
  teacher = FrozenModel(cfg.distill.teacher, teacher_cfg, teacher_params, teacher_names)
  return Setup(loss_fn, token_count, {"teacher": teacher})


OBJECTIVE = Objective(
  name="distill",
  setup=_setup,
  config_problems=_problems,
  tokenizer_runs=lambda cfg: [cfg.distill.teacher],
  same_tokenizer=True,
)
