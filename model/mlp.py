"""Position-wise feed-forward block: SwiGLU or GELU."""

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from model.config import ModelConfig
from model.layers import output_std, param, project
from sharding.rules import constrain


def activate(kind: str, gate: jax.Array | None, up: jax.Array) -> jax.Array:
  """The MLP nonlinearity: silu(gate) * up for SwiGLU, gelu(up) for GELU (shared with the MoE experts)."""
  if kind == "swiglu":
    return jax.nn.silu(gate) * up
  return jax.nn.gelu(up)


class Mlp(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, mlp_dim: int | None = None):
    assert cfg.mlp_type in ("swiglu", "gelu"), cfg.mlp_type
    self.cfg = cfg
    d, f, wd = cfg.d_model, mlp_dim or cfg.mlp_dim, cfg.weight_dtype
    if cfg.mlp_type == "swiglu":
      self.w_gate_DxF = param(rngs, (d, f), ("embed", "mlp"), std=cfg.init_std, dtype=wd)
    self.w_up_DxF = param(rngs, (d, f), ("embed", "mlp"), std=cfg.init_std, dtype=wd)
    self.w_down_FxD = param(rngs, (f, d), ("mlp", "embed"), std=output_std(cfg.init_std, cfg.num_layers), dtype=wd)

  def __call__(self, x_BxLxD: jax.Array) -> jax.Array:
    dt, names = self.cfg.dtype, ("batch", "length", "mlp")
    up_BxLxF = project(x_BxLxD, self.w_up_DxF, "BLD,DF->BLF", names, name="mlp_up", dtype=dt)
    gate_BxLxF = None
    if self.cfg.mlp_type == "swiglu":
      gate_BxLxF = project(x_BxLxD, self.w_gate_DxF, "BLD,DF->BLF", names, name="mlp_gate", dtype=dt)
    h_BxLxF = checkpoint_name(constrain(activate(self.cfg.mlp_type, gate_BxLxF, up_BxLxF), names), "mlp_hidden")
    return project(h_BxLxF, self.w_down_FxD, "BLF,FD->BLD", ("batch", "length", "embed"), name="mlp_down", dtype=dt)
