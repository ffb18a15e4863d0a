"""The KV cache of decoding: keys and values of every layer, and the segment ids and positions of every slot.

Keys and values are stacked on a leading layers axis like the parameters, [X, B, S, K, H] (X = num_layers, S the
cache length), so the layer scan carries each layer's slice as xs/ys. Slot bookkeeping is shared by all layers:
`segment_ids_BxS` (0 = empty or padding, which `attend` never attends), `positions_BxS`, and `index`, the next
slot to write. Each call writes its L new tokens at slots [index, index + L) of every row; causality comes from
positions, not slots, so rows whose prompts have different lengths still share one write index (the slots
after a short prompt stay segment 0).
"""

import jax
import jax.numpy as jnp
from flax import struct
from jax.sharding import Mesh, NamedSharding

from parallel.rules import Rules, constrain, logical_to_spec

KV_NAMES = ("layers", "batch", "cache_length", "kv_heads", "head_dim")
SLOT_NAMES = ("batch", "cache_length")


@struct.dataclass
class KVCache:
  k_XxBxSxKxH: jax.Array
  v_XxBxSxKxH: jax.Array
  segment_ids_BxS: jax.Array
  positions_BxS: jax.Array
  index: jax.Array  # int32 scalar: the next slot to write

  @property
  def length(self) -> int:
    return self.k_XxBxSxKxH.shape[2]


@struct.dataclass
class LayerCache:
  """One layer's view: its keys and values [B, S, K, H] and the shared slot bookkeeping (already updated with
  the tokens being written)."""

  k_BxSxKxH: jax.Array
  v_BxSxKxH: jax.Array
  segment_ids_BxS: jax.Array
  positions_BxS: jax.Array
  index: jax.Array

  def write(self, k_BxLxKxH: jax.Array, v_BxLxKxH: jax.Array, rules) -> "LayerCache":
    """This layer's cache with the new keys and values at slots [index, index + L)."""
    at = (0, self.index, 0, 0)
    k = jax.lax.dynamic_update_slice(self.k_BxSxKxH, k_BxLxKxH.astype(self.k_BxSxKxH.dtype), at)
    v = jax.lax.dynamic_update_slice(self.v_BxSxKxH, v_BxLxKxH.astype(self.v_BxSxKxH.dtype), at)
    names = KV_NAMES[1:]
    return self.replace(k_BxSxKxH=constrain(k, names, rules), v_BxSxKxH=constrain(v, names, rules))


def init_cache(
  num_layers: int, batch: int, length: int, kv_heads: int, head_dim: int, dtype, mesh: Mesh | None, rules: Rules
) -> KVCache:
  """An empty cache (every slot segment 0), created in its shardings when a mesh is given."""

  def make():
    kv = jnp.zeros((num_layers, batch, length, kv_heads, head_dim), dtype)
    slots = jnp.zeros((batch, length), jnp.int32)
    return KVCache(kv, kv, slots, slots, jnp.zeros((), jnp.int32))

  if mesh is None:
    return make()
  return jax.jit(make, out_shardings=cache_shardings(mesh, rules))()


def cache_shardings(mesh: Mesh, rules: Rules) -> KVCache:
  """KVCache of NamedShardings: batch over the data axes, kv heads over tensor, the rest as the rules say."""
  kv = NamedSharding(mesh, logical_to_spec(KV_NAMES, rules, mesh))
  slots = NamedSharding(mesh, logical_to_spec(SLOT_NAMES, rules, mesh))
  return KVCache(kv, kv, slots, slots, NamedSharding(mesh, logical_to_spec((), rules, mesh)))


def advance(cache: KVCache, positions_BxL: jax.Array, segment_ids_BxL: jax.Array, rules) -> KVCache:
  """The slot bookkeeping after writing L tokens at `cache.index` (keys and values are written per layer)."""
  at = (0, cache.index)
  segments = jax.lax.dynamic_update_slice(cache.segment_ids_BxS, segment_ids_BxL.astype(jnp.int32), at)
  positions = jax.lax.dynamic_update_slice(cache.positions_BxS, positions_BxL.astype(jnp.int32), at)
  return cache.replace(
    segment_ids_BxS=constrain(segments, SLOT_NAMES, rules), positions_BxS=constrain(positions, SLOT_NAMES, rules)
  )


def select_rows(cache: KVCache, rows_B: jax.Array, rules) -> KVCache:
  """The cache with row b taken from row rows_B[b] (beam search reorders its beams so)."""
  return cache.replace(
    k_XxBxSxKxH=constrain(jnp.take(cache.k_XxBxSxKxH, rows_B, axis=1), KV_NAMES, rules),
    v_XxBxSxKxH=constrain(jnp.take(cache.v_XxBxSxKxH, rows_B, axis=1), KV_NAMES, rules),
    segment_ids_BxS=constrain(jnp.take(cache.segment_ids_BxS, rows_B, axis=0), SLOT_NAMES, rules),
    positions_BxS=constrain(jnp.take(cache.positions_BxS, rows_B, axis=0), SLOT_NAMES, rules),
  )
