"""The optimizer and the train step: schedule, clipping, weight-decay mask, accumulation, one compilation."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from tests.helpers import packed_batch, run_steps, small_config
from trainer.optim import decay_mask, lr_schedule, make_optimizer


@pytest.mark.fast
def test_schedule_matches_formula_at_key_steps():
  peak, final, warmup, total = 3e-4, 3e-5, 100, 1000
  schedule = lr_schedule(peak, final, warmup, total)

  def formula(s):
    if s < warmup:
      return peak * s / warmup
    return final + (peak - final) * (1 + math.cos(math.pi * (s - warmup) / (total - warmup))) / 2

  middle = warmup + (total - warmup) // 2
  for step, expected in [(0, 0.0), (warmup, peak), (middle, (peak + final) / 2), (total, final)]:
    assert float(schedule(step)) == pytest.approx(formula(step), rel=1e-6, abs=1e-12)
    assert formula(step) == pytest.approx(expected, rel=1e-6, abs=1e-12)
  assert float(schedule(warmup // 2)) == pytest.approx(peak / 2, rel=1e-6)


@pytest.mark.fast
def test_clipping_bounds_the_global_norm_of_the_update_input():
  cfg = small_config(**{"optim.clip_norm": 0.5, "optim.b1": 0.9})
  params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
  names = {"w": P("embed", "mlp"), "b": P("norm")}
  optimizer, _ = make_optimizer(cfg.optim, 10, names)
  state = optimizer.init(params)
  big = {"w": jnp.full((4, 4), 10.0), "b": jnp.full((4,), -10.0)}
  small = jax.tree.map(lambda g: g * 1e-3, big)
  for grads, expected_norm in [(big, 0.5), (small, float(optax.global_norm(small)))]:
    _, new_state = optimizer.update(grads, state, params)
    mu = new_state[1][0].mu  # Adam's first moment after one step is (1 - b1) * the clipped gradient
    assert float(optax.global_norm(mu)) / (1 - 0.9) == pytest.approx(expected_norm, rel=1e-5)


def test_weight_decay_applies_to_matrices_only():
  names = {"blocks": {"w": P("layers", "embed", "mlp"), "scale": P("layers", "norm")}, "embed": P("vocab", "embed")}
  assert decay_mask(names) == {"blocks": {"w": True, "scale": False}, "embed": True}


def test_grad_accumulation_is_the_same_update_as_the_full_batch():
  rng = np.random.default_rng(0)
  batches = [packed_batch(rng, 8, 16) for _ in range(2)]
  losses_1, params_1, _ = run_steps(small_config(**{"train.grad_accum": 1}), batches)
  losses_4, params_4, _ = run_steps(small_config(**{"train.grad_accum": 4}), batches)
  np.testing.assert_allclose(losses_4, losses_1, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(params_4), jax.tree.leaves(params_1)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.fast
def test_train_step_compiles_once_and_loss_falls():
  rng = np.random.default_rng(1)
  batch = packed_batch(rng, 8, 16)
  losses, _, exp = run_steps(small_config(), [batch] * 10)
  assert exp.train_step._cache_size() == 1
  assert losses[-1] < losses[0] - 1.0  # ten steps on one batch: it memorises


def test_dropout_changes_training_but_not_evaluation():
  rng = np.random.default_rng(2)
  batch = packed_batch(rng, 8, 16)
  with_dropout, _, exp = run_steps(small_config(**{"model.dropout_rate": 0.5}), [batch])
  without, _, _ = run_steps(small_config(), [batch])
  assert abs(with_dropout[0] - without[0]) > 1e-3
  # Evaluation ignores the rate: the dropout run's initial weights (the same seed) score the batch exactly as the
  # dropout-free run's first step did.
  nll, tokens = exp.eval_step(exp.init_state().params, jax.device_put(batch, exp.batch_sharding), {})
  assert float(nll) / float(tokens) == pytest.approx(without[0], rel=1e-6)
