"""Every static check of a config, run before the backend starts: one line per problem, naming the key and the fix."""

import math
from collections.abc import Sequence

import ml_collections

import objectives
from model.attend import BACKENDS as ATTENTION_BACKENDS
from model.attend import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from model.attend import SPLASH_BLOCK
from model.lora import TARGETS
from model.moe import DROPLESS_IMPLS, RAGGED_BACKENDS
from model.transformer import REMAT_POLICIES
from parallel.context import STRATEGIES as CONTEXT_STRATEGIES
from parallel.mesh import MeshError
from parallel.partition import BATCH_AXES
from parallel.rules import DEFAULT_RULES, entry_axes, logical_to_spec
from settings import ConfigError
from trainer.optim import DECAY_SHAPES, OPTIMIZERS, SCHEDULES


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _one_of(cfg, key: str, choices: Sequence[str]) -> None:
  group, name = key.split(".")
  value = cfg[group][name]
  _require(value in choices, f"config.{key}={value!r} is not one of {', '.join(choices)}; pick one of them")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks values and their combinations; raises ConfigError with one line naming the key and the fix."""
  _validate_sizes_and_choices(cfg)
  _validate_model(cfg)
  _validate_training(cfg)
  _validate_moe(cfg)
  _validate_lora(cfg)
  _require(
    cfg.model.quant in ("", "int8", "fp8"),
    f"config.model.quant={cfg.model.quant!r} must be int8, fp8 or empty (the projections' matmuls in compute_dtype)",
  )
  _validate_objective(cfg)


def _validate_sizes_and_choices(cfg: ml_collections.ConfigDict) -> None:
  for key in (
    "model.num_layers",
    "model.d_model",
    "model.num_heads",
    "model.num_kv_heads",
    "model.mlp_dim",
    "data.seq_len",
    "data.vocab_size",
    "train.steps",
    "train.global_batch_size",
    "train.grad_accum",
    "train.log_every",
    "train.eval_every",
    "checkpoint.every_steps",
  ):
    group, name = key.split(".")
    _require(cfg[group][name] > 0, f"config.{key}={cfg[group][name]} must be positive")
  for key in ("eval_tasks_every", "eval_tasks_limit"):
    _require(cfg.train.get(key, 0) >= 0, f"config.train.{key}={cfg.train.get(key)} must be 0 or more")
  _one_of(cfg, "model.mlp_type", ("swiglu", "gelu"))
  _one_of(cfg, "model.norm_type", ("rmsnorm", "layernorm"))
  _one_of(cfg, "model.position_type", ("rope", "learned", "sinusoidal"))
  _one_of(cfg, "model.compute_dtype", ("float32", "bfloat16"))
  _one_of(cfg, "model.param_dtype", ("float32", "bfloat16"))
  _one_of(cfg, "model.remat", tuple(REMAT_POLICIES))
  _one_of(cfg, "model.attention", ATTENTION_IMPLEMENTATIONS)
  _one_of(cfg, "model.context_parallel", CONTEXT_STRATEGIES)
  _one_of(cfg, "moe.router_score", ("softmax", "sigmoid"))
  _one_of(cfg, "data.tokenizer_type", ("bpe", "unigram"))
  _one_of(cfg, "data.invalid_utf8", ("replace", "skip"))
  _one_of(cfg, "pipeline.schedule", ("gpipe", "circular", "1f1b"))


def _validate_model(cfg: ml_collections.ConfigDict) -> None:
  m = cfg.model
  _require(m.attention_block > 0, f"config.model.attention_block={m.attention_block} must be positive")
  _require(
    m.attention != "splash" or cfg.data.seq_len % SPLASH_BLOCK == 0,
    f"config.model.attention='splash' needs data.seq_len a multiple of {SPLASH_BLOCK} (its block), not "
    f"{cfg.data.seq_len}; change data.seq_len, or use auto (xla at such lengths)",
  )
  for problem in field_problems(m):  # RoPE scaling, sliding window, scan
    _require(False, problem)
  _require(
    m.d_model % m.num_heads == 0 or m.head_dim > 0,
    f"config.model.d_model={m.d_model} is not divisible by config.model.num_heads={m.num_heads}; "
    "change one of them or set config.model.head_dim",
  )
  _require(
    m.num_heads % m.num_kv_heads == 0,
    f"config.model.num_heads={m.num_heads} is not a multiple of config.model.num_kv_heads={m.num_kv_heads}; "
    "pick num_kv_heads that divides num_heads (num_heads: MHA, 1: MQA)",
  )
  head_dim = m.head_dim or m.d_model // m.num_heads
  _require(
    m.position_type != "rope" or head_dim % 2 == 0,
    f"rope needs an even head dim, got {head_dim}; change config.model.head_dim or config.model.num_heads",
  )
  _require(
    m.position_type != "sinusoidal" or m.d_model % 2 == 0,
    f"sinusoidal positions need an even config.model.d_model, got {m.d_model}",
  )
  _require(0.0 <= m.dropout_rate < 1.0, f"config.model.dropout_rate={m.dropout_rate} must be in [0, 1)")
  _require(
    m.param_dtype == "float32" or m.allow_low_precision_params,
    f"config.model.param_dtype={m.param_dtype} keeps the master weights in {m.param_dtype}, where small updates "
    "round away; keep float32 (config.model.compute_dtype=bfloat16 gives bf16 speed), or set "
    "config.model.allow_low_precision_params=True if you mean it",
  )


def _validate_training(cfg: ml_collections.ConfigDict) -> None:
  """The optimizer, the batch, the pipeline's schedule, the rules and the held-out split."""
  t, o = cfg.train, cfg.optim
  _require(
    o.warmup_steps < t.steps,
    f"config.optim.warmup_steps={o.warmup_steps} leaves no step after warmup (config.train.steps={t.steps}); "
    "make warmup_steps smaller than steps",
  )
  _require(o.warmup_steps >= 0, f"config.optim.warmup_steps={o.warmup_steps} must be >= 0")
  _require(o.peak_lr > 0, f"config.optim.peak_lr={o.peak_lr} must be positive")
  _require(
    0 <= o.final_lr <= o.peak_lr,
    f"config.optim.final_lr={o.final_lr} must be between 0 and config.optim.peak_lr={o.peak_lr}",
  )
  _require(o.zero_stage in (0, 1, 2), f"config.optim.zero_stage={o.zero_stage} must be 0, 1 or 2 (fsdp is ZeRO-3)")
  _validate_optimizer(o, t.steps)
  pipe = cfg.pipeline
  _require(pipe.microbatches > 0, f"config.pipeline.microbatches={pipe.microbatches} must be positive")
  _require(
    (pipe.repeats > 1) == (pipe.schedule == "circular"),
    f"config.pipeline.repeats={pipe.repeats} with schedule {pipe.schedule!r}: circular needs repeats > 1 "
    "(layer chunks per stage), gpipe and 1f1b take repeats=1",
  )
  _require(
    t.global_batch_size % t.grad_accum == 0,
    f"config.train.global_batch_size={t.global_batch_size} is not divisible by "
    f"config.train.grad_accum={t.grad_accum}; make the batch a multiple of grad_accum",
  )
  unknown_rules = set(DEFAULT_RULES) - set(cfg.mesh.rules)
  _require(not unknown_rules, f"config.mesh.rules lacks {sorted(unknown_rules)}; every logical axis needs a rule")
  _require(0 <= cfg.data.eval_fraction < 1, "config.data.eval_fraction must be in [0, 1)")


def _validate_optimizer(o: ml_collections.ConfigDict, steps: int) -> None:
  """optim.optimizer, optim.schedule and the keys they read."""
  for key, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("decay_shape", DECAY_SHAPES)):
    _require(o[key] in choices, f"config.optim.{key}={o[key]!r} is not one of {', '.join(choices)}; pick one of them")
  _require(0 < o.decay_fraction <= 1, f"config.optim.decay_fraction={o.decay_fraction} must be in (0, 1]")
  decay_steps = round(o.decay_fraction * steps)
  _require(
    o.schedule != "wsd" or o.warmup_steps <= steps - decay_steps,
    f"config.optim.warmup_steps={o.warmup_steps} runs into wsd's decay over the last {decay_steps} of "
    f"config.train.steps={steps}; make warmup_steps or config.optim.decay_fraction smaller",
  )
  _require(0 <= o.muon_momentum < 1, f"config.optim.muon_momentum={o.muon_momentum} must be in [0, 1)")
  _require(o.muon_lr_multiplier > 0, f"config.optim.muon_lr_multiplier={o.muon_lr_multiplier} must be positive")


def _validate_moe(cfg: ml_collections.ConfigDict) -> None:
  m, moe = cfg.model, cfg.moe
  if moe.num_experts > 0:
    _require(
      0 < moe.top_k <= moe.num_experts,
      f"config.moe.top_k={moe.top_k} must be between 1 and config.moe.num_experts={moe.num_experts}",
    )
    _require(
      moe.every > 0 and m.num_layers % moe.every == 0,
      f"config.model.num_layers={m.num_layers} is not divisible by config.moe.every={moe.every}",
    )
    _require(moe.group_size > 0, f"config.moe.group_size={moe.group_size} must be positive (tokens per routing group)")


def _validate_objective(cfg: ml_collections.ConfigDict) -> None:
  """train.objective names an objective, and the keys it reads hold values it can use."""
  try:
    objective = objectives.get(cfg.train.objective)
  except objectives.ObjectiveError as e:
    raise ConfigError(str(e)) from None
  for problem in objective.config_problems(cfg):
    _require(False, problem)


def _validate_lora(cfg: ml_collections.ConfigDict) -> None:
  lc = cfg.lora
  problem = lora_problem(lc.rank, lc.alpha, lc.dropout, lc.targets, cfg.moe.num_experts)
  _require(problem is None, problem or "")
  _require(
    lc.rank == 0 or not cfg.checkpoint.init_optimizer_state,
    "config.checkpoint.init_optimizer_state=True with LoRA: the base run's optimizer state is the full model's, "
    "not the adapters'; set it False (checkpoint.init_from still names the base)",
  )
  _require(
    lc.base_quant in ("", "int8", "int4", "nf4"),
    f"config.lora.base_quant={lc.base_quant!r} must be one of int8, int4, nf4 (or empty: the base unquantized)",
  )
  _require(
    not lc.base_quant or lc.rank > 0,
    f"config.lora.base_quant={lc.base_quant} quantizes a LoRA run's frozen base; set config.lora.rank > 0",
  )
  _require(lc.base_group_size >= 1, f"config.lora.base_group_size={lc.base_group_size} must be >= 1")


def check_backend(cfg: ml_collections.ConfigDict, backend: str) -> None:
  """What only the running backend ("cpu", "gpu", "tpu") can tell: called once it is up, not by `validate`
  (which runs before `jax.distributed.initialize`, when the backend must not be touched yet)."""
  for problem in (
    backend_problem(cfg.model.attention, backend),
    remat_problem(cfg.model.remat, backend),
    dropless_problem(cfg.moe.dropless_impl, backend),
  ):
    _require(problem is None, problem or "")


def validate_layout(cfg: ml_collections.ConfigDict, mesh: dict[str, int], rules: dict, processes: int, backend: str):
  """What the mesh (`{axis: size}`), the run's logical-axis rules, the process count and the backend decide:
  checked once they are known and before anything is traced."""
  check_backend(cfg, backend)
  batch_spec = logical_to_spec(BATCH_AXES, rules, mesh)
  t, stages = cfg.train, mesh["stage"]
  _require(
    cfg.optim.zero_stage == 0 or mesh["data"] > 1,
    f"config.optim.zero_stage={cfg.optim.zero_stage} shards optimizer state over the data axis, which has 1 device "
    f"in this mesh {mesh}; give mesh.data more devices or set config.optim.zero_stage=0",
  )
  _require(
    cfg.lora.rank == 0 or stages == 1,
    f"config.lora.rank={cfg.lora.rank} with mesh.stage={stages}: LoRA does not run under the pipeline; set "
    "mesh.stage=1 (the base can be sharded with mesh.fsdp and mesh.tensor)",
  )
  _require(
    not t.get("eval_tasks") or stages == 1,
    f"config.train.eval_tasks with mesh.stage={stages}: downstream tasks do not run under the pipeline; set "
    "mesh.stage=1, or evaluate a checkpoint with scripts/evaluate.py",
  )
  pipeline_micro = cfg.pipeline.microbatches if stages > 1 else 1
  _require(  # validate() checked grad_accum alone; a pipeline splits each of its microbatches again
    t.global_batch_size % (t.grad_accum * pipeline_micro) == 0,
    f"config.train.global_batch_size={t.global_batch_size} does not split into grad_accum={t.grad_accum} x "
    f"pipeline.microbatches={pipeline_micro} microbatches; make it a multiple of {t.grad_accum * pipeline_micro}",
  )
  axes = entry_axes(batch_spec[0])
  shards = math.prod(mesh[a] for a in axes)
  micro = t.global_batch_size // (t.grad_accum * pipeline_micro)
  if micro % shards:
    split = f"grad_accum={t.grad_accum}" + (f" / pipeline.microbatches={pipeline_micro}" if pipeline_micro > 1 else "")
    raise MeshError(
      f"the batch of {micro} sequences per microbatch (config.train.global_batch_size={t.global_batch_size} / "
      f"{split}) does not split over the {shards} devices of mesh axes {axes}; make it a multiple of {shards}"
    )
  if t.global_batch_size % processes:
    raise MeshError(
      f"config.train.global_batch_size={t.global_batch_size} does not split over {processes} processes; make it a "
      "multiple of the process count"
    )
  if stages > 1:
    _validate_stages(cfg, stages)
  if mesh.get("context", 1) > 1:
    _validate_context(cfg, mesh, rules)
  if cfg.moe.num_experts > 0 and cfg.moe.capacity_factor <= 0:
    _validate_dropless_layout(mesh, rules)


def _validate_context(cfg: ml_collections.ConfigDict, mesh: dict[str, int], rules: dict) -> None:
  """A sequence split over mesh.context (parallel/context.py)."""
  c, seq_len = mesh["context"], cfg.data.seq_len
  _require(
    seq_len % (2 * c) == 0,
    f"config.data.seq_len={seq_len} does not cut into 2 x mesh.context={c} chunks (the causal load balance); "
    f"make it a multiple of {2 * c}",
  )
  _require(
    tuple(rules["length"]) == ("context",) and "context" not in rules["batch"],
    f"mesh.context={c} needs config.mesh.rules.length='context' and batch off the context axis (length is "
    f"{','.join(rules['length'])!r}, batch {','.join(rules['batch'])!r}); restore the default rules for both",
  )
  _require(
    cfg.model.attention != "splash",
    f"config.model.attention='splash' with mesh.context={c}: splash takes causality from token indices, which the "
    "load-balanced layout permutes; use chunked, xla or auto",
  )
  _require(
    cfg.moe.num_experts == 0 or cfg.moe.capacity_factor <= 0,
    f"config.moe.capacity_factor={cfg.moe.capacity_factor} with mesh.context={c}: which tokens an expert drops "
    "depends on their order, which the context layout permutes; set moe.capacity_factor=0 (dropless)",
  )


def _validate_dropless_layout(mesh: dict[str, int], rules: dict) -> None:
  """The dropless MoE exchanges tokens between the devices of the experts' axes: those must all split tokens."""
  tokens = logical_to_spec(("batch", "length", None), rules, mesh)
  token_axes = entry_axes(tokens[0]) + entry_axes(tokens[1])
  expert_axes = entry_axes(logical_to_spec(("experts", None, "mlp"), rules, mesh)[0])
  if not set(expert_axes) <= set(token_axes) and set(expert_axes) & set(token_axes):
    raise MeshError(
      f"experts are split over mesh axes {expert_axes} but tokens only over {token_axes}: the dropless MoE "
      "needs the batch split over all of the experts' axes or none; change config.mesh.rules"
    )


def _validate_stages(cfg: ml_collections.ConfigDict, stages: int) -> None:
  p, m = cfg.pipeline, cfg.model
  _require(
    p.microbatches >= stages,
    f"config.pipeline.microbatches={p.microbatches} is fewer than the {stages} stages: most stages would idle; "
    f"use at least {stages} (4 x stages keeps the bubble near 20% or less)",
  )
  moe_every = cfg.moe.every if cfg.moe.num_experts > 0 else 1
  units = m.num_layers // moe_every
  what = f"{units} layer units (num_layers / moe.every={moe_every})" if moe_every > 1 else f"{units} layers"
  _require(
    units % (stages * p.repeats) == 0,
    f"{what} do not split into mesh.stage={stages} stages x pipeline.repeats={p.repeats} chunks; "
    f"make config.model.num_layers a multiple of {stages * p.repeats * moe_every}",
  )


# One line per problem of a value, each naming its key and the fix (None or [] when there is none).


def backend_problem(impl: str, backend: str) -> str | None:
  """Why `impl` cannot run on `backend` ("cpu", "gpu", "tpu"), in one line; None when it can."""
  if impl not in ATTENTION_IMPLEMENTATIONS:
    return f"config.model.attention={impl!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}"
  needed = ATTENTION_BACKENDS.get(impl)
  if needed is not None and backend != needed:
    return (
      f"config.model.attention={impl!r} runs on {needed.upper()} only, this backend is {backend}; "
      "use auto, xla or chunked"
    )
  return None


def dropless_problem(impl: str, backend: str) -> str | None:
  """Why dropless exchange `impl` cannot run on `backend` ("cpu", "gpu", "tpu"), in one line; None when it can."""
  if impl not in DROPLESS_IMPLS:
    return f"config.moe.dropless_impl={impl!r} is not one of {', '.join(DROPLESS_IMPLS)}"
  if impl == "ragged" and backend not in RAGGED_BACKENDS:
    return (
      f"config.moe.dropless_impl='ragged' needs jax.lax.ragged_all_to_all, which the {backend} backend does not "
      "implement; use auto or buffer"
    )
  return None


def lora_problem(rank: int, alpha: float, dropout_rate: float, targets: str, num_experts: int) -> str | None:
  """Why config.lora cannot work, in one line naming the key and the fix; None when it can (or LoRA is off)."""
  if rank < 0:
    return f"config.lora.rank={rank} must be >= 0 (0 turns LoRA off)"
  if rank == 0:
    return None
  names = [t.strip() for t in targets.split(",") if t.strip()]
  unknown = [t for t in names if t not in TARGETS]
  if unknown or not names:
    return (
      f"config.lora.targets={targets!r} must be a comma-separated list of {', '.join(TARGETS)}; "
      "e.g. --config.lora.targets=q,k,v,o"
    )
  mlp = [t for t in names if TARGETS[t][0].startswith("mlp_")]
  if num_experts > 0 and mlp:
    return (
      f"config.lora.targets includes MLP projections ({','.join(mlp)}), but MoE experts take no adapters; "
      "with config.moe.num_experts > 0 use attention targets only (q,k,v,o)"
    )
  if alpha <= 0:
    return f"config.lora.alpha={alpha} must be positive (the adapter's scale is alpha / rank)"
  if not 0.0 <= dropout_rate < 1.0:
    return f"config.lora.dropout={dropout_rate} must be in [0, 1)"
  return None


def remat_problem(remat: str, backend: str) -> str | None:
  """Why `remat` cannot run on `backend` ("cpu", "gpu", "tpu"), in one line; None when it can."""
  if remat not in REMAT_POLICIES:
    return f"config.model.remat={remat!r} is not one of {', '.join(REMAT_POLICIES)}"
  if remat.startswith("offload") and backend == "cpu":
    return (
      f"config.model.remat={remat!r} offloads to host memory, which the cpu backend does not have; use save_projections"
    )
  return None


def field_problems(cfg) -> list[str]:
  """One line per bad value among the RoPE scaling, sliding window and scan fields of `config.model`."""
  problems = []
  if cfg.rope_scaling_type not in ("", "linear", "llama3"):
    problems.append(f"config.model.rope_scaling_type={cfg.rope_scaling_type!r} is not one of '', linear, llama3")
  if cfg.rope_scaling_type and cfg.rope_scaling_factor <= 0:
    problems.append(f"config.model.rope_scaling_factor={cfg.rope_scaling_factor} must be positive")
  if cfg.rope_scaling_type == "llama3" and not 0 < cfg.rope_low_freq_factor < cfg.rope_high_freq_factor:
    problems.append(
      f"config.model.rope_low_freq_factor={cfg.rope_low_freq_factor} must be positive and below "
      f"config.model.rope_high_freq_factor={cfg.rope_high_freq_factor}"
    )
  if cfg.sliding_window < 0:
    problems.append(f"config.model.sliding_window={cfg.sliding_window} must be >= 0 (0: off)")
  if cfg.scan_unroll < 1:
    problems.append(f"config.model.scan_unroll={cfg.scan_unroll} must be >= 1 (1: one layer per scan iteration)")
  return problems
