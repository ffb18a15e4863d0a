"""Hugging Face `config.json` <-> kiln's model fields, both ways, as plain dicts.

Import accepts the architectures below and refuses, in one line, any setting that would change the math kiln
computes (an activation other than silu, a RoPE type it does not implement, MLP biases, ...). Export picks the
architecture from the model and refuses models that have no Hugging Face equivalent.
"""

from typing import Any, NoReturn

from model.config import ModelConfig
from settings import ConfigError

# Hugging Face architecture -> the family name used by `hf.weights` for parameter names.
ARCHITECTURES = {
  "LlamaForCausalLM": "llama",
  "MistralForCausalLM": "mistral",
  "Qwen3ForCausalLM": "qwen3",
  "MixtralForCausalLM": "mixtral",
  "Qwen3MoeForCausalLM": "qwen3_moe",
}
_MODEL_TYPES = {family: family for family in ARCHITECTURES.values()}
_WITH_ATTENTION_BIAS = ("llama", "qwen3", "qwen3_moe")  # their `attention_bias` puts biases on q, k, v and o


def architecture(hf: dict[str, Any]) -> str:
  """The family ("llama", "mistral", "qwen3", "mixtral", "qwen3_moe") of a Hugging Face config."""
  names = hf.get("architectures") or []
  if names:
    if names[0] not in ARCHITECTURES:
      raise ConfigError(
        f"Hugging Face architecture {names[0]!r} is not supported; convert_hf.py reads {', '.join(ARCHITECTURES)}"
      )
    return ARCHITECTURES[names[0]]
  model_type = hf.get("model_type")
  if model_type not in _MODEL_TYPES:
    raise ConfigError(
      f"Hugging Face model_type {model_type!r} is not supported; convert_hf.py reads {', '.join(ARCHITECTURES)}"
    )
  return model_type


def _refuse(field: str, value, why: str) -> NoReturn:
  raise ConfigError(f"Hugging Face config {field}={value!r} {why}; kiln cannot import this model")


def _rope_fields(hf: dict[str, Any]) -> dict[str, Any]:
  """RoPE theta and scaling from `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling` (older)."""
  params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
  if "full_attention" in params:  # per-layer-type parameters: every layer here is full attention
    params = dict(params["full_attention"])
  theta = params.get("rope_theta", hf.get("rope_theta", 10_000.0))
  kind = params.get("rope_type", params.get("type", "default"))
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    _refuse("rope_parameters.partial_rotary_factor", params["partial_rotary_factor"], "rotates part of each head")
  fields: dict[str, Any] = {"rope_theta": float(theta)}
  if kind == "default":
    return fields
  if kind not in ("linear", "llama3"):
    _refuse("rope_parameters.rope_type", kind, "is not implemented (kiln has default, linear and llama3)")
  fields.update(rope_scaling_type=kind, rope_scaling_factor=float(params["factor"]))
  if kind == "llama3":
    fields.update(
      rope_low_freq_factor=float(params["low_freq_factor"]),
      rope_high_freq_factor=float(params["high_freq_factor"]),
      rope_original_max_len=int(params["original_max_position_embeddings"]),
    )
  return fields


def kiln_fields(hf: dict[str, Any]) -> dict[str, dict[str, Any]]:
  """{"model": config.model fields, "moe": config.moe fields, "data": config.data fields} of a Hugging Face
  config; raises ConfigError (one line) for an unsupported architecture or setting."""
  family = architecture(hf)
  act = hf.get("hidden_act", "silu")
  if act != "silu":
    _refuse("hidden_act", act, "is not silu (kiln's swiglu)")
  if hf.get("mlp_bias"):
    _refuse("mlp_bias", True, "adds MLP biases")
  if hf.get("use_sliding_window"):
    _refuse("use_sliding_window", True, "windows only some layers")
  if any(kind != "full_attention" for kind in hf.get("layer_types") or []) and family != "mistral":
    _refuse("layer_types", hf["layer_types"], "mixes attention kinds across layers")
  num_heads, d_model = hf["num_attention_heads"], hf["hidden_size"]
  bias = bool(hf.get("attention_bias", False)) and family in _WITH_ATTENTION_BIAS
  model = {
    "num_layers": hf["num_hidden_layers"],
    "d_model": d_model,
    "num_heads": num_heads,
    "num_kv_heads": hf.get("num_key_value_heads") or num_heads,
    "head_dim": hf.get("head_dim") or d_model // num_heads,
    "mlp_dim": hf["intermediate_size"],
    "mlp_type": "swiglu",
    "norm_type": "rmsnorm",
    "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
    "position_type": "rope",
    "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
    "attention_bias": bias,
    "attention_out_bias": bias,
    "qk_norm": family in ("qwen3", "qwen3_moe"),
    "sliding_window": int(hf.get("sliding_window") or 0) if family in ("mistral", "mixtral") else 0,
    "vocab_multiple": hf["vocab_size"],  # the embedding keeps exactly the checkpoint's rows
    **_rope_fields(hf),
  }
  moe: dict[str, Any] = {"num_experts": 0}
  if family in ("mixtral", "qwen3_moe"):
    moe = {
      "num_experts": hf.get("num_local_experts") or hf.get("num_experts"),
      "top_k": hf["num_experts_per_tok"],
      "capacity_factor": 0.0,  # Hugging Face routes every token: dropless
      "router_score": "softmax",
      "renormalize_gates": family == "mixtral" or bool(hf.get("norm_topk_prob", False)),
      "num_shared_experts": 0,
      "every": 1,
      "expert_mlp_dim": hf["intermediate_size"],
      "aux_loss_weight": float(hf.get("router_aux_loss_coef", 0.01)),
    }
  if family == "qwen3_moe":
    if hf.get("mlp_only_layers"):
      _refuse("mlp_only_layers", hf["mlp_only_layers"], "places dense layers outside kiln's every-n pattern")
    step = hf.get("decoder_sparse_step", 1)
    if step < 1 or hf["num_hidden_layers"] % step:
      _refuse("decoder_sparse_step", step, f"does not divide num_hidden_layers={hf['num_hidden_layers']}")
    moe.update(every=step, expert_mlp_dim=hf["moe_intermediate_size"])
  data = {"vocab_size": hf["vocab_size"]}
  return {"model": model, "moe": moe, "data": data}


def hf_config(cfg: ModelConfig, *, dtype: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """The Hugging Face `config.json` of a kiln model (vocab_size = its embedding rows); ConfigError (one line)
  when it has no equivalent. `extra` (e.g. bos/eos token ids) is merged in."""
  family = export_family(cfg)
  hf: dict[str, Any] = {
    "architectures": [next(name for name, f in ARCHITECTURES.items() if f == family)],
    "model_type": family,
    "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model,
    "intermediate_size": cfg.mlp_dim,
    "num_hidden_layers": cfg.num_layers,
    "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.num_kv_heads,
    "head_dim": cfg.head_dim,
    "hidden_act": "silu",
    "rms_norm_eps": cfg.norm_eps,
    "max_position_embeddings": max(cfg.max_len, cfg.rope_original_max_len if cfg.rope_scaling_type else 0),
    "tie_word_embeddings": cfg.tie_embeddings,
    "rope_parameters": _hf_rope(cfg),
    "attention_dropout": 0.0,
    "dtype": dtype,
  }
  if family in _WITH_ATTENTION_BIAS:
    hf["attention_bias"] = cfg.attention_bias
  if family == "llama":
    hf["mlp_bias"] = False
  if family in ("mistral", "mixtral"):
    hf["sliding_window"] = cfg.sliding_window or None
  if family in ("qwen3", "qwen3_moe"):
    hf.update(use_sliding_window=False, sliding_window=None)
  if family in ("mixtral", "qwen3_moe"):
    hf.update(
      num_local_experts=cfg.num_experts,
      num_experts_per_tok=cfg.top_k,
      output_router_logits=False,
      router_jitter_noise=0.0,
    )
  if family == "qwen3_moe":
    hf.update(
      num_experts=cfg.num_experts,
      moe_intermediate_size=cfg.expert_mlp_dim or cfg.mlp_dim,
      decoder_sparse_step=cfg.moe_every,
      mlp_only_layers=[],
      norm_topk_prob=cfg.renormalize_gates,
    )
  hf.update(extra or {})
  return hf


def _hf_rope(cfg: ModelConfig) -> dict[str, Any]:
  rope: dict[str, Any] = {"rope_type": cfg.rope_scaling_type or "default", "rope_theta": cfg.rope_theta}
  if cfg.rope_scaling_type:
    rope["factor"] = cfg.rope_scaling_factor
  if cfg.rope_scaling_type == "llama3":
    rope.update(
      low_freq_factor=cfg.rope_low_freq_factor,
      high_freq_factor=cfg.rope_high_freq_factor,
      original_max_position_embeddings=cfg.rope_original_max_len,
    )
  return rope


def export_family(cfg: ModelConfig) -> str:
  """The Hugging Face family a kiln model maps to; ConfigError naming the first field that has none."""

  def no_equivalent(field: str, value) -> NoReturn:
    raise ConfigError(f"config.{field}={value!r} has no Hugging Face equivalent; this run cannot be exported")

  for field, value, ok in (
    ("model.norm_type", cfg.norm_type, "rmsnorm"),
    ("model.mlp_type", cfg.mlp_type, "swiglu"),
    ("model.position_type", cfg.position_type, "rope"),
    ("moe.router_score", cfg.router_score, "softmax"),
    ("moe.num_shared_experts", cfg.num_shared_experts, 0),
  ):
    if value != ok and (cfg.num_experts > 0 or not field.startswith("moe.")):
      no_equivalent(field, value)
  if cfg.attention_bias != cfg.attention_out_bias:
    no_equivalent("model.attention_bias", cfg.attention_bias)  # q/k/v biases without the output bias, or the reverse
  if cfg.num_experts > 0:
    if cfg.qk_norm:
      family = "qwen3_moe"
    elif cfg.moe_every != 1:
      no_equivalent("moe.every", cfg.moe_every)  # Mixtral has MoE in every layer; qk_norm models map to Qwen3-MoE
    elif cfg.expert_mlp_dim not in (0, cfg.mlp_dim):
      no_equivalent("moe.expert_mlp_dim", cfg.expert_mlp_dim)  # Mixtral's experts are intermediate_size wide
    elif not cfg.renormalize_gates:
      no_equivalent("moe.renormalize_gates", False)
    else:
      family = "mixtral"
  else:
    family = "qwen3" if cfg.qk_norm else "mistral" if cfg.sliding_window else "llama"
  if cfg.sliding_window and family.startswith("qwen3"):
    no_equivalent("model.sliding_window", cfg.sliding_window)  # Qwen3 windows only some layers
  if cfg.attention_bias and family not in _WITH_ATTENTION_BIAS:
    no_equivalent("model.attention_bias", True)
  return family
