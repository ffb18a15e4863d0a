"""Causal self-attention with grouped KV heads (MHA, GQA and MQA) and packed-document masking."""

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import output_std, param, rope
from sharding.rules import constrain


def attention_mask(segment_ids_BxL: jax.Array) -> jax.Array:
  """[B, L, S] True where query l may attend key s: causal, and only within its own document (segment)."""
  length = segment_ids_BxL.shape[1]
  causal_LxS = jnp.arange(length)[:, None] >= jnp.arange(length)[None, :]
  same_doc_BxLxS = segment_ids_BxL[:, :, None] == segment_ids_BxL[:, None, :]
  return causal_LxS[None] & same_doc_BxLxS


class Attention(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    assert cfg.num_heads % cfg.num_kv_heads == 0, "num_heads must be a multiple of num_kv_heads"
    self.cfg = cfg
    d, n, k, h, wd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.weight_dtype
    self.wq_DxNxH = param(rngs, (d, n, h), ("embed", "heads", "head_dim"), std=cfg.init_std, dtype=wd)
    self.wk_DxKxH = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std=cfg.init_std, dtype=wd)
    self.wv_DxKxH = param(rngs, (d, k, h), ("embed", "kv_heads", "head_dim"), std=cfg.init_std, dtype=wd)
    std_out = output_std(cfg.init_std, cfg.num_layers)
    self.wo_NxHxD = param(rngs, (n, h, d), ("heads", "head_dim", "embed"), std=std_out, dtype=wd)

  def __call__(self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array) -> jax.Array:
    cfg = self.cfg
    dt = cfg.dtype
    q_BxLxNxH = jnp.einsum("BLD,DNH->BLNH", x_BxLxD, self.wq_DxNxH[...].astype(dt))
    k_BxSxKxH = jnp.einsum("BSD,DKH->BSKH", x_BxLxD, self.wk_DxKxH[...].astype(dt))
    v_BxSxKxH = jnp.einsum("BSD,DKH->BSKH", x_BxLxD, self.wv_DxKxH[...].astype(dt))
    q_BxLxNxH = constrain(q_BxLxNxH, ("batch", "length", "heads", "head_dim"))
    k_BxSxKxH = constrain(k_BxSxKxH, ("batch", "length", "kv_heads", "head_dim"))
    v_BxSxKxH = constrain(v_BxSxKxH, ("batch", "length", "kv_heads", "head_dim"))
    if cfg.position_type == "rope":
      q_BxLxNxH = rope(q_BxLxNxH, positions_BxL, cfg.rope_theta)
      k_BxSxKxH = rope(k_BxSxKxH, positions_BxL, cfg.rope_theta)

    b, length, n, h = q_BxLxNxH.shape
    k = cfg.num_kv_heads
    q_BxLxKxGxH = q_BxLxNxH.reshape(b, length, k, n // k, h)
    logits_BxKxGxLxS = jnp.einsum("BLKGH,BSKH->BKGLS", q_BxLxKxGxH, k_BxSxKxH, preferred_element_type=jnp.float32)
    logits_BxKxGxLxS = logits_BxKxGxLxS * (h**-0.5)
    mask_Bx1x1xLxS = attention_mask(segment_ids_BxL)[:, None, None]
    logits_BxKxGxLxS = jnp.where(mask_Bx1x1xLxS, logits_BxKxGxLxS, jnp.finfo(jnp.float32).min)
    probs_BxKxGxLxS = jax.nn.softmax(logits_BxKxGxLxS, axis=-1).astype(dt)
    out_BxLxKxGxH = jnp.einsum("BKGLS,BSKH->BLKGH", probs_BxKxGxLxS, v_BxSxKxH)
    out_BxLxNxH = constrain(out_BxLxKxGxH.reshape(b, length, n, h), ("batch", "length", "heads", "head_dim"))
    return jnp.einsum("BLNH,NHD->BLD", out_BxLxNxH, self.wo_NxHxD[...].astype(dt))
