"""Logical axis names -> mesh axes.

Parameters and activations are annotated with logical names ("batch", "embed", "mlp", ...). The rules,
which live in `config.mesh.rules`, map each name to zero or more mesh axes. Mapping a whole spec walks its
dimensions in order and never uses a mesh axis twice, so one rule set serves parameters and activations:
with `batch -> data,fsdp` and `embed -> fsdp`, a weight ("embed", "mlp") is sharded over fsdp while an
activation ("batch", "length", "embed") is sharded over fsdp on its batch dimension only.
"""

import functools
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Mapping[str, tuple[str, ...]]

# Every logical name used in model/, with the mesh axes it maps to by default.
DEFAULT_RULES: dict[str, str] = {
  "batch": "data,fsdp,expert",
  "length": "context",  # the sequence, split over mesh.context (parallel/context.py)
  # Parameters: fsdp, and context as a second fsdp axis (the devices of a sequence would else hold the same
  # weights); activations take context on "length" first, so their "embed" stays on fsdp alone.
  "embed": "fsdp,context",
  "vocab": "tensor",
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": "",
  "mlp": "tensor",
  "experts": "expert",
  "layers": "",
  "norm": "",
  "cache_length": "",  # slots of the decoding KV cache (model/kv_cache.py)
}


# What a pipeline changes, as data over the run's rules. With mesh.stage > 1 the stacked layer axis is split over
# `stage` first (the parameter tree stays that of stage=1).
PIPELINE_RULES = {"layers": ("stage",)}
# Inside the stages the head (final norm, LM head and loss, which the last chunk's backward runs) keeps its weights
# and logits whole on each device of the last stage:
# - "vocab": XLA's SPMD partitioner (jax 0.10.2) aborts on the loss's target-logit gather over a vocab-sharded axis
#   inside a partly manual shard_map (a CHECK failure in ExpandDeviceGroupsWithIota). With tensor > 1 this costs
#   one all-gather of each microbatch's logits.
# - "embed": the head runs in a branch that only the last stage takes (parallel/pipeline.py), so each collective in
#   it must stay among that stage's devices. With fsdp and tensor > 1, an LM head split over fsdp on "embed" is
#   gathered for the logits through a collective-permute, which XLA runs as one rendezvous of every device of the
#   program: the other stages never arrive and the step hangs. A whole weight is gathered by all-gathers within
#   the stage, once per microbatch.
STAGE_HEAD_RULES = {"vocab": (), "embed": ()}


def stage_rules(rules: Mapping[str, tuple[str, ...]], stages: int) -> dict[str, tuple[str, ...]]:
  """The run's rules on a mesh of `stages` pipeline stages: each PIPELINE_RULES axis goes first."""
  if stages == 1:
    return dict(rules)
  return {
    **rules,
    **{name: (*axes, *(a for a in rules[name] if a not in axes)) for name, axes in PIPELINE_RULES.items()},
  }


def stage_head_rules(rules: Mapping[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
  """The rules of the head inside the pipeline's stages: STAGE_HEAD_RULES over the run's."""
  return {**rules, **STAGE_HEAD_RULES}


def parse_rules(rules_cfg: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
  """`{"batch": "data,fsdp"}` (the config's form) -> `{"batch": ("data", "fsdp")}`."""
  return {name: tuple(a.strip() for a in axes.split(",") if a.strip()) for name, axes in rules_cfg.items()}


def logical_to_spec(names: Sequence[str | None], rules, mesh=None) -> PartitionSpec:
  """Maps logical names to a PartitionSpec, skipping mesh axes already used and (given a mesh: concrete,
  abstract, or its {axis: size}) size-1 axes. `rules`: a mapping or `freeze`d pairs."""
  rules = dict(rules)
  sizes = None if mesh is None else (mesh if isinstance(mesh, Mapping) else mesh.shape)
  used: set[str] = set()
  spec = []
  for name in names:
    if name is None:
      spec.append(None)
      continue
    assert name in rules, f"logical axis {name!r} has no rule; add it to config.mesh.rules"
    # An axis the mesh lacks (a hand-made mesh without `context`, say) splits nothing, like one of size 1.
    axes = tuple(a for a in rules[name] if a not in used and (sizes is None or sizes.get(a, 1) > 1))
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def entry_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, an axis name, or a tuple of names) as a tuple."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


def freeze(rules: Mapping[str, Sequence[str]]) -> tuple[tuple[str, tuple[str, ...]], ...]:
  """Rules as sorted (name, axes) pairs: hashable, so they can live in the model's static config."""
  return tuple(sorted((name, tuple(axes)) for name, axes in rules.items()))


def constrain(x: jax.Array, names: Sequence[str | None], rules) -> jax.Array:
  """Pins an activation to the sharding its logical `names` map to under `rules` (a mapping or `freeze`d pairs),
  on the mesh of JAX's own context (`jax.sharding.get_abstract_mesh()`), which whoever traces a step sets
  (trainer/experiment.py, generation/decoding.py). A call with no mesh there runs on one device: nothing to pin."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  assert x.ndim == len(names), f"{names} for shape {x.shape}"
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, logical_to_spec(names, rules, mesh)))


def traced_under(mesh: Mesh, fn):
  """`fn` traced with `mesh` as JAX's mesh context, so `constrain` and the shard_maps inside see it."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args, **kwargs)

  return wrapped
