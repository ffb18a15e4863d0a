"""AdamW with warmup + cosine schedule, global-norm clipping and weight decay on matrices only.

The optimizer state has one structure whatever the hyperparameters: (clipping state, AdamW state). Turning
clipping on or off, or changing any rate, threshold or the schedule's length, changes numbers, never the
tree a checkpoint holds, so such a change resumes an existing run.
"""

import jax
import optax


def lr_schedule(peak_lr: float, final_lr: float, warmup_steps: int, total_steps: int) -> optax.Schedule:
  """Linear warmup from 0 to `peak_lr` over `warmup_steps`, then cosine decay to `final_lr` at `total_steps`.

  lr(s) = peak * s / warmup                                             for s < warmup
  lr(s) = final + (peak - final) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2   afterwards
  """
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps, decay_steps=total_steps, end_value=final_lr
  )


def decay_mask(logical_names) -> dict:
  """True for matrices (two or more axes besides the stacked "layers" axis): no decay on norms and biases."""
  return jax.tree.map(lambda spec: sum(name != "layers" for name in spec) >= 2, logical_names)


def make_optimizer(optim_cfg, total_steps: int, logical_names) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`optim_cfg` is config.optim; `logical_names` mirrors the params tree (logical PartitionSpec per param)."""
  schedule = lr_schedule(optim_cfg.peak_lr, optim_cfg.final_lr, optim_cfg.warmup_steps, total_steps)
  adamw = optax.adamw(
    schedule,
    b1=optim_cfg.b1,
    b2=optim_cfg.b2,
    eps=optim_cfg.eps,
    weight_decay=optim_cfg.weight_decay,
    mask=decay_mask(logical_names),
  )
  # identity() and clip_by_global_norm() both keep an empty state: the chain's structure does not depend on it.
  clip = optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0 else optax.identity()
  return optax.chain(clip, adamw), schedule


def restart_schedule(opt_state):
  """The optimizer state of another run, with its learning-rate schedule back at step 0 (Adam's moments and
  bias-correction count kept): a run started from it warms up and decays on its own steps, so the lr it logs
  (the schedule at its own step) is the lr it applies."""
  return jax.tree.map(
    lambda s: s._replace(count=jax.numpy.zeros_like(s.count)) if isinstance(s, optax.ScaleByScheduleState) else s,
    opt_state,
    is_leaf=lambda s: isinstance(s, optax.ScaleByScheduleState),
  )
