"""Building blocks shared by attention, MLP and the Transformer: parameters, projections, norms, positions,
dropout."""

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from model.quant import dequantize, is_quantized, qt_dot
from parallel.rules import constrain


def param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple[str | None, ...], *, std: float, dtype) -> nnx.Param:
  """A normal-initialised parameter annotated with its logical axis names."""
  init = nnx.with_partitioning(nnx.initializers.normal(std), names)
  return nnx.Param(init(rngs.params(), shape, dtype))


def ones_param(shape: tuple[int, ...], names: tuple[str | None, ...], dtype) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(nnx.initializers.ones, names)(None, shape, dtype))


def zeros_param(shape: tuple[int, ...], names: tuple[str | None, ...], dtype) -> nnx.Param:
  return nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, names)(None, shape, dtype))


def kernel_names(kernel: nnx.Param, ndim: int) -> tuple[str | None, ...]:
  """The logical axis names of a parameter as the model sees it: inside the layer scan the leading stacking
  axes ("layers") are gone from the value but still in the metadata."""
  names = tuple(kernel.get_metadata()["out_sharding"])
  assert set(names[: len(names) - ndim]) <= {"layers"}, names
  return names[len(names) - ndim :]


def cast_kernel(kernel: nnx.Param, dtype, rules) -> jax.Array:
  """The weight in `dtype`, pinned to its stored sharding: the cast happens on each device's shard, so the
  all-gather that FSDP needs afterwards moves `dtype` (bf16) bytes, not fp32."""
  w = kernel[...]
  return constrain(w.astype(dtype), kernel_names(kernel, w.ndim), rules)


def matmul_einsum(
  spec: str, x: jax.Array, w: jax.Array, preferred_element_type=None, *, platform: str, quant: str = ""
) -> jax.Array:
  """`jnp.einsum(spec, x, w)` computed as one 2-D matmul [tokens, in] x [in, out] when the spec allows it.

  That is when x's contracted dimensions trail it, the output is x's leading dimensions then w's free ones, and w
  holds its contracted dimensions all first or all last ("BLD,DF->BLF", "BLNH,NHD->BLD", "BLD,VD->BLV").
  Autodiff of the 2-D form takes the weight gradient as one [in, tokens] x [tokens, out] matmul. Of the einsum it
  contracts two dimensions (batch and length), and XLA:CPU then writes a transposed copy of the output gradient
  first, with the elementwise backward before it fused into that strided write: a slow extra pass over one of the
  step's largest arrays per projection, which the 2-D form does not make. Any other spec is a plain einsum.

  `quant` (int8 | fp8, ModelConfig.quant): the 2-D matmul multiplies quantized x and w (`model.quant.qt_dot`).
  """
  inputs, out = spec.split("->")
  xs, ws = inputs.split(",")
  contracted = "".join(c for c in xs if c in ws)
  lead, free = xs[: len(xs) - len(contracted)], "".join(c for c in ws if c not in xs)
  kernel_first = ws == contracted + free
  if not (xs == lead + contracted and out == lead + free and (kernel_first or ws == free + contracted)):
    return jnp.einsum(spec, x, w, preferred_element_type=preferred_element_type)
  n_in, n_out = math.prod(x.shape[len(lead) :]), math.prod(d for c, d in zip(ws, w.shape) if c in free)
  free_shape = w.shape[len(contracted) :] if kernel_first else w.shape[: len(free)]
  w2 = w.reshape((n_in, n_out) if kernel_first else (n_out, n_in))
  out_dtype = jnp.dtype(preferred_element_type or jnp.result_type(x, w))
  if quant:
    y2 = qt_dot(quant, x.reshape(-1, n_in), w2, kernel_first).astype(out_dtype)
  elif platform == "cpu":
    y2 = _matmul_row_major(kernel_first, out_dtype, x, w2)
  else:
    dims = (((1,), (0,) if kernel_first else (1,)), ((), ()))
    y2 = jax.lax.dot_general(x.reshape(-1, n_in), w2, dims, preferred_element_type=out_dtype)
  return y2.reshape(x.shape[: len(lead)] + tuple(free_shape))


def as_residual(x: jax.Array, platform: str) -> jax.Array:
  """`x` as a custom backward keeps it: in a program for the CPU (`platform`) a bf16 array as its uint16 bits.
  XLA:CPU's bf16 normalization computes every update and read of a layer scan's stacked bf16 residuals in fp32 and
  converts whole stacks ahead of the backward loop, which costs step time and holds fp32 copies of the saved
  activations. A uint16 stack it leaves alone. `from_residual` undoes this."""
  if x.dtype == jnp.bfloat16 and platform == "cpu":
    return jax.lax.bitcast_convert_type(x, jnp.uint16)
  return x


def from_residual(x: jax.Array) -> jax.Array:
  """The array `as_residual` kept."""
  return jax.lax.bitcast_convert_type(x, jnp.bfloat16) if x.dtype == jnp.uint16 else x


def transposed_copy(a: jax.Array) -> jax.Array:
  """a [..., m, n] as [..., n, m], written out row-major. XLA folds a bare transpose into the dot that reads it
  (a TN or NT dot); through a unit dimension it stays a copy."""
  *lead, m, n = a.shape
  r = len(lead)
  return a.reshape(*lead, m, n, 1).transpose(*range(r), r + 2, r + 1, r).reshape(*lead, n, m)


def _dot(a: jax.Array, b: jax.Array, out_dtype, *, b_transposed: bool = False) -> jax.Array:
  """a [m, k] @ b [k, n] (or @ b.T for b [n, k] if `b_transposed`), accumulated in (at least) fp32, as a dot
  XLA:CPU runs on XNNPACK at full rate: NN, or NT in fp32."""
  dtype = jnp.result_type(a, b)
  a, b = a.astype(dtype), b.astype(dtype)
  if b_transposed and dtype != jnp.float32:
    b, b_transposed = transposed_copy(b), False
  dims = (((1,), (1,) if b_transposed else (0,)), ((), ()))
  acc = jnp.promote_types(out_dtype, jnp.float32)
  return jax.lax.dot_general(a, b, dims, preferred_element_type=acc).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _matmul_row_major(kernel_first: bool, out_dtype, x: jax.Array, w2: jax.Array) -> jax.Array:
  """x [..., in] (its trailing dimensions making up `in`) as [tokens, in], times w2 ([in, out] if `kernel_first`,
  else [out, in]), accumulated in fp32, with every dot of the forward and backward pass in a form XLA:CPU runs
  at full rate; for the CPU backend.

  XLA:CPU runs a dot on XNNPACK in NN form, and in NT form for fp32. It runs a bf16 dot with bf16 arithmetic
  only in NN form with an fp32 result, at about twice the fp32 rate (docs/performance.md has the measured peaks);
  any other bf16 dot (a bf16 result, a transposed operand) it converts to fp32 first. A TN dot (the weight
  gradient x^T dy that autodiff writes) runs on Eigen, below the rate of an fp32 NN dot. So the
  weight gradient (and in bf16 every dot with a transposed operand) reads a transposed copy, which costs one
  pass over the smaller operand.

  The backward keeps x itself, not its 2-D view: projections of one input (q, k and v) then share one saved
  activation, which a layer scan stores once rather than once per projection, and XLA takes its transposed
  copy once.
  """
  return _dot(_rows(x, w2, kernel_first), w2, out_dtype, b_transposed=not kernel_first)


def _rows(x: jax.Array, w2: jax.Array, kernel_first: bool) -> jax.Array:
  """x as [tokens, in] for the weight w2."""
  return x.reshape(-1, w2.shape[0] if kernel_first else w2.shape[1])


def _matmul_row_major_fwd(kernel_first, out_dtype, x, w2):
  return _matmul_row_major(kernel_first, out_dtype, x, w2), (as_residual(x, "cpu"), as_residual(w2, "cpu"))


def _matmul_row_major_bwd(kernel_first, out_dtype, residuals, dy2):
  x, w2 = map(from_residual, residuals)
  x2 = _rows(x, w2, kernel_first)
  dx = _dot(dy2, w2, x.dtype, b_transposed=kernel_first).reshape(x.shape)
  # The weight gradient as x^T dy ([in, out]) or dy^T x ([out, in]), then turned to w2's layout if it is not in
  # it already: whichever copies fewer elements.
  tokens, n_in, n_out = x2.shape[0], x2.shape[1], dy2.shape[1]
  cost_in_out = tokens * n_in + (0 if kernel_first else n_in * n_out)
  cost_out_in = tokens * n_out + (n_in * n_out if kernel_first else 0)
  if cost_in_out <= cost_out_in:
    dw2 = _dot(transposed_copy(x2), dy2, w2.dtype)
    return dx, dw2 if kernel_first else transposed_copy(dw2)
  dw2 = _dot(transposed_copy(dy2), x2, w2.dtype)
  return dx, transposed_copy(dw2) if kernel_first else dw2


_matmul_row_major.defvjp(_matmul_row_major_fwd, _matmul_row_major_bwd)


def project(
  x: jax.Array,
  kernel: nnx.Param,
  spec: str,
  out_names: Sequence[str | None],
  *,
  name: str,
  dtype,
  rules,
  platform: str,
  out_dtype=None,
  adapter: Callable[[jax.Array, str, object, jax.Array | None], jax.Array] | None = None,
  adapter_key: jax.Array | None = None,
  quant: str = "",
) -> jax.Array:
  """`einsum(spec, x, kernel)` in `dtype`, the one dense projection of the model; `rules` lay its weight and
  output out on the mesh of JAX's context; `platform` is the target's (ModelConfig.platform).

  Owns the cast before the FSDP gather (`cast_kernel`), the logical axes of the output (`out_names`), its
  `checkpoint_name` (`name`, which remat policies select) and the LoRA adapter's term. `out_dtype` (e.g. fp32 logits)
  is the accumulation and output type; the input's gradient flows back in `dtype`, so the backward pass gathers
  the weight in `dtype` too, and the weight's gradient stays in `out_dtype`.

  `quant` (int8 | fp8): the matmul of x and the kernel quantized, for training (`matmul_einsum`); not with `out_dtype`.

  `adapter` (a LoRA `model.lora.Adapter`, or None) adds its low-rank term `adapter(x, spec, dtype, key)` to the
  projection; `adapter_key` is its dropout key (None: no dropout).
  """

  kernel_array = kernel.get_value()
  if is_quantized(kernel_array):  # weight-only quantized (model/quant.py): the matmul reads it in `dtype`
    kernel_array = dequantize(kernel_array, dtype)
  names = kernel_names(kernel, kernel_array.ndim)
  if out_dtype is not None and jnp.dtype(out_dtype) != jnp.dtype(dtype):
    wide = (jnp.dtype(dtype), jnp.dtype(out_dtype))
    y = _einsum_wide_out(spec, *wide, names, rules, platform, x.astype(dtype), kernel_array)
  else:
    w = constrain(kernel_array.astype(dtype), names, rules)
    y = matmul_einsum(spec, x.astype(dtype), w, platform=platform, quant=quant)
  if adapter is not None:
    y = y + adapter(x, spec, dtype, adapter_key).astype(y.dtype)
  return checkpoint_name(constrain(y, out_names, rules), name)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3, 4, 5))
def _einsum_wide_out(spec: str, dtype, out_dtype, names, rules, platform: str, x, kernel):
  """einsum(x, kernel cast to `dtype`) accumulated and returned in `out_dtype` (fp32 logits from bf16)."""
  return _einsum_wide_out_fwd(spec, dtype, out_dtype, names, rules, platform, x, kernel)[0]


def _einsum_wide_out_fwd(spec, dtype, out_dtype, names, rules, platform, x, kernel):
  w = constrain(kernel.astype(dtype), names, rules)
  return matmul_einsum(spec, x, w, preferred_element_type=out_dtype, platform=platform), (x, w, kernel)


def _einsum_wide_out_bwd(spec, dtype, out_dtype, names, rules, platform, residuals, dy):
  x, w, kernel = residuals
  # dx needs the gathered weight: dy goes down to `dtype` first, or autodiff would widen the weight and gather
  # the wide copy (twice the bytes).
  _, vjp_x = jax.vjp(lambda x: matmul_einsum(spec, x, w, platform=platform), x)
  (dx,) = vjp_x(dy.astype(dtype))
  # dkernel needs no weight, only local activations: it stays in `out_dtype`, and so does its reduction over
  # the batch shards, as plain autodiff of the wide einsum had it.
  _, vjp_w = jax.vjp(lambda w: matmul_einsum(spec, x.astype(out_dtype), w, platform=platform), w.astype(out_dtype))
  (dw,) = vjp_w(dy)
  # The barrier gives the gradient its sharded form here, where it is made. Its sum over the batch shards is an
  # all-reduce of the whole [in, out] array and a slice of it (XLA:CPU has no reduce-scatter, and TPU's compiler
  # decomposes reduce-scatters so on 3-D tori), and TPU's scheduler took that slice only where the optimizer reads
  # it, after the backward pass of the layer stack: the whole fp32 sum (the LM head's: d_model x vocab) stayed
  # live through it, at the step's peak (docs/performance.md).
  return dx, jax.lax.optimization_barrier(constrain(dw.astype(kernel.dtype), names, rules))


_einsum_wide_out.defvjp(_einsum_wide_out_fwd, _einsum_wide_out_bwd)


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


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """How RoPE's frequencies are stretched for longer contexts (Hugging Face's `rope_parameters`).

  kind "linear": every inverse frequency divided by `factor` (position interpolation). kind "llama3": Llama 3.1's
  rule: wavelengths above original_max_len / low_freq_factor divided by `factor`, those below
  original_max_len / high_freq_factor kept, the band between interpolated smoothly.
  """

  kind: str
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
  """[H / 2] inverse frequencies theta^(-2i/H), i < H/2, then `scaling` applied; fp32."""
  half = head_dim // 2
  inv_freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  if scaling is None:
    return inv_freq
  assert scaling.kind in ("linear", "llama3"), scaling.kind
  if scaling.kind == "linear":
    return inv_freq / scaling.factor
  low_freq_wavelen = scaling.original_max_len / scaling.low_freq_factor
  high_freq_wavelen = scaling.original_max_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (scaling.original_max_len / wavelen - scaling.low_freq_factor) / (
    scaling.high_freq_factor - scaling.low_freq_factor
  )
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return jnp.where(medium, smoothed, scaled)


def rope(x_BxLxNxH: jax.Array, positions_BxL: jax.Array, theta: float, scaling: RopeScaling | None = None) -> jax.Array:
  """Rotary position embedding, computed in fp32. Rotate-half convention with inverse frequencies
  theta^(-2i/H) (`rope_inv_freq`): the same as Hugging Face's Llama, so its checkpoints load without permuting
  q and k."""
  half = x_BxLxNxH.shape[-1] // 2
  inv_freq = rope_inv_freq(x_BxLxNxH.shape[-1], theta, scaling)
  angle_BxLxH = positions_BxL[..., None].astype(jnp.float32) * inv_freq
  sin, cos = jnp.sin(angle_BxLxH)[:, :, None, :], jnp.cos(angle_BxLxH)[:, :, None, :]
  # Split before widening, and each rotated half rounded to x's dtype before the halves are joined: the values of
  # rotating all of x in fp32, but autodiff then carries the halves' gradients in x's dtype, not fp32. TPU stores
  # a half of a 128-wide head padded to 128 lanes, and fp32 halves of q's and k's gradients were the largest
  # buffers at the peak of a bf16 layer's backward pass (docs/performance.md).
  x1, x2 = x_BxLxNxH[..., :half].astype(jnp.float32), x_BxLxNxH[..., half:].astype(jnp.float32)
  dt = x_BxLxNxH.dtype
  return jnp.concatenate([(x1 * cos - x2 * sin).astype(dt), (x2 * cos + x1 * sin).astype(dt)], axis=-1)


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


__all__ = [
  "Norm",
  "RopeScaling",
  "cast_kernel",
  "dropout",
  "kernel_names",
  "ones_param",
  "output_std",
  "param",
  "project",
  "rope",
  "rope_inv_freq",
  "sinusoidal",
  "zeros_param",
]
