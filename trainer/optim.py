"""The optimizer (`optim.optimizer`) and its learning-rate schedule (`optim.schedule`), built in one place.

Every optimizer is optax's own, behind global-norm clipping: `(clipping state, optimizer state)`.
- adamw: AdamW, weight decay on matrices only (`decay_mask`).
- muon: Muon (optax.contrib) on the hidden matrices of the layer stack, orthogonalised per layer (and per
  expert) on each kernel's 2-D fan_in x fan_out view; AdamW on everything else: embeddings, the LM head,
  learned positions, norms and biases (`muon_dimensions` says which is which).
- adafactor: factored second moments, no first moment, update clipping at RMS 1 (optax's defaults); decay
  scaled by the learning rate, as AdamW's.
- lion: sign of an interpolated momentum (b1, b2), decoupled weight decay on matrices.

Within one optimizer the state has one structure whatever the hyperparameters: turning clipping on or off, or
changing any rate, threshold, schedule or the run's length, changes numbers, never the tree a checkpoint holds,
so such a change resumes an existing run. The schedule is a function of the step alone (the state holds only a
count), so a run resumed with more train.steps follows the new length. Changing `optim.optimizer` changes what
the state means: storage/checkpoint.py refuses that resume.
"""

import math

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon
from optax.transforms import MaskedNode

OPTIMIZERS = ("adamw", "muon", "adafactor", "lion")
SCHEDULES = ("cosine", "wsd", "linear", "constant")
DECAY_SHAPES = ("linear", "1-sqrt")
_BATCH_AXES = ("layers", "experts")  # stacked copies of one matrix: each copy is orthogonalised on its own
_PIVOT_AXES = ("embed", None)  # the model dimension, or a LoRA adapter's rank, sits on one side of every kernel


def lr_schedule(
  peak_lr: float,
  final_lr: float,
  warmup_steps: int,
  total_steps: int,
  *,
  kind: str = "cosine",
  decay_fraction: float = 0.2,
  decay_shape: str = "linear",
) -> optax.Schedule:
  """The learning rate at step s. Every kind warms up linearly from 0: lr(s) = peak * s / warmup for s < warmup.
  After warmup (W = warmup, T = total):

  cosine:   lr(s) = final + (peak - final) * (1 + cos(pi * (s - W) / (T - W))) / 2
  linear:   lr(s) = final + (peak - final) * (1 - (s - W) / (T - W))
  constant: lr(s) = peak
  wsd:      lr(s) = peak for s < T - D, with D = round(decay_fraction * T) decay steps, then with
            t = (s - (T - D)) / D:  final + (peak - final) * (1 - t)        (decay_shape linear)
                                    final + (peak - final) * (1 - sqrt(t))  (decay_shape 1-sqrt)

  Every kind holds `final` (constant: `peak`) after T.
  """
  if kind == "cosine":
    return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=peak_lr, warmup_steps=warmup_steps, decay_steps=total_steps, end_value=final_lr
    )
  assert kind in SCHEDULES, kind
  assert decay_shape in DECAY_SHAPES, decay_shape
  decay_start = warmup_steps if kind == "linear" else total_steps - round(decay_fraction * total_steps)

  def schedule(step):
    s = jnp.asarray(step, jnp.float32)
    warmup = peak_lr * s / max(warmup_steps, 1)
    t = jnp.clip((s - decay_start) / max(total_steps - decay_start, 1), 0.0, 1.0)
    fall = jnp.sqrt(t) if kind == "wsd" and decay_shape == "1-sqrt" else t
    after = peak_lr if kind == "constant" else final_lr + (peak_lr - final_lr) * (1.0 - fall)
    return jnp.where(s < warmup_steps, warmup, after)

  return schedule


def decay_mask(logical_names) -> dict:
  """True for matrices (two or more axes besides the stacked "layers" axis): no decay on norms and biases."""
  return jax.tree.map(lambda spec: sum(name != "layers" for name in spec) >= 2, logical_names)


def muon_dimensions(logical_names) -> dict:
  """Per parameter, how Muon sees it as matrices (optax's MuonDimensionNumbers), or None: AdamW's.

  Muon takes the hidden matrices: parameters of the layer stack (a "layers" axis) with at least two axes besides
  "layers" and "experts", which are batch axes (one matrix per layer and expert). Outside the stack (embeddings,
  the LM head, learned positions, the final norm) and inside it the norms and biases go to AdamW. Every kernel is
  stored as x @ W [in..., out...] with the model dimension ("embed") or a LoRA rank (None) at one end: that end
  alone is fan_in (first) or fan_out (last), e.g. wq [D | N, H], wo [N, H | D], w_down [F | D], lora a [D | R].
  """

  def one(spec):
    if "layers" not in spec:
      return None
    axes = [i for i, name in enumerate(spec) if name not in _BATCH_AXES]
    if len(axes) < 2 or any(spec[i] == "vocab" for i in axes):
      return None
    split = 1 if spec[axes[0]] in _PIVOT_AXES or spec[axes[-1]] not in _PIVOT_AXES else len(axes) - 1
    return MuonDimensionNumbers(reduction_axis=tuple(axes[:split]), output_axis=tuple(axes[split:]))

  return jax.tree.map(one, logical_names, is_leaf=lambda x: isinstance(x, (tuple, jax.sharding.PartitionSpec)))


def _adamw(optim_cfg, schedule, decay: dict):
  """AdamW, decaying the parameters `decay` marks True."""
  return optax.adamw(
    schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, mask=decay
  )


def _muon(optim_cfg, schedule, logical_names):
  """optax.contrib.muon's parts: Muon's momentum, Newton-Schulz and shape scaling (consistent RMS 0.2 by default,
  so one peak_lr suits both parts), with AdamW (decay on its matrices only) for the rest. Composed here rather
  than called as optax.contrib.muon, whose AdamW part decays norms and biases and uses Nesterov momentum."""
  is_leaf = lambda x: x is None or isinstance(x, MuonDimensionNumbers)  # noqa: E731
  dims = muon_dimensions(logical_names)
  on_muon = jax.tree.map(lambda d: d is not None, dims, is_leaf=is_leaf)
  labels = jax.tree.map(lambda m: "muon" if m else "adamw", on_muon)
  muon_dims = jax.tree.map(lambda d: d if d is not None else MaskedNode(), dims, is_leaf=is_leaf)
  muon_lr = lambda step: optim_cfg.muon_lr_multiplier * schedule(step)  # noqa: E731
  muon = optax.chain(
    scale_by_muon(beta=optim_cfg.muon_momentum, nesterov=True, weight_dimension_numbers=muon_dims),
    _scale_by_shape(muon_dims, optim_cfg.muon_consistent_rms),
    optax.add_decayed_weights(optim_cfg.weight_decay),
    optax.scale_by_learning_rate(muon_lr),
  )
  # optax.partition shows each part its own parameters and MaskedNode for the other part's.
  decay = jax.tree.map(lambda m, d: MaskedNode() if m else d, on_muon, decay_mask(logical_names))
  adamw = _adamw(optim_cfg, schedule, decay)
  return optax.partition({"muon": muon, "adamw": adamw}, labels)


def _scale_by_shape(dims, consistent_rms: float) -> optax.GradientTransformation:
  """Muon's shape scale (optax.contrib's, not exported by optax 0.2.8): with fan_in, fan_out the sizes of a
  matrix's reduction and output axes, the orthogonalised update times consistent_rms * sqrt(max(fan_in, fan_out))
  (Moonlight: the update's RMS is about AdamW's), or with consistent_rms <= 0 times sqrt(max(1, fan_out / fan_in))
  (Keller Jordan's Muon, which wants a larger learning rate)."""

  def scale(u, d):
    fan_in = math.prod(u.shape[i] for i in d.reduction_axis)
    fan_out = math.prod(u.shape[i] for i in d.output_axis)
    if consistent_rms > 0:
      return u * (consistent_rms * math.sqrt(max(fan_in, fan_out)))
    return u * math.sqrt(max(1.0, fan_out / fan_in))

  def update(updates, state, params=None):
    del params
    return jax.tree.map(scale, updates, dims, is_leaf=lambda x: isinstance(x, MuonDimensionNumbers)), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _adafactor(optim_cfg, schedule, logical_names):
  # optax adds the decay after the learning rate: a decay rate that follows the schedule makes it AdamW's
  # decoupled decay, lr * weight_decay * w.
  return optax.adafactor(
    schedule,
    multiply_by_parameter_scale=False,  # peak_lr is a step size, as for the other optimizers
    weight_decay_rate=lambda step: optim_cfg.weight_decay * schedule(step),
    weight_decay_mask=decay_mask(logical_names),
  )


def _lion(optim_cfg, schedule, logical_names):
  return optax.lion(
    schedule, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=optim_cfg.weight_decay, mask=decay_mask(logical_names)
  )


_BUILDERS = {
  "adamw": lambda optim_cfg, schedule, logical_names: _adamw(optim_cfg, schedule, decay_mask(logical_names)),
  "muon": _muon,
  "adafactor": _adafactor,
  "lion": _lion,
}


def make_optimizer(optim_cfg, total_steps: int, logical_names) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """`optim_cfg` is config.optim; `logical_names` mirrors the params tree (logical PartitionSpec per param)."""
  schedule = lr_schedule(
    optim_cfg.peak_lr,
    optim_cfg.final_lr,
    optim_cfg.warmup_steps,
    total_steps,
    kind=optim_cfg.schedule,
    decay_fraction=optim_cfg.decay_fraction,
    decay_shape=optim_cfg.decay_shape,
  )
  optimizer = _BUILDERS[optim_cfg.optimizer](optim_cfg, schedule, logical_names)
  # identity() and clip_by_global_norm() both keep an empty state: the chain's structure does not depend on it.
  clip = optax.clip_by_global_norm(optim_cfg.clip_norm) if optim_cfg.clip_norm > 0 else optax.identity()
  return optax.chain(clip, optimizer), schedule


def restart_schedule(opt_state):
  """The optimizer state of another run, with its schedules (learning rate, and Adafactor's decay that follows
  it) back at step 0 (moments and bias-correction counts kept): a run started from it warms up and decays on its
  own steps, so the lr it logs (the schedule at its own step) is the lr it applies."""
  # A schedule's state is its step count alone (optax's ScaleByScheduleState, and the weight-decay schedule's).
  scheduled = lambda s: getattr(s, "_fields", None) == ("count",)  # noqa: E731
  return jax.tree.map(lambda s: s._replace(count=jnp.zeros_like(s.count)) if scheduled(s) else s, opt_state,
                      is_leaf=scheduled)  # fmt: skip
