"""Loading named configs, checking command-line overrides, and validating values before anything is built.

Every problem is a `ConfigError` whose message is one line naming the key and the fix; `train.py` prints it
and exits non-zero.
"""

import difflib
import importlib.util
import os
from collections.abc import Sequence

import ml_collections

from data.chat import template_problem
from model.attend import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from model.attend import backend_problem
from model.config import field_problems
from model.moe import dropless_problem
from model.transformer import REMAT_POLICIES, remat_problem
from objectives import OBJECTIVES
from parallel.rules import DEFAULT_RULES


class ConfigError(ValueError):
  """A config key, value or combination of values that cannot work, in the user's terms."""


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Imports a config file and calls its `get_config()`."""
  if not os.path.isfile(path):
    raise ConfigError(f"config file {path!r} does not exist; pass one of configs/*.py to --config")
  spec = importlib.util.spec_from_file_location("_kiln_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"config file {path!r} has no get_config(); define one that returns a ConfigDict")
  return module.get_config()


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  keys = []
  for k, v in cfg.items():
    keys.append(prefix + k)
    if isinstance(v, ml_collections.ConfigDict):
      keys.extend(_all_keys(v, prefix + k + "."))
  return keys


def _parse_value(text: str, like):
  if isinstance(like, bool):
    if text.lower() in ("true", "1", "yes"):
      return True
    if text.lower() in ("false", "0", "no"):
      return False
    raise ValueError
  if isinstance(like, int):
    return int(text)
  if isinstance(like, float):
    return float(text)
  return text


def check_overrides(argv: Sequence[str], config_flag: str = "config") -> None:
  """Checks every `--config.a.b=value` in argv against the config file before absl parses them.

  absl's own errors for these cases are tracebacks from deep inside ml_collections; this gives one line.
  """
  prefix = f"--{config_flag}"
  path, overrides = None, []
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg == prefix and i + 1 < len(args):
      path = args[i + 1]
    elif arg.startswith(prefix + "="):
      path = arg.split("=", 1)[1]
    elif arg.startswith(prefix + "."):
      key, sep, value = arg[len(prefix) + 1 :].partition("=")
      if not sep:
        value = args[i + 1] if i + 1 < len(args) and not args[i + 1].startswith("--") else "true"
      overrides.append((key, value))
  if path is None:
    raise ConfigError("no config given; pass --config configs/<name>.py")
  cfg = load_config_file(path)
  valid_keys = _all_keys(cfg)
  for key, value in overrides:
    node, parts = cfg, key.split(".")
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        close = difflib.get_close_matches(key, valid_keys, n=1, cutoff=0.5)
        hint = f"; did you mean config.{close[0]}?" if close else "; see the config reference in README.md"
        raise ConfigError(f"unknown config key config.{key}{hint}")
      node = node[part]
      if depth == len(parts) - 1 and isinstance(node, ml_collections.ConfigDict):
        raise ConfigError(f"config.{key} is a group; set one of its keys, e.g. config.{key}.{next(iter(node))}")
    if isinstance(node, (bool, int, float)):
      try:
        _parse_value(value, node)
      except ValueError:
        raise ConfigError(
          f"config.{key} must be {type(node).__name__}, got {value!r}; e.g. --config.{key}={node}"
        ) from None


def _require(ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(message)


def _one_of(cfg, key: str, choices: Sequence[str]) -> None:
  group, name = key.split(".")
  value = cfg[group][name]
  _require(value in choices, f"config.{key}={value!r} is not one of {', '.join(choices)}; pick one of them")


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks values and their combinations; raises ConfigError with one line naming the key and the fix."""
  m, moe, t, o, d = cfg.model, cfg.moe, cfg.train, cfg.optim, cfg.data
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
  _one_of(cfg, "model.mlp_type", ("swiglu", "gelu"))
  _one_of(cfg, "model.norm_type", ("rmsnorm", "layernorm"))
  _one_of(cfg, "model.position_type", ("rope", "learned", "sinusoidal"))
  _one_of(cfg, "model.compute_dtype", ("float32", "bfloat16"))
  _one_of(cfg, "model.param_dtype", ("float32", "bfloat16"))
  _one_of(cfg, "model.remat", tuple(REMAT_POLICIES))
  _one_of(cfg, "model.attention", ATTENTION_IMPLEMENTATIONS)
  _require(m.attention_block > 0, f"config.model.attention_block={m.attention_block} must be positive")
  for problem in field_problems(m):  # RoPE scaling and sliding window
    _require(False, problem)
  _one_of(cfg, "moe.router_score", ("softmax", "sigmoid"))
  _one_of(cfg, "data.tokenizer_type", ("bpe", "unigram"))
  _one_of(cfg, "data.invalid_utf8", ("replace", "skip"))
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
  _require(
    m.param_dtype == "float32" or m.allow_low_precision_params,
    f"config.model.param_dtype={m.param_dtype} keeps the master weights in {m.param_dtype}, where small updates "
    "round away; keep float32 (config.model.compute_dtype=bfloat16 gives bf16 speed), or set "
    "config.model.allow_low_precision_params=True if you mean it",
  )
  pipe = cfg.pipeline
  _one_of(cfg, "pipeline.schedule", ("gpipe", "circular", "1f1b"))
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
  unknown_rules = set(DEFAULT_RULES) - set(cfg.mesh.rules)
  _require(not unknown_rules, f"config.mesh.rules lacks {sorted(unknown_rules)}; every logical axis needs a rule")
  _require(d.eval_fraction >= 0 and d.eval_fraction < 1, "config.data.eval_fraction must be in [0, 1)")
  _validate_objective(cfg)


def _validate_objective(cfg: ml_collections.ConfigDict) -> None:
  """train.objective and the groups it reads (dpo, distill, data.chat_template)."""
  objective = cfg.train.objective
  _one_of(cfg, "train.objective", OBJECTIVES)
  if objective in ("sft", "dpo"):
    problem = template_problem(cfg.data.chat_template)
    _require(problem is None, problem or "")
    _require(
      bool(cfg.data.files),
      f"config.train.objective={objective} reads chat JSONL from config.data.files, which is empty; "
      f"e.g. --config.data.files=examples/{objective}.jsonl (formats: README, Fine-tuning)",
    )
  if objective == "dpo":
    _require(cfg.dpo.beta > 0, f"config.dpo.beta={cfg.dpo.beta} must be positive (0.1 is usual)")
  if objective == "distill":
    dist = cfg.distill
    _require(
      bool(dist.teacher),
      "config.distill.teacher is empty; train a teacher first (python train.py --config configs/tiny.py "
      "--workdir runs/teacher) and pass --config.distill.teacher=runs/teacher",
    )
    _require(dist.temperature > 0, f"config.distill.temperature={dist.temperature} must be positive")
    _require(0.0 <= dist.alpha <= 1.0, f"config.distill.alpha={dist.alpha} must be in [0, 1]")


def check_backend(cfg: ml_collections.ConfigDict, backend: str) -> None:
  """What only the running backend ("cpu", "gpu", "tpu") can tell: called once it is up, not by `validate`
  (which runs before `jax.distributed.initialize`, when the backend must not be touched yet)."""
  for problem in (
    backend_problem(cfg.model.attention, backend),
    remat_problem(cfg.model.remat, backend),
    dropless_problem(cfg.moe.dropless_impl, backend),
  ):
    _require(problem is None, problem or "")
