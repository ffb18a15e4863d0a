"""LoRA: low-rank adapters on the dense projections, and the split of the parameters into adapters and base.

A projection y = x W with a kernel W [in..., out...] (e.g. wq [D, N, H]: in D, out N H) gets an adapter
A [in..., R], B [R, out...]: y = x W + (alpha / R) * dropout(x) A B. A starts normal with std
1/sqrt(fan_in) (Kaiming), B at zero, so a new adapter leaves the model unchanged.

The adapters are parameters of the model itself (`lora_q`, `lora_up`, ... beside the kernel they adapt, with
the kernel's logical axis names and an unsharded rank axis), so they are stacked per layer, scanned with the
blocks and sharded by the same rules. Training splits the parameter tree by path (`split`): the adapters are
trained and checkpointed, the rest is the frozen base. MoE expert MLPs use their own einsums
and take no adapters; on an MoE model LoRA targets the attention projections only.
"""

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from model.layers import cast_kernel, dropout, param, zeros_param

# config.lora.targets entry -> (the `project` name it adapts, the adapter's attribute, the kernel's attribute).
TARGETS = {
  "q": ("attn_q", "lora_q", "wq_DxNxH"),
  "k": ("attn_k", "lora_k", "wk_DxKxH"),
  "v": ("attn_v", "lora_v", "wv_DxKxH"),
  "o": ("attn_o", "lora_o", "wo_NxHxD"),
  "gate": ("mlp_gate", "lora_gate", "w_gate_DxF"),
  "up": ("mlp_up", "lora_up", "w_up_DxF"),
  "down": ("mlp_down", "lora_down", "w_down_FxD"),
}
_ADAPTER_KERNEL = {adapter: kernel for _, adapter, kernel in TARGETS.values()}
_PREFIX = "lora_"


def parse_targets(targets: str) -> tuple[str, ...]:
  """ "q,v" (config.lora.targets) -> ("attn_q", "attn_v"); unknown entries are left for settings.validate."""
  names = [t.strip() for t in targets.split(",") if t.strip()]
  return tuple(TARGETS[t][0] for t in names if t in TARGETS)


class Adapter(nnx.Module):
  """delta y = scale * dropout(x) A B for a kernel of shape in_shape + out_shape, with its logical names."""

  def __init__(
    self,
    rngs: nnx.Rngs,
    name: str,
    in_shape: tuple[int, ...],
    out_shape: tuple[int, ...],
    names: tuple[str | None, ...],
    *,
    rank: int,
    alpha: float,
    dropout_rate: float,
    dtype,
    rules,
  ):
    n_in = len(in_shape)
    # Kaiming: x A keeps the scale of x whatever the fan-in; B = 0 makes the adapter start as a no-op.
    # A stream of its own ("lora" when the Rngs has one) leaves the base's random init that of a model
    # without adapters.
    key_rngs = nnx.Rngs(params=rngs["lora"]()) if "lora" in rngs else rngs
    std = 1.0 / math.sqrt(math.prod(in_shape))
    self.a = param(key_rngs, (*in_shape, rank), (*names[:n_in], None), std=std, dtype=dtype)
    self.b = zeros_param((rank, *out_shape), (None, *names[n_in:]), dtype)
    self.scale = alpha / rank
    self.dropout_rate = dropout_rate
    self.rules = rules
    self.key_index = 1 + sorted(t[0] for t in TARGETS.values()).index(name)

  def __call__(self, x: jax.Array, spec: str, dtype, key: jax.Array | None) -> jax.Array:
    """The adapter's term of `einsum(spec, x, kernel)`, in `dtype`. `key` is the layer's dropout key (None: no
    dropout, evaluation); each adapter folds in its own index, so its mask is independent of the others'."""
    a_spec, b_spec = _adapter_specs(spec)
    if key is not None:
      key = jax.random.fold_in(key, self.key_index)
    x = dropout(x.astype(dtype), self.dropout_rate, key)
    h = jnp.einsum(a_spec, x, cast_kernel(self.a, dtype, self.rules))
    return jnp.einsum(b_spec, h, cast_kernel(self.b, dtype, self.rules)) * jnp.asarray(self.scale, dtype)


def _adapter_specs(spec: str) -> tuple[str, str]:
  """ "BLD,DNH->BLNH" -> ("BLD,DR->BLR", "BLR,RNH->BLNH"): x A, then (x A) B, with R the rank."""
  lhs, out = spec.split("->")
  x_spec, k_spec = lhs.split(",")
  n_in = sum(c in x_spec for c in k_spec)
  k_in, k_out = k_spec[:n_in], k_spec[n_in:]
  assert "R" not in spec and set(k_in) <= set(x_spec) and not set(k_out) & set(x_spec), spec
  mid = "".join(c for c in x_spec if c not in k_in) + "R"
  return f"{x_spec},{k_in}R->{mid}", f"{mid},R{k_out}->{out}"


def make(cfg, rngs: nnx.Rngs, name: str, kernel: nnx.Param, n_in: int) -> Adapter | None:
  """The adapter of projection `name` (e.g. "attn_q") for `kernel`, whose first `n_in` axes are contracted;
  None when `cfg` (a ModelConfig) does not target it."""
  if cfg.lora_rank == 0 or name not in cfg.lora_targets:
    return None
  shape = kernel[...].shape
  names = tuple(kernel.get_metadata()["out_sharding"])
  return Adapter(
    rngs,
    name,
    shape[:n_in],
    shape[n_in:],
    names,
    rank=cfg.lora_rank,
    alpha=cfg.lora_alpha,
    dropout_rate=cfg.lora_dropout,
    dtype=cfg.weight_dtype,
    rules=cfg.rules,
  )


def is_adapter(path: Sequence) -> bool:
  """True for a parameter path (keys or jax key entries) inside an adapter."""
  return any(str(getattr(k, "key", k)).startswith(_PREFIX) for k in path)


def split(params: dict) -> tuple[dict, dict]:
  """A nested parameter dict -> (adapters, base): disjoint trees of the same nesting, empty groups dropped."""
  adapters, base = {}, {}
  for key, value in params.items():
    if str(key).startswith(_PREFIX):
      adapters[key] = value
    elif isinstance(value, dict):
      a, b = split(value)
      if a:
        adapters[key] = a
      if b:
        base[key] = b
    else:
      base[key] = value
  return adapters, base


def combine(adapters: dict, base: dict) -> dict:
  """The inverse of `split`: the union of two disjoint nested dicts."""
  out = dict(base)
  for key, value in adapters.items():
    out[key] = combine(value, out[key]) if isinstance(value, dict) and key in out else value
  return out


def merge(params: dict, scale: float) -> dict:
  """Params with adapters -> plain params: every adapted kernel W becomes W + scale * A B (in fp32, then
  W's dtype), the adapters dropped. `scale` is alpha / rank. Works on stacked [layers, ...] trees."""
  out = {}
  for key, value in params.items():
    if not str(key).startswith(_PREFIX):
      out[key] = merge(value, scale) if isinstance(value, dict) else value
  for adapter, kernel in _ADAPTER_KERNEL.items():
    if adapter in params:
      out[kernel] = _merged_kernel(out[kernel], params[adapter]["a"], params[adapter]["b"], scale)
  return out


def _merged_kernel(w, a, b, scale: float):
  """W [lead..., in..., out...] + scale * A [lead..., in..., R] B [lead..., R, out...]."""
  lead = a.ndim + b.ndim - 2 - w.ndim
  n_in = a.ndim - lead - 1
  fan_in = math.prod(a.shape[lead : lead + n_in])
  a2 = jnp.reshape(a, (*a.shape[:lead], fan_in, a.shape[-1])).astype(jnp.float32)
  b2 = jnp.reshape(b, (*b.shape[: lead + 1], -1)).astype(jnp.float32)
  delta = jnp.matmul(a2, b2, precision=jax.lax.Precision.HIGHEST).reshape(w.shape)
  return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
