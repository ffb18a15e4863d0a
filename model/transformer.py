"""The decoder-only Transformer: embeddings, a scanned stack of pre-norm blocks, final norm, LM head."""

import jax
import jax.numpy as jnp
from flax import nnx

from model.attention import Attention
from model.config import ModelConfig
from model.layers import Norm, dropout, param, sinusoidal
from model.mlp import Mlp
from sharding.rules import constrain

_REMAT_POLICIES = {
  "full": jax.checkpoint_policies.nothing_saveable,
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)); returns the new residual and this layer's auxiliary outputs."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.attn_norm = Norm(cfg.d_model, cfg.norm_type, cfg.norm_eps, cfg.weight_dtype)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = Norm(cfg.d_model, cfg.norm_type, cfg.norm_eps, cfg.weight_dtype)
    self.mlp = Mlp(cfg, rngs)

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, dropout_key):
    rate = self.cfg.dropout_rate
    attn_key, mlp_key = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    h_BxLxD = self.attn(self.attn_norm(x_BxLxD), positions_BxL, segment_ids_BxL)
    x_BxLxD = constrain(x_BxLxD + dropout(h_BxLxD, rate, attn_key), ("batch", "length", "embed"))
    h_BxLxD = self.mlp(self.mlp_norm(x_BxLxD))
    x_BxLxD = constrain(x_BxLxD + dropout(h_BxLxD, rate, mlp_key), ("batch", "length", "embed"))
    return x_BxLxD, {}


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    assert cfg.position_type in ("rope", "learned", "sinusoidal"), cfg.position_type
    self.cfg = cfg
    wd = cfg.weight_dtype
    self.embed_VxD = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std=cfg.init_std, dtype=wd)
    if cfg.position_type == "learned":
      self.pos_embed_LxD = param(rngs, (cfg.max_len, cfg.d_model), (None, "embed"), std=cfg.init_std, dtype=wd)

    # Layer parameters are stacked on a leading "layers" axis so the blocks run under one scan: compile time
    # does not grow with depth, and a pipeline can later split the axis into stages.
    @nnx.split_rngs(splits=cfg.num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(rngs):
      return Block(cfg, rngs)

    self.blocks = make_blocks(rngs)
    self.final_norm = Norm(cfg.d_model, cfg.norm_type, cfg.norm_eps, wd)
    if not cfg.tie_embeddings:
      self.head_DxV = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std, dtype=wd)

  def __call__(
    self,
    tokens_BxL: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    *,
    dropout_key: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns fp32 logits [B, L, V] and auxiliary outputs summed over layers (empty for a dense model).

    `dropout_key` None means deterministic (evaluation); a key turns dropout on.
    """
    cfg = self.cfg
    dt = cfg.dtype
    x_BxLxD = jnp.take(self.embed_VxD[...], tokens_BxL, axis=0).astype(dt)
    if cfg.position_type == "learned":
      x_BxLxD = x_BxLxD + jnp.take(self.pos_embed_LxD[...], positions_BxL, axis=0).astype(dt)
    elif cfg.position_type == "sinusoidal":
      x_BxLxD = x_BxLxD + sinusoidal(positions_BxL, cfg.d_model).astype(dt)
    embed_key, layers_key = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    x_BxLxD = constrain(dropout(x_BxLxD, cfg.dropout_rate, embed_key), ("batch", "length", "embed"))

    def body(x_BxLxD, block, key):
      return block(x_BxLxD, positions_BxL, segment_ids_BxL, key)

    if cfg.remat != "none":
      body = nnx.remat(body, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
    layer_keys = jax.random.split(layers_key, cfg.num_layers) if layers_key is not None else None
    scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0 if layer_keys is not None else None), out_axes=(nnx.Carry, 0))
    x_BxLxD, aux_X = scan(x_BxLxD, self.blocks, layer_keys)

    x_BxLxD = self.final_norm(x_BxLxD)
    if cfg.tie_embeddings:
      logits_BxLxV = jnp.einsum(
        "BLD,VD->BLV", x_BxLxD, self.embed_VxD[...].astype(dt), preferred_element_type=jnp.float32
      )
    else:
      logits_BxLxV = jnp.einsum(
        "BLD,DV->BLV", x_BxLxD, self.head_DxV[...].astype(dt), preferred_element_type=jnp.float32
      )
    logits_BxLxV = constrain(logits_BxLxV, ("batch", "length", "vocab"))
    return logits_BxLxV, jax.tree.map(jnp.sum, aux_X)
