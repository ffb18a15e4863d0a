"""Building blocks shared by attention, MLP and the Transformer: parameters, norms, positions, dropout."""

import math

import jax
import jax.numpy as jnp
from flax import nnx


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], *, std: float, dtype) -> nnx.Param:
  """A normal-initialised parameter annotated with its logical axis names."""
  init = nnx.with_partitioning(nnx.initializers.normal(std), names)
  return nnx.Param(init(rngs.params(), shape, dtype))


def ones_param(shape: tuple[int, ...], names: tuple[str | None, ...], dtype) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(nnx.initializers.ones, names)(None, shape, dtype))


def zeros_param(shape: tuple[int, ...], names: tuple[str | None, ...], dtype) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, names)(None, shape, dtype))


class Norm(nnx.Module):
  """RMSNorm or LayerNorm over the last axis, computed in fp32."""

  def __init__(self, d: int, kind: str, eps: float, dtype):
    assert kind in ("rmsnorm", "layernorm"), kind
    self.kind, self.eps = kind, eps
    self.scale = ones_param((d,), ("norm",), dtype)
    if kind == "layernorm":
      self.bias = zeros_param((d,), ("norm",), dtype)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    x = x_BxLxD.astype(jnp.float32)
    if self.kind == "layernorm":
      x = x - x.mean(-1, keepdims=True)
    x = x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + self.eps)
    x = x * self.scale[...].astype(jnp.float32)
    if self.kind == "layernorm":
      x = x + self.bias[...].astype(jnp.float32)
    return x.astype(x_BxLxD.dtype)


def rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (rotate-half convention), computed in fp32."""
  half = x_BxLxNxH.shape[-1] // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLxH = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angle_BxLxH)[:, :, None, :], jnp.cos(angle_BxLxH)[:, :, None, :]
  x = x_BxLxNxH.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


def sinusoidal(positions_BxL: jax.Array, d: int) -> jax.Array:
  """The fixed sin/cos position encoding of "Attention is all you need"."""
  half = d // 2
  inv_freq = 10_000.0 ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angle_BxLxH = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  return jnp.concatenate([jnp.sin(angle_BxLxH), jnp.cos(angle_BxLxH)], axis=-1)


def dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
  """Inverted dropout; a no-op when `key` is None (evaluation) or the rate is 0."""
  if key is None or rate == 0.0:
    return x
  keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def output_std(init_std: float, num_layers: int) -> float:
  """GPT-2's scaled init for projections that write into the residual stream."""
  return init_std / math.sqrt(2 * num_layers)


__all__ = ["Norm", "dropout", "ones_param", "output_std", "param", "rope", "sinusoidal", "zeros_param"]
