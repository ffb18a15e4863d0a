"""Self-attention with grouped KV heads (MHA, GQA and MQA): projections and RoPE here, the kernel in `attend`."""

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from model.attend import attend
from model.config import ModelConfig
from model.kv_cache import LayerCache
from model.layers import output_std, param, project, rope
from sharding.rules import constrain

_Q_NAMES = ("batch", "length", "heads", "head_dim")
_KV_NAMES = ("batch", "length", "kv_heads", "head_dim")


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

  def __call__(
    self, x_BxLxD: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array, cache: LayerCache | None = None
  ):
    """The attention output [B, L, D]; with a `cache`, (output, the cache with this call's keys and values)."""
    cfg = self.cfg
    dt = cfg.dtype
    q_BxLxNxH = project(x_BxLxD, self.wq_DxNxH, "BLD,DNH->BLNH", _Q_NAMES, name="attn_q", dtype=dt)
    k_BxSxKxH = project(x_BxLxD, self.wk_DxKxH, "BSD,DKH->BSKH", _KV_NAMES, name="attn_k", dtype=dt)
    v_BxSxKxH = project(x_BxLxD, self.wv_DxKxH, "BSD,DKH->BSKH", _KV_NAMES, name="attn_v", dtype=dt)
    if cfg.position_type == "rope":
      q_BxLxNxH = checkpoint_name(rope(q_BxLxNxH, positions_BxL, cfg.rope_theta), "attn_q_rope")
      k_BxSxKxH = checkpoint_name(rope(k_BxSxKxH, positions_BxL, cfg.rope_theta), "attn_k_rope")

    # KV cache (decoding): the new keys and values go into their slots, and the queries attend the whole cache.
    kv_segment_ids_BxS, kv_positions_BxS = segment_ids_BxL, positions_BxL
    if cache is not None:
      cache = cache.write(k_BxSxKxH, v_BxSxKxH)
      k_BxSxKxH, v_BxSxKxH = cache.k_BxSxKxH, cache.v_BxSxKxH
      kv_segment_ids_BxS, kv_positions_BxS = cache.segment_ids_BxS, cache.positions_BxS

    out_BxLxNxH = attend(
      q_BxLxNxH,
      k_BxSxKxH,
      v_BxSxKxH,
      q_segment_ids_BxL=segment_ids_BxL,
      kv_segment_ids_BxS=kv_segment_ids_BxS,
      q_positions_BxL=positions_BxL,
      kv_positions_BxS=kv_positions_BxS,
      impl=cfg.attention,
      block=cfg.attention_block,
    )
    out_BxLxNxH = checkpoint_name(constrain(out_BxLxNxH, _Q_NAMES), "attn_context")
    y_BxLxD = project(
      out_BxLxNxH, self.wo_NxHxD, "BLNH,NHD->BLD", ("batch", "length", "embed"), name="attn_o", dtype=dt
    )
    return y_BxLxD if cache is None else (y_BxLxD, cache)
