"""Shardings of the train state: parameters from their logical names, ZeRO on top, optimizer state alike."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from parallel.mesh import MeshError
from parallel.rules import Rules, constrain, entry_axes, logical_to_spec

BATCH_AXES = ("batch", "length")


def param_specs(abstract_params, logical_names, rules: Rules, mesh: Mesh, *, where: str = "parameter"):
  """Mesh PartitionSpecs for every parameter; a dimension that its mesh axes do not divide is a MeshError."""

  def one(path, leaf, names):
    spec = logical_to_spec(tuple(names), rules, mesh)
    for dim, (size, entry) in enumerate(zip(leaf.shape, spec)):
      shards = math.prod(mesh.shape[a] for a in entry_axes(entry))
      if size % shards:
        name = jax.tree_util.keystr(path, simple=True, separator=".")
        raise MeshError(
          f"{where} {name} has size {size} on its {names[dim]!r} axis, not divisible by mesh axes "
          f"{entry_axes(entry)} of size {shards}; change the model size or config.mesh / config.mesh.rules"
        )
    return spec

  return jax.tree_util.tree_map_with_path(one, abstract_params, logical_names)


def add_data_axis(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
  """ZeRO: additionally shard over `data` on the first dimension that stays divisible; else leave as is."""
  entries = list(spec) + [None] * (len(shape) - len(spec))
  data = mesh.shape["data"]
  if data == 1 or any("data" in entry_axes(e) for e in entries):
    return spec
  for dim, size in enumerate(shape):
    axes = entry_axes(entries[dim])
    if size % (math.prod(mesh.shape[a] for a in axes) * data) == 0:
      entries[dim] = ("data",) + axes if axes else "data"
      return PartitionSpec(*entries)
  return spec


@dataclasses.dataclass(frozen=True)
class StateShardings:
  """Where each part of the train state lives, and where gradients go before the optimizer update."""

  params: object  # pytree of NamedSharding, like the params
  opt_state: object  # pytree of NamedSharding, like the optimizer state
  grads: object  # pytree of NamedSharding: reduce-scattered over `data` for ZeRO-2, else like params
  replicated: NamedSharding


def state_shardings(
  abstract_params, logical_names, optimizer: optax.GradientTransformation, rules: Rules, mesh: Mesh, zero_stage: int
) -> StateShardings:
  specs = param_specs(abstract_params, logical_names, rules, mesh)
  zero_specs = jax.tree.map(lambda s, p: add_data_axis(s, p.shape, mesh), specs, abstract_params)
  named = lambda tree: jax.tree.map(lambda s: NamedSharding(mesh, s), tree)  # noqa: E731
  replicated = NamedSharding(mesh, PartitionSpec())
  params = named(specs)
  sharded = named(zero_specs)
  abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
  opt_param_shardings = sharded if zero_stage >= 1 else params
  opt_state = _mirror_params(abstract_opt_state, abstract_params, opt_param_shardings, replicated)
  return StateShardings(params, opt_state, sharded if zero_stage >= 2 else params, replicated)


def _mirror_params(abstract_opt_state, abstract_params, param_shardings, replicated: NamedSharding):
  """Shardings of an optimizer state: an array whose path ends with a parameter's path is that parameter's
  statistic. Of the parameter's shape (moments), it takes the parameter's sharding; with one axis fewer
  (Adafactor's factored row and column statistics), the sharding without that axis's entry. Anything else
  (counts, Muon's coefficients, Adafactor's placeholders of shape (1,)) is replicated. Read from paths and
  shapes, so it holds for any optax state, partitioned and masked ones included."""
  by_path = {
    tuple(path): (leaf.shape, sharding)
    for (path, leaf), sharding in zip(jax.tree_util.tree_flatten_with_path(abstract_params)[0],
                                      jax.tree.leaves(param_shardings))
  }  # fmt: skip
  depths = sorted({len(path) for path in by_path}, reverse=True)

  def one(path, leaf):
    for depth in depths:
      shape, sharding = by_path.get(tuple(path[-depth:]), ((), None))
      if sharding is None:
        continue
      if leaf.shape == shape:
        return sharding
      spec = list(sharding.spec) + [None] * (len(shape) - len(sharding.spec))
      for axis in range(len(shape)):
        if leaf.shape == shape[:axis] + shape[axis + 1 :]:
          return NamedSharding(sharding.mesh, PartitionSpec(*spec[:axis], *spec[axis + 1 :]))
    return replicated

  return jax.tree_util.tree_map_with_path(one, abstract_opt_state)


def with_shardings(shapes, shardings):
  """ShapeDtypeStructs of `shapes` (arrays or ShapeDtypeStructs) placed as `shardings`, a tree of the same
  structure: what ahead-of-time compilation and checkpoint restores take."""
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def bytes_per_device(abstract_tree, shardings) -> int:
  """Bytes one device holds of a tree, read from the shardings (the largest over devices)."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(shardings)):
    bits = 4 if leaf.dtype in (jnp.int4, jnp.uint4) else 8 * leaf.dtype.itemsize  # int4 packs two to a byte
    total += math.prod(sharding.shard_shape(leaf.shape)) * bits // 8
  return total


def microbatches(batch: dict, n: int, rules, extra: tuple[str, ...] = ()) -> dict:
  """[B, L, ...] -> [n, B/n, L, ...], microbatch m = rows m, m+n, ...: every data shard holds part of every
  microbatch (laid out by `rules`). `extra`: logical names of the dimensions after L."""

  def split(x):
    b = x.shape[0]
    x = x.reshape(b // n, n, *x.shape[1:]).swapaxes(0, 1)
    return constrain(x, (None, *BATCH_AXES, *extra), rules)

  return jax.tree.map(split, batch)
