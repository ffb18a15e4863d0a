"""Logical axis names -> mesh axes.

Parameters and activations are annotated with logical names ("batch", "embed", "mlp", ...). The rules,
which live in `config.mesh.rules`, map each name to zero or more mesh axes. Mapping a whole spec walks its
dimensions in order and never uses a mesh axis twice, so one rule set serves parameters and activations:
with `batch -> data,fsdp` and `embed -> fsdp`, a weight ("embed", "mlp") is sharded over fsdp while an
activation ("batch", "length", "embed") is sharded over fsdp on its batch dimension only.
"""

import contextlib
import threading
from collections.abc import Iterator, Mapping, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Mapping[str, tuple[str, ...]]

# Every logical name used in model/, with the mesh axes it maps to by default.
DEFAULT_RULES: dict[str, str] = {
  "batch": "data,fsdp,expert",
  "length": "",
  "embed": "fsdp",
  "vocab": "tensor",
  "heads": "tensor",
  "kv_heads": "tensor",
  "head_dim": "",
  "mlp": "tensor",
  "experts": "expert",
  "layers": "",
  "stages": "stage",
  "norm": "",
  "cache_length": "",  # slots of the decoding KV cache (model/kv_cache.py)
}


def parse_rules(rules_cfg: Mapping[str, str]) -> dict[str, tuple[str, ...]]:
  """`{"batch": "data,fsdp"}` (the config's form) -> `{"batch": ("data", "fsdp")}`."""
  return {name: tuple(a.strip() for a in axes.split(",") if a.strip()) for name, axes in rules_cfg.items()}


def logical_to_spec(names: Sequence[str | None], rules: Rules, mesh: Mesh | None = None) -> PartitionSpec:
  """Maps logical names to a PartitionSpec, skipping mesh axes already used and (given a mesh) size-1 axes."""
  used: set[str] = set()
  spec = []
  for name in names:
    if name is None:
      spec.append(None)
      continue
    assert name in rules, f"logical axis {name!r} has no rule; add it to config.mesh.rules"
    axes = tuple(a for a in rules[name] if a not in used and (mesh is None or mesh.shape[a] > 1))
    used.update(axes)
    spec.append(axes[0] if len(axes) == 1 else (axes or None))
  return PartitionSpec(*spec)


def entry_axes(entry) -> tuple[str, ...]:
  """The mesh axes of one PartitionSpec entry (None, an axis name, or a tuple of names) as a tuple."""
  if entry is None:
    return ()
  return (entry,) if isinstance(entry, str) else tuple(entry)


class _Active(threading.local):
  mesh: Mesh | None = None
  rules: Rules | None = None


_active = _Active()


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Within this context, `constrain` pins activations to shardings on `mesh`; outside, it does nothing."""
  previous = (_active.mesh, _active.rules)
  _active.mesh, _active.rules = mesh, rules
  try:
    yield
  finally:
    _active.mesh, _active.rules = previous


def active_mesh() -> Mesh | None:
  return _active.mesh


def active_rules() -> Rules | None:
  return _active.rules


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
  """Sharding constraint on an activation by logical names (identity when no mesh is active)."""
  if _active.mesh is None:
    return x
  assert x.ndim == len(names), f"{names} for shape {x.shape}"
  spec = logical_to_spec(names, _active.rules, _active.mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(_active.mesh, spec))
