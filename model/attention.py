"""Self-attention with grouped KV heads (MHA, GQA and MQA): projections and RoPE here, the kernel in `attend`."""

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from model import lora
from model.attend import attend
from model.config import ModelConfig
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
    # LoRA adapters (None where config.lora does not target the projection).
    self.lora_q = lora.make(cfg, rngs, "attn_q", self.wq_DxNxH, n_in=1)
    self.lora_k = lora.make(cfg, rngs, "attn_k", self.wk_DxKxH, n_in=1)
    self.lora_v = lora.make(cfg, rngs, "attn_v", self.wv_DxKxH, n_in=1)
    self.lora_o = lora.make(cfg, rngs, "attn_o", self.wo_NxHxD, n_in=2)

  def __call__(
    self,
    x_BxLxD: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    *,
    dropout_key: jax.Array | None = None,
  ) -> jax.Array:
    """`dropout_key` (training only) drives the LoRA adapters' dropout."""
    cfg = self.cfg
    dt = cfg.dtype
    q_BxLxNxH = project(
      x_BxLxD,
      self.wq_DxNxH,
      "BLD,DNH->BLNH",
      _Q_NAMES,
      name="attn_q",
      dtype=dt,
      adapter=self.lora_q,
      adapter_key=dropout_key,
    )
    k_BxSxKxH = project(
      x_BxLxD,
      self.wk_DxKxH,
      "BSD,DKH->BSKH",
      _KV_NAMES,
      name="attn_k",
      dtype=dt,
      adapter=self.lora_k,
      adapter_key=dropout_key,
    )
    v_BxSxKxH = project(
      x_BxLxD,
      self.wv_DxKxH,
      "BSD,DKH->BSKH",
      _KV_NAMES,
      name="attn_v",
      dtype=dt,
      adapter=self.lora_v,
      adapter_key=dropout_key,
    )
    if cfg.position_type == "rope":
      q_BxLxNxH = checkpoint_name(rope(q_BxLxNxH, positions_BxL, cfg.rope_theta), "attn_q_rope")
      k_BxSxKxH = checkpoint_name(rope(k_BxSxKxH, positions_BxL, cfg.rope_theta), "attn_k_rope")

    out_BxLxNxH = attend(
      q_BxLxNxH,
      k_BxSxKxH,
      v_BxSxKxH,
      q_segment_ids_BxL=segment_ids_BxL,
      kv_segment_ids_BxS=segment_ids_BxL,
      q_positions_BxL=positions_BxL,
      kv_positions_BxS=positions_BxL,
      impl=cfg.attention,
      block=cfg.attention_block,
    )
    out_BxLxNxH = checkpoint_name(constrain(out_BxLxNxH, _Q_NAMES), "attn_context")
    out_names = ("batch", "length", "embed")
    return project(
      out_BxLxNxH,
      self.wo_NxHxD,
      "BLNH,NHD->BLD",
      out_names,
      name="attn_o",
      dtype=dt,
      adapter=self.lora_o,
      adapter_key=dropout_key,
    )
