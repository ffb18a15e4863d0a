"""Self-attention with grouped KV heads (MHA, GQA and MQA): projections and RoPE here, the kernel in `attend`."""

import functools

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from model import lora
from model.attend import attend
from model.config import ModelConfig
from model.kv_cache import LayerCache
from model.layers import Norm, output_std, param, project, rope, zeros_param
from parallel import context
from parallel.rules import constrain

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
    if cfg.attention_bias:
      # Flat [N * H] (heads major), one axis like every bias: the optimizer's decay mask leaves it alone.
      self.bq_NH = zeros_param((n * h,), ("heads",), wd)
      self.bk_KH = zeros_param((k * h,), ("kv_heads",), wd)
      self.bv_KH = zeros_param((k * h,), ("kv_heads",), wd)
    if cfg.attention_out_bias:
      self.bo_D = zeros_param((d,), ("embed",), wd)
    if cfg.qk_norm:
      self.q_norm = Norm(h, "rmsnorm", cfg.norm_eps, wd)
      self.k_norm = Norm(h, "rmsnorm", cfg.norm_eps, wd)
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
    cache: LayerCache | None = None,
    *,
    dropout_key: jax.Array | None = None,
  ):
    """The attention output [B, L, D]; with a `cache`, (output, the cache with this call's keys and values).
    `dropout_key` (training only) drives the LoRA adapters' dropout."""
    cfg = self.cfg
    dt, n, k, h, r = cfg.dtype, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rules
    proj = functools.partial(
      project, dtype=dt, rules=r, platform=cfg.platform, adapter_key=dropout_key, quant=cfg.quant
    )
    q_BxLxNxH = proj(x_BxLxD, self.wq_DxNxH, "BLD,DNH->BLNH", _Q_NAMES, name="attn_q", adapter=self.lora_q)
    k_BxSxKxH = proj(x_BxLxD, self.wk_DxKxH, "BSD,DKH->BSKH", _KV_NAMES, name="attn_k", adapter=self.lora_k)
    v_BxSxKxH = proj(x_BxLxD, self.wv_DxKxH, "BSD,DKH->BSKH", _KV_NAMES, name="attn_v", adapter=self.lora_v)
    if cfg.attention_bias:
      q_BxLxNxH = q_BxLxNxH + self.bq_NH[...].reshape(n, h).astype(dt)
      k_BxSxKxH = k_BxSxKxH + self.bk_KH[...].reshape(k, h).astype(dt)
      v_BxSxKxH = v_BxSxKxH + self.bv_KH[...].reshape(k, h).astype(dt)
    if cfg.qk_norm:
      q_BxLxNxH, k_BxSxKxH = self.q_norm(q_BxLxNxH), self.k_norm(k_BxSxKxH)
    if cfg.position_type == "rope":
      q_BxLxNxH = checkpoint_name(rope(q_BxLxNxH, positions_BxL, cfg.rope_theta, cfg.rope_scaling), "attn_q_rope")
      k_BxSxKxH = checkpoint_name(rope(k_BxSxKxH, positions_BxL, cfg.rope_theta, cfg.rope_scaling), "attn_k_rope")

    # KV cache (decoding): the new keys and values go into their slots, and the queries attend the whole cache.
    kv_segment_ids_BxS, kv_positions_BxS = segment_ids_BxL, positions_BxL
    if cache is not None:
      cache = cache.write(k_BxSxKxH, v_BxSxKxH, r)
      k_BxSxKxH, v_BxSxKxH = cache.k_BxSxKxH, cache.v_BxSxKxH
      kv_segment_ids_BxS, kv_positions_BxS = cache.segment_ids_BxS, cache.positions_BxS

    if cache is None and context.size() > 1:  # the sequence is split over mesh.context (decoding never is)
      out_BxLxNxH = context.attend(
        q_BxLxNxH,
        k_BxSxKxH,
        v_BxSxKxH,
        segment_ids_BxL=segment_ids_BxL,
        positions_BxL=positions_BxL,
        strategy=cfg.context_parallel,
        impl=cfg.attention,
        block=cfg.attention_block,
        sliding_window=cfg.sliding_window,
        rules=r,
        platform=cfg.platform,
      )
    else:
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
        sliding_window=cfg.sliding_window,
        rules=r,
        platform=cfg.platform,
      )
    out_BxLxNxH = checkpoint_name(constrain(out_BxLxNxH, _Q_NAMES, r), "attn_context")
    out_names = ("batch", "length", "embed")
    out_BxLxD = proj(out_BxLxNxH, self.wo_NxHxD, "BLNH,NHD->BLD", out_names, name="attn_o", adapter=self.lora_o)
    if cfg.attention_out_bias:
      out_BxLxD = out_BxLxD + self.bo_D[...].astype(dt)
    return out_BxLxD if cache is None else (out_BxLxD, cache)
