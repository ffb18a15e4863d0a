"""Position-wise feed-forward block: SwiGLU or GELU."""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from model import lora
from model.config import ModelConfig
from model.layers import as_residual, from_residual, output_std, param, project
from parallel.rules import constrain


def activate(kind: str, gate: jax.Array | None, up: jax.Array, platform: str) -> jax.Array:
  """The MLP nonlinearity: silu(gate) * up for SwiGLU, gelu(up) for GELU (shared with the MoE experts). A program
  for the CPU (`platform`) takes `gelu`'s own backward; other compilers fuse autodiff's well."""
  if kind == "swiglu":
    return jax.nn.silu(gate) * up
  return gelu(up) if platform == "cpu" else jax.nn.gelu(up, approximate=True)


_GELU_C = math.sqrt(2.0 / math.pi)


@jax.custom_vjp
def gelu(x: jax.Array) -> jax.Array:
  """`jax.nn.gelu` (tanh approximation) whose backward keeps only x. Autodiff of the formula keeps five
  [B, L, F] intermediates per layer, and XLA:CPU fuses reading them back into the transposed copy that feeds
  the weight gradient, a fusion that took a fifth of bench_peer's fp32 step."""
  return jax.nn.gelu(x, approximate=True)


def _gelu_fwd(x):
  return gelu(x), as_residual(x, "cpu")


def _gelu_bwd(x, dy):
  xf = from_residual(x).astype(jnp.float32)
  t = jnp.tanh(_GELU_C * (xf + 0.044715 * xf**3))
  grad = 0.5 * (1.0 + t) + 0.5 * xf * (1.0 - t * t) * _GELU_C * (1.0 + 3 * 0.044715 * xf * xf)
  return ((dy.astype(jnp.float32) * grad).astype(dy.dtype),)


gelu.defvjp(_gelu_fwd, _gelu_bwd)


class Mlp(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, mlp_dim: int | None = None):
    assert cfg.mlp_type in ("swiglu", "gelu"), cfg.mlp_type
    self.cfg = cfg
    d, f, wd = cfg.d_model, mlp_dim or cfg.mlp_dim, cfg.weight_dtype
    if cfg.mlp_type == "swiglu":
      self.w_gate_DxF = param(rngs, (d, f), ("embed", "mlp"), std=cfg.init_std, dtype=wd)
    self.w_up_DxF = param(rngs, (d, f), ("embed", "mlp"), std=cfg.init_std, dtype=wd)
    self.w_down_FxD = param(rngs, (f, d), ("mlp", "embed"), std=output_std(cfg.init_std, cfg.num_layers), dtype=wd)
    # LoRA adapters (None where config.lora does not target the projection).
    self.lora_gate = lora.make(cfg, rngs, "mlp_gate", self.w_gate_DxF, n_in=1) if cfg.mlp_type == "swiglu" else None
    self.lora_up = lora.make(cfg, rngs, "mlp_up", self.w_up_DxF, n_in=1)
    self.lora_down = lora.make(cfg, rngs, "mlp_down", self.w_down_FxD, n_in=1)

  def __call__(self, x_BxLxD: jax.Array, *, dropout_key: jax.Array | None = None) -> jax.Array:
    """`dropout_key` (training only) drives the LoRA adapters' dropout."""
    cfg, names = self.cfg, ("batch", "length", "mlp")
    proj = functools.partial(
      project, dtype=cfg.dtype, rules=cfg.rules, platform=cfg.platform, adapter_key=dropout_key, quant=cfg.quant
    )
    up_BxLxF = proj(x_BxLxD, self.w_up_DxF, "BLD,DF->BLF", names, name="mlp_up", adapter=self.lora_up)
    gate_BxLxF = None
    if cfg.mlp_type == "swiglu":
      gate_BxLxF = proj(x_BxLxD, self.w_gate_DxF, "BLD,DF->BLF", names, name="mlp_gate", adapter=self.lora_gate)
    hidden_BxLxF = constrain(activate(cfg.mlp_type, gate_BxLxF, up_BxLxF, cfg.platform), names, cfg.rules)
    h_BxLxF = checkpoint_name(hidden_BxLxF, "mlp_hidden")
    out_names = ("batch", "length", "embed")
    return proj(h_BxLxF, self.w_down_FxD, "BLF,FD->BLD", out_names, name="mlp_down", adapter=self.lora_down)
