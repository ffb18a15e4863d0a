"""The model's own view of the configuration: plain, frozen, validated numbers."""

import dataclasses
import math

import jax.numpy as jnp

from model.layers import RopeScaling
from model.lora import parse_targets
from parallel.rules import DEFAULT_RULES, freeze, parse_rules

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


# Config keys whose ModelConfig field has another name.
_RENAMED = {
  "moe.every": "moe_every",
  "lora.rank": "lora_rank",
  "lora.alpha": "lora_alpha",
  "lora.dropout": "lora_dropout",
  "lora.targets": "lora_targets",
}
# A group whose fields mean nothing while this key is 0 in both configs (a dense model's moe.*, lora.* without LoRA).
_SWITCHES = {"moe": "num_experts", "lora": "rank"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Architecture:
  """What a checkpoint's weights mean: sizes, variants, positions, experts, adapters. A resume must keep them."""

  vocab_size: int  # embedding rows, already padded (see `padded_vocab_size`)
  max_len: int  # longest sequence the positions support
  num_layers: int = 4
  d_model: int = 256
  num_heads: int = 4
  num_kv_heads: int = 4
  head_dim: int = 64
  mlp_dim: int = 1024
  mlp_type: str = "swiglu"
  norm_type: str = "rmsnorm"
  norm_eps: float = 1e-6
  position_type: str = "rope"
  rope_theta: float = 10_000.0
  rope_scaling_type: str = ""  # "" | linear | llama3 (model/layers.py: RopeScaling)
  rope_scaling_factor: float = 1.0
  rope_low_freq_factor: float = 1.0
  rope_high_freq_factor: float = 4.0
  rope_original_max_len: int = 8192
  attention_bias: bool = False  # biases on the q, k and v projections
  attention_out_bias: bool = False  # a bias on the output projection
  qk_norm: bool = False  # RMSNorm over head_dim of q and k (one weight per head_dim, shared by heads), before RoPE
  sliding_window: int = 0  # > 0: query at position p sees keys at positions > p - sliding_window
  tie_embeddings: bool = True
  init_std: float = 0.02
  param_dtype: str = "float32"
  # Mixture of experts (num_experts == 0: every MLP is dense).
  num_experts: int = 0
  top_k: int = 2
  moe_every: int = 1
  num_shared_experts: int = 0
  expert_mlp_dim: int = 0
  router_score: str = "softmax"
  renormalize_gates: bool = True
  # LoRA (lora_rank == 0: off): adapters on the projections named in lora_targets ("attn_q", "mlp_up", ...).
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_targets: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Execution:
  """How a step computes with those weights: any of these may change on any resume."""

  compute_dtype: str = "float32"
  remat: str = "none"
  scan_unroll: int = 1  # units (layers) per iteration of the layer scan; compile time grows with it
  attention: str = "auto"  # model/attend.py: auto | xla | chunked | cudnn | splash
  attention_block: int = 512  # keys per block of the chunked attention
  context_parallel: str = "all_gather"  # with mesh.context > 1: all_gather | ring (parallel/context.py)
  loss_chunk: int = 0  # > 0: the loss computes logits this many positions at a time (model/loss.py)
  dropless_impl: str = "auto"  # dropless expert exchange: auto | ragged (GPU/TPU) | buffer (model/moe.py)
  # How many token copies an expert takes per routing group (<= 0: all of them, dropless); the experts' weights
  # mean the same with any capacity.
  capacity_factor: float = 1.25
  group_size: int = 512  # capacity path: tokens per routing group (a sequence is cut into groups this long)
  dropout_rate: float = 0.0  # training only: the weights mean the same with any rate
  lora_dropout: float = 0.0
  quant: str = ""  # "" | int8 | fp8: the projections' matmuls quantized in training (model/quant.py, qwix)
  # The platform the program is compiled for (cpu | gpu | tpu; parallel/target.py): it picks what attention=auto
  # and dropless_impl=auto stand for, and the backward passes and residual layouts made for XLA:CPU. Set from the
  # run's target, never read from jax.default_backend() while tracing, so a TPU compile from a CPU host is the
  # TPU's program.
  platform: str = "cpu"
  # Logical axis -> mesh axes (parallel/rules.py, `freeze`d): where activations are pinned on the mesh the step
  # is traced under. The rules are passed to every layer through this field, never read from a global.
  rules: tuple[tuple[str, tuple[str, ...]], ...] = freeze(parse_rules(DEFAULT_RULES))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig(Architecture, Execution):
  """The model's own view of the configuration, plain, frozen and validated: an Architecture and an Execution
  in one namespace (`cfg.d_model`, `cfg.remat`); `architecture` and `execution` give the two parts apart."""

  @property
  def architecture(self) -> Architecture:
    return Architecture(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Architecture)})

  @property
  def execution(self) -> Execution:
    return Execution(**{f.name: getattr(self, f.name) for f in dataclasses.fields(Execution)})

  @property
  def rope_scaling(self) -> RopeScaling | None:
    if not self.rope_scaling_type:
      return None
    return RopeScaling(
      self.rope_scaling_type,
      self.rope_scaling_factor,
      self.rope_low_freq_factor,
      self.rope_high_freq_factor,
      self.rope_original_max_len,
    )

  @property
  def dtype(self):
    return _DTYPES[self.compute_dtype]

  @property
  def weight_dtype(self):
    return _DTYPES[self.param_dtype]

  @classmethod
  def from_config(
    cls, model_cfg, moe_cfg, *, vocab_size: int, max_len: int, lora_cfg=None, rules=None, platform: str = "cpu"
  ) -> "ModelConfig":
    """Builds from `config.model` and `config.moe` (and `config.lora`, when given: a model with adapters);
    `vocab_size` must already be padded. `rules`: the run's logical-axis rules (a mapping), default the defaults.
    `platform`: the target's (cpu | gpu | tpu)."""
    head_dim = model_cfg.head_dim or model_cfg.d_model // model_cfg.num_heads
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: v for k, v in model_cfg.items() if k in fields}
    moe_names = {"every": "moe_every"}
    kwargs.update({moe_names.get(k, k): v for k, v in moe_cfg.items() if moe_names.get(k, k) in fields})
    kwargs.update(vocab_size=vocab_size, max_len=max_len, head_dim=head_dim, platform=platform)
    if lora_cfg is not None and lora_cfg.rank > 0:
      kwargs.update(
        lora_rank=lora_cfg.rank,
        lora_alpha=float(lora_cfg.alpha),
        lora_dropout=float(lora_cfg.dropout),
        lora_targets=parse_targets(lora_cfg.targets),
      )
    if rules is not None:
      kwargs["rules"] = freeze(rules)
    return cls(**kwargs)


def field_of_key(key: str) -> str:
  """The ModelConfig field a config key (`group.name` of model, moe or lora) sets."""
  return _RENAMED.get(key, key.split(".", 1)[1])


def architecture_changes(saved: dict, current: dict) -> list[str]:
  """`group.key: old -> new` for every config key of an Architecture field that differs between two resolved
  configs (as dicts); a key absent from `saved` (written before it existed) is taken at its current value."""
  architecture = {f.name for f in dataclasses.fields(Architecture)}
  changes = []
  for group in ("model", "moe", "lora"):
    switch = _SWITCHES.get(group)
    if switch and not saved.get(group, {}).get(switch, 0) and not current.get(group, {}).get(switch, 0):
      continue
    for name, value in current.get(group, {}).items():
      key = f"{group}.{name}"
      old = saved.get(group, {}).get(name, value)
      if field_of_key(key) in architecture and old != value:
        changes.append(f"{key}: {old} -> {value}")
  return changes


def padded_vocab_size(tokenizer_vocab: int, multiple: int, tensor_parallelism: int = 1) -> int:
  """Rounds the embedding up so it splits evenly over the tensor axis; the tokenizer is unchanged."""
  step = math.lcm(max(multiple, 1), max(tensor_parallelism, 1))
  return -(-tokenizer_vocab // step) * step
