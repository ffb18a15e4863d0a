"""Weight-only quantization of the dense projections, with qwix's QArray (google/qwix, the library MaxText and
Tunix quantize with).

A projection kernel W [lead..., in..., out...] (lead: the stacked "layers" axes) becomes a `qwix.QArray`:
integer values of W's shape and fp scales, W ~ qvalue * scale.
- int8: one scale per output channel (absmax over the input axes / 127.5), as LLM.int8's and qwix's
  per-channel weight quantization.
- int4: one scale per group of `group_size` consecutive inputs (along the last input axis) and output channel.
- nf4 (QLoRA's 4-bit NormalFloat, for `lora.base_quant`): int4's groups, values the 16 quantiles of a normal.

The quantized tree replaces the kernels in place, so the model's Params hold QArrays; `project` (model/layers.py)
dequantizes each in the compute dtype where the matmul reads it. Embeddings, the LM head, norms, biases, routers
and MoE experts stay as they were.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import qwix

# Projection kernel -> (input axes, output axes) of its value inside a layer (without the stacking axes).
PROJECTIONS = {
  "wq_DxNxH": (1, 2),
  "wk_DxKxH": (1, 2),
  "wv_DxKxH": (1, 2),
  "wo_NxHxD": (2, 1),
  "w_gate_DxF": (1, 1),
  "w_up_DxF": (1, 1),
  "w_down_FxD": (1, 1),
}
MODES = ("int8", "int4", "nf4")
_QTYPES = {"int8": jnp.int8, "int4": jnp.int4, "nf4": "nf4"}


def is_quantized(value) -> bool:
  return isinstance(value, qwix.QArray)


def _axes(name: str, ndim: int) -> tuple[list[int], list[int], list[int]]:
  """(lead, in, out) axes of kernel `name` with `ndim` dimensions."""
  n_in, n_out = PROJECTIONS[name]
  lead = ndim - n_in - n_out
  assert lead >= 0, (name, ndim)
  return list(range(lead)), list(range(lead, lead + n_in)), list(range(lead + n_in, ndim))


def group_of(dim: int, group_size: int) -> int:
  """The int4 (nf4) group along an input axis of `dim`: `group_size`, or the whole axis when it is shorter."""
  return min(dim, group_size)


def quantize_kernel(w: jax.Array, name: str, mode: str, group_size: int = 128) -> qwix.QArray:
  """Kernel `name` (a key of PROJECTIONS; its value may carry leading stacking axes) quantized as `mode`."""
  assert mode in MODES, mode
  lead, inputs, outputs = _axes(name, w.ndim)
  if mode == "int8":
    return qwix.quantize(w, _QTYPES[mode], channelwise_axes=lead + outputs)
  last = inputs[-1]
  group = group_of(w.shape[last], group_size)
  if w.shape[last] % group:
    raise ValueError(
      f"{name}: its input axis of {w.shape[last]} does not split into groups of {group_size}; "
      f"pass a --group_size that divides {w.shape[last]}"
    )
  return qwix.quantize(w, _QTYPES[mode], channelwise_axes=lead + inputs[:-1] + outputs, tiled_axes={last: group})


def dequantize(q: qwix.QArray, dtype) -> jax.Array:
  """The kernel in `dtype`: qvalue * scale computed in `dtype` (what the matmul reads)."""
  return qwix.dequantize(q.astype(dtype))


def quantize_params(params: dict, mode: str, group_size: int = 128) -> dict:
  """Params with every projection kernel replaced by its QArray (`mode` int8 or int4); other leaves unchanged.
  Runs jitted: each kernel's QArray lands where the kernel was."""
  if mode not in MODES:
    raise ValueError(f"quantization {mode!r} is not one of {', '.join(MODES)}")
  if group_size < 1:
    raise ValueError(f"--group_size={group_size}; give a positive number of inputs per int4 scale")

  def walk(tree: dict) -> dict:
    return {
      k: walk(v) if isinstance(v, dict) else (quantize_kernel(v, k, mode, group_size) if k in PROJECTIONS else v)
      for k, v in tree.items()
    }

  return jax.jit(walk)(params)


def shardings_of(quantized: dict, shardings: dict) -> dict:
  """Shardings of `quantized` (QArrays where `shardings` has one NamedSharding per kernel): the integers as the
  kernel, the scales by the same spec except on the axes they are too short to split (per-channel int8 has one
  scale per input axis)."""

  def place(q, sharding):
    if not is_quantized(q):
      return sharding
    mesh, spec = sharding.mesh, tuple(sharding.spec) + (None,) * (q.ndim - len(sharding.spec))

    def fits(dim, axes):
      names = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
      return dim % math.prod(mesh.shape[a] for a in names) == 0

    scale_spec = [axes if fits(d, axes) else None for d, axes in zip(q.scale.shape, spec, strict=True)]
    scale = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*scale_spec))
    return dataclasses.replace(q, qvalue=sharding, scale=scale)

  return jax.tree.map(place, quantized, shardings, is_leaf=is_quantized)


def count_weights(tree: dict) -> int:
  """Weights in a tree, a QArray counting the elements it stands for (not its scales)."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree, is_leaf=is_quantized))


def dequantize_params(params: dict, dtype=jnp.float32) -> dict:
  """Every QArray of `params` back to a plain array in `dtype`."""
  return jax.tree.map(lambda v: dequantize(v, dtype) if is_quantized(v) else v, params, is_leaf=is_quantized)


def leaf_bits(x) -> int:
  """Bits per element as the accelerators store the leaf (int4 packed two to a byte)."""
  dtype = jnp.dtype(x.dtype)
  return 4 if dtype in (jnp.int4, jnp.uint4) else 8 * dtype.itemsize


def bytes_per_device(params: dict) -> int:
  """Bytes of `params` held by the most loaded device (shards of every array, int4 counted at 4 bits)."""
  per_device: dict = {}
  for leaf in jax.tree.leaves(params):
    for shard in leaf.addressable_shards:
      n = math.prod(shard.data.shape) * leaf_bits(leaf) // 8
      per_device[shard.device] = per_device.get(shard.device, 0) + n
  return max(per_device.values(), default=0)


# A quantized export (scripts/export_params.py --quantize) holds the QArrays themselves and this file beside them.
QUANT_FILE = "quantization.json"


def saved_quantization(source: str) -> dict | None:
  """{"mode", "group_size"} of a quantized export (`source` as storage.run.checkpoint_path names it), else None."""
  import json

  from storage import as_path

  path = as_path(source) / QUANT_FILE
  return json.loads(path.read_text()) if path.is_file() else None


def describe(mode: str, group_size: int) -> dict:
  """What QUANT_FILE records: the group size only where it means something (int4)."""
  return {"mode": mode, "group_size": group_size if mode == "int4" else 0}


def abstract_quantized(abstract_params: dict, mode: str, group_size: int) -> dict:
  """The QArray tree `quantize_params` makes of `abstract_params` (ShapeDtypeStructs), each part in the sharding
  of the kernel it came from: what a quantized export restores into."""
  shapes = jax.eval_shape(lambda p: quantize_params(p, mode, max(group_size, 1)), abstract_params)

  def place(q, a):
    if not is_quantized(q):
      return a
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=a.sharding), q)

  return jax.tree.map(place, shapes, abstract_params, is_leaf=is_quantized)


# Quantized training (model.quant): both operands of a projection's matmul quantized --------------------------------

TRAINING_MODES = ("int8", "fp8")


def qt_dot(mode: str, x2: jax.Array, w2: jax.Array, kernel_first: bool) -> jax.Array:
  """x2 [tokens, in] times w2 ([in, out] if `kernel_first`, else [out, in]) with both quantized per channel
  (x per token, w per output), through qwix's quantized-training dot (a custom VJP: the backward pass takes the
  gradient through the quantized operands). int8: int8 forward, gradients in the compute dtype. fp8: e4m3 forward
  and e5m2 gradients, as fp8 training recipes have it."""
  from qwix._src.core import dot_general_qt  # what qwix's QtProvider runs for each dot; pinned qwix==0.1.8

  assert mode in TRAINING_MODES, mode
  if mode == "int8":
    config = dot_general_qt.DotGeneralQtConfig(lhs_qtype=jnp.int8, rhs_qtype=jnp.int8)
  else:
    config = dot_general_qt.DotGeneralQtConfig(
      lhs_qtype=jnp.float8_e4m3fn,
      rhs_qtype=jnp.float8_e4m3fn,
      dlhs_grad_qtype=jnp.float8_e5m2,
      drhs_grad_qtype=jnp.float8_e5m2,
    )
  dims = (((1,), (0,) if kernel_first else (1,)), ((), ()))
  return dot_general_qt.dot_general_qt(x2, w2, dims, config)
