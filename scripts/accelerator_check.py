"""kiln on an accelerator, in one command: `python scripts/accelerator_check.py [--smoke] [--budget_s 420]`.

Sections, each guarded (an exception becomes a one-line `error` in its entry and the next section runs) and each
skipped when the time budget has too little left for it; progress and timings go to stderr:
- `attention`: the accelerator's kernel (cudnn on GPU, splash on TPU; chunked on CPU) against xla through
  `model.attend.attend`, bf16, packed rows (several documents per row, positions restarting, a padded tail):
  outputs and the gradients of q, k and v, errors relative to the largest xla value, and the errors of both
  against an fp32 xla reference.
- `moe`: the dropless MoE with its token exchange over an `expert` mesh axis of every device that divides the
  experts, `ragged` (`jax.lax.ragged_all_to_all`) and `buffer` (fixed all_to_all buffers), against the dropless
  MoE on one device with no exchange: outputs and gradients, fp32 at the highest matmul precision, tiny_moe's
  shapes. The exchange is forced onto the axis even at one device (`model.moe._dropless_shard` under
  `jax.shard_map`): through a config (`moe.capacity_factor=0`, `moe.dropless_impl`) an axis of size 1 is dropped
  from the layout and both settings run the same exchange-free program, so that would test nothing on one GPU.
  XLA:CPU has no ragged_all_to_all: there `ragged` is skipped.
- `train_py`: `train.py --config configs/tiny.py` for 3 steps in a subprocess (temporary workdir and cache),
  started first so that its tokenizer training overlaps the sections above; its exit code and final loss.
- `train_step`: llama_1b's train step (trainer.experiment.build, as the dry run and scripts/benchmark.py) with
  the accelerator's attention, seq 2048, bf16 compute, at one or two (remat, batch) settings: compile time, step
  time, tokens/s and MFU against the chip's dense bf16 peak (trainer.metrics), the memory the compiled step needs.
  A setting that needs more than the device has free is reported as skipped, not run.
- `decode`: llama_1b's KV-cache decoding with random weights at batch 1 and 32 through
  scripts/benchmark_generate.py's `measure` (prefill and decode tokens/s); xla attention if the accelerator's
  kernel fails there (its error is kept).
- `grpo`: GRPO steps of llama_1b in bf16 from random weights (scripts/benchmark_grpo.py's `measure_grpo`):
  rollout tokens/s (generation on the training mesh), update tokens/s and the share of a step spent generating.
`--smoke` runs the same code with tiny shapes and configs/tiny.py on whatever backend is there (CI runs it on
CPU). The last line on stdout is one JSON object: `device`, `versions`, one entry per section with its
`status` (pass | fail | error | skip) and figures, `ok` (no section failed or errored), `failed`, `skipped`,
`total_s`. Packages kiln needs and this Python lacks are named in one line before anything is imported.
"""

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import compat  # noqa: E402  (the repository's own module, no third-party imports)

_START = time.perf_counter()

# Module -> distribution of what the sections import (kiln's modules, train.py and its run directory).
REQUIRED = {
  "numpy": "numpy",
  "jax": "jax",
  "jaxlib": "jaxlib",
  "flax": "flax",
  "optax": "optax",
  "orbax.checkpoint": "orbax-checkpoint",
  "tensorstore": "tensorstore",
  "ml_collections": "ml-collections",
  "absl": "absl-py",
  "etils": "etils",
  "sentencepiece": "sentencepiece",
  "tokenizers": "tokenizers",
  "tqdm": "tqdm",
  "tensorboardX": "tensorboardX",
  "matplotlib": "matplotlib",
}


def _version(dist: str) -> str | None:
  try:
    return importlib.metadata.version(dist)
  except importlib.metadata.PackageNotFoundError:
    return None


def _pins() -> dict[str, str]:
  """requirements.txt's `name==version` pins, by lower-case distribution name."""
  pins = {}
  with open(os.path.join(REPO, "requirements.txt")) as f:
    for line in f:
      name, sep, version = line.split("#")[0].strip().partition("==")
      if sep:
        pins[name.lower()] = version
  return pins


def _importable(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # its parent package is missing
    return False


def missing_packages() -> list[str]:
  """`dist==version` for every distribution the sections need and this Python lacks (or has too old)."""
  pins = _pins()
  missing = [f"{dist}=={pins.get(dist.lower(), '')}".rstrip("=") for m, dist in REQUIRED.items() if not _importable(m)]
  jax_version = _version("jax")
  flax = compat.flax_for_jax(jax_version, _version("flax")) if jax_version else None
  if flax is not None:  # too old for this jax, or missing: the flax that imports with it
    missing = [m for m in missing if not m.startswith("flax==")] + [f"flax=={flax}"]
  return missing


def wheel_command(dists: list[str]) -> str:
  """The command that fetches `dists` as wheels for this Python, on a machine with a package index."""
  py = f"{sys.version_info.major}.{sys.version_info.minor}"
  platforms = " ".join(
    f"--platform {p}" for p in ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
  )
  return (
    f"python3 -m pip download --no-deps --only-binary=:all: --python-version {py} --implementation cp {platforms} "
    f"-d .whl {' '.join(dists)}"
  )


def _log(message: str) -> None:
  print(f"[{time.perf_counter() - _START:6.1f}s] {message}", file=sys.stderr, flush=True)


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text[:400]}"


class Budget:
  """Seconds left of the whole run's budget, counted from the script's start."""

  def __init__(self, seconds: float):
    self.seconds = seconds

  def left(self) -> float:
    return self.seconds - (time.perf_counter() - _START)


def run_section(report: dict, name: str, fn, budget: Budget, needs_s: float) -> None:
  """report[name] = fn()'s dict (with `status`), an `error` line, or a `skip` when the budget is short."""
  left = budget.left()
  if left < needs_s:
    report[name] = {"status": "skip", "reason": f"time budget: {left:.0f} s left, needs about {needs_s:.0f} s"}
    _log(f"{name}: skipped ({report[name]['reason']})")
    return
  _log(f"{name}: start")
  start = time.perf_counter()
  try:
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries the JSON line alone
      result = fn()
  except Exception as e:  # each section reports its own failure, the others still run
    traceback.print_exc(file=sys.stderr)
    result = {"status": "error", "error": _one_line(e)}
  result["seconds"] = round(time.perf_counter() - start, 1)
  report[name] = result
  _log(f"{name}: {result['status']} in {result['seconds']} s" + (f": {result['error']}" if "error" in result else ""))
  gc.collect()


# ---------------------------------------------------------------------------------------------------------------
# What each mode runs. The GPU settings: llama_1b's plan on XLA:CPU (chunked attention, which GPU plans undercut)
# needs 62 GiB of temporaries at 16 x 2048 tokens with save_projections, 136 GiB with no remat (so 8 sequences
# there), 19 GiB with full remat; 32k tokens per step already make every matmul large.


def plan(smoke: bool, backend: str) -> dict:
  kernel = {"gpu": "cudnn", "tpu": "splash"}.get(backend, "chunked")
  if smoke:
    return {
      "kernel": kernel,
      "attention_shape": dict(batch=4, length=128, heads=4, kv_heads=2, head_dim=32),
      "moe_shape": dict(batch=4, length=32, d_model=128, experts=8, top_k=2, expert_mlp_dim=256),
      "train_config": "configs/tiny.py",
      "train_seq_len": 128,
      "train_settings": [("config", 8)],
      "train_steps": (1, 2),  # warm-up, timed
      "decode_config": "configs/tiny.py",
      "decode": dict(batches=(1, 4), prompt_len=16, new_tokens=8),
      "grpo": dict(prompts=2, group=4, max_new_tokens=8, prompt_words=8, steps=3),
      "needs_s": dict(attention=5, moe=5, train_step=10, decode=5, grpo=10),
    }
  return {
    "kernel": kernel,
    "attention_shape": dict(batch=4, length=2048, heads=32, kv_heads=8, head_dim=64),  # llama_1b's attention
    "moe_shape": dict(batch=16, length=256, d_model=128, experts=8, top_k=2, expert_mlp_dim=256),  # tiny_moe's
    "train_config": "configs/llama_1b.py",
    "train_seq_len": 2048,
    "train_settings": [("config", 16), ("none", 8)],
    "train_steps": (2, 8),
    "decode_config": "configs/llama_1b.py",
    "decode": dict(batches=(1, 32), prompt_len=128, new_tokens=128),
    "grpo": dict(prompts=4, group=8, max_new_tokens=128, prompt_words=32, steps=4),
    "needs_s": dict(attention=30, moe=20, train_step=100, decode=90, grpo=80),
  }


# ---------------------------------------------------------------------------------------------------------------
# attention


def _packed_ids(batch: int, length: int):
  """Segment ids and positions [B, L]: row kinds cycle through 4 documents, 3 documents and a padded tail (segment
  0), one document, 16 short documents. Positions restart at each document."""
  import numpy as np

  rng = np.random.default_rng(1)
  segment_ids = np.zeros((batch, length), np.int32)
  positions = np.zeros((batch, length), np.int32)
  for row in range(batch):
    kind = row % 4
    used = length - length // 8 if kind == 1 else length
    docs = {0: 4, 1: 3, 2: 1, 3: 16}[kind]
    cuts = np.sort(rng.choice(np.arange(1, used), docs - 1, replace=False)) if docs > 1 else []
    bounds = [0, *cuts, used]
    for doc, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
      segment_ids[row, a:b] = doc + 1
      positions[row, a:b] = np.arange(b - a)
  return segment_ids, positions


def check_attention(kernel: str, shape: dict, tolerance: float = 2e-2) -> dict:
  import jax
  import jax.numpy as jnp
  import numpy as np

  from model.attend import attend

  b, length, n, k, h = (shape[key] for key in ("batch", "length", "heads", "kv_heads", "head_dim"))
  rng = np.random.default_rng(0)
  q, kk, v = (rng.normal(size=(b, length, heads, h)).astype(np.float32) for heads in (n, k, k))
  cotangent = rng.normal(size=(b, length, n, h)).astype(np.float32)
  segment_ids, positions = _packed_ids(b, length)
  ids = dict(
    q_segment_ids_BxL=segment_ids, kv_segment_ids_BxS=segment_ids, q_positions_BxL=positions, kv_positions_BxS=positions
  )

  def value_and_grads(impl: str, dtype):
    def loss(q, k, v):
      out = attend(q, k, v, **ids, impl=impl, block=max(length // 4, 16), platform=jax.default_backend())
      return jnp.sum(out.astype(jnp.float32) * cotangent), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = fn(*(jnp.asarray(x, dtype) for x in (q, kk, v)))
    return {name: np.asarray(x, np.float32) for name, x in zip(("out", "dq", "dk", "dv"), (out, *grads))}

  got = value_and_grads(kernel, jnp.bfloat16)
  want = value_and_grads("xla", jnp.bfloat16)
  with jax.default_matmul_precision("highest"):  # fp32 as written, not TF32 (GPU) or bf16 passes (TPU)
    exact = value_and_grads("xla", jnp.float32)
  errors, relative, vs_fp32 = {}, {}, {}
  for name in got:
    errors[name] = float(np.max(np.abs(got[name] - want[name])))
    relative[name] = errors[name] / max(float(np.max(np.abs(want[name]))), 1e-30)
    vs_fp32[name] = {
      kernel: float(np.max(np.abs(got[name] - exact[name]))),
      "xla_bf16": float(np.max(np.abs(want[name] - exact[name]))),
    }
  finite = all(bool(np.all(np.isfinite(x))) for x in got.values())
  passed = finite and all(r <= tolerance for r in relative.values())
  # Which kind of row is off, when one is: the largest output error per row.
  row_errors = np.max(np.abs(got["out"] - want["out"]), axis=(1, 2, 3))
  return {
    "status": "pass" if passed else "fail",
    "impl": kernel,
    "reference": "xla",
    "dtype": "bfloat16",
    "shape": shape,
    "rows": ["4 docs", "3 docs + padding", "1 doc", "16 docs"][: min(b, 4)],
    "finite": finite,
    "max_abs_err": errors,
    "rel_err": relative,
    "tolerance": tolerance,
    "max_abs_err_vs_fp32": vs_fp32,
    "out_max_abs_err_per_row": [float(e) for e in row_errors],
  }


# ---------------------------------------------------------------------------------------------------------------
# MoE dropless exchange


def check_moe(shape: dict, tolerance: float = 1e-4) -> dict:
  import functools

  import jax
  import jax.numpy as jnp
  import numpy as np
  from jax.sharding import PartitionSpec

  from model import moe
  from model.mlp import activate

  b, length, d, e, k, f = (shape[key] for key in ("batch", "length", "d_model", "experts", "top_k", "expert_mlp_dim"))
  rng = np.random.default_rng(0)
  x = rng.normal(size=(b, length, d)).astype(np.float32)
  popularity = rng.uniform(0.2, 2.0, size=e) ** 2  # skewed routing: devices receive different loads
  experts = np.stack([rng.choice(e, size=k, replace=False, p=popularity / popularity.sum()) for _ in range(b * length)])
  experts = experts.reshape(b, length, k).astype(np.int32)
  gates = rng.uniform(0.1, 1.0, size=(b, length, k)).astype(np.float32)
  weights = tuple(rng.normal(size=s).astype(np.float32) * d**-0.5 for s in [(e, d, f), (e, d, f), (e, f, d)])
  cotangent = rng.normal(size=(b, length, d)).astype(np.float32)
  devices = max(p for p in range(1, jax.device_count() + 1) if e % p == 0 and b % p == 0)
  mesh = jax.make_mesh(
    (devices,), ("expert",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:devices]
  )

  def value_and_grads(layer):
    def loss(x, gates, weights):
      y = layer(x, experts, gates, weights)
      return jnp.sum(y * cotangent), y

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    with jax.default_matmul_precision("highest"):
      (_, y), (dx, dgates, dweights) = fn(jnp.asarray(x), jnp.asarray(gates), tuple(map(jnp.asarray, weights)))
    named = {"y": y, "dx": dx, "dgates": dgates, "dw_gate": dweights[0], "dw_up": dweights[1], "dw_down": dweights[2]}
    return {name: np.asarray(v) for name, v in named.items()}

  act = functools.partial(activate, "swiglu", platform=jax.default_backend())

  def exchanged(exchange):
    body = functools.partial(moe._dropless_shard, act=act, expert_axes=("expert",), exchange=exchange)
    spec = PartitionSpec("expert")
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec, (spec,) * 3), out_specs=spec)

  reference = value_and_grads(functools.partial(moe._dropless_shard, act=act))
  exchanges = {
    "ragged": functools.partial(moe._ragged_exchange, collective=jax.lax.ragged_all_to_all),
    "buffer": moe._buffer_exchange,
  }
  results, outputs = {}, {}
  for impl, exchange in exchanges.items():
    problem = None if impl != "ragged" else _ragged_problem(jax.default_backend())
    if problem:
      results[impl] = {"status": "skip", "reason": problem}
      continue
    try:
      outputs[impl] = value_and_grads(exchanged(exchange))
    except Exception as e:  # one exchange failing still reports the other
      traceback.print_exc(file=sys.stderr)
      results[impl] = {"status": "error", "error": _one_line(e)}
      continue
    results[impl] = _compare(outputs[impl], reference, tolerance)
  if len(outputs) == 2:
    results["ragged_vs_buffer"] = _compare(outputs["ragged"], outputs["buffer"], tolerance)
  statuses = [r["status"] for r in results.values()]
  status = "error" if "error" in statuses else "fail" if "fail" in statuses else "pass"
  return {
    "status": status,
    "reference": "one device, no exchange",
    "dtype": "float32",
    "shape": shape,
    "expert_devices": devices,
    "results": results,
  }


def _ragged_problem(backend: str) -> str | None:
  from settings.validate import dropless_problem

  return dropless_problem("ragged", backend)


def _compare(got: dict, want: dict, tolerance: float) -> dict:
  import numpy as np

  errors = {name: float(np.max(np.abs(got[name] - want[name]))) for name in want}
  relative = {name: errors[name] / max(float(np.max(np.abs(want[name]))), 1e-30) for name in want}
  finite = all(bool(np.all(np.isfinite(v))) for v in got.values())
  passed = finite and all(r <= tolerance for r in relative.values())
  return {"status": "pass" if passed else "fail", "max_abs_err": errors, "rel_err": relative, "tolerance": tolerance}


# ---------------------------------------------------------------------------------------------------------------
# train.py in a subprocess


class TrainPy:
  """`train.py --config configs/tiny.py` for 3 steps in a subprocess, writing under `workdir`."""

  def __init__(self, workdir: str):
    self.workdir = workdir
    args = [
      sys.executable, "train.py", "--config", "configs/tiny.py", f"--workdir={workdir}/run",
      "--config.train.steps=3", "--config.train.log_every=1", "--config.train.eval_every=3",
      "--config.optim.warmup_steps=1", "--config.checkpoint.every_steps=3",
      f"--config.data.cache_dir={workdir}/cache",
    ]  # fmt: skip
    # This process holds most of the accelerator's memory: the child takes what it needs as it goes.
    env = {**os.environ, "XLA_PYTHON_CLIENT_PREALLOCATE": "false", "PYTHONUNBUFFERED": "1"}
    self.log_path = os.path.join(workdir, "train_py.log")
    with open(self.log_path, "w") as log:
      self.proc = subprocess.Popen(
        args, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
      )
    self.started = time.perf_counter()

  def finish(self, timeout: float) -> dict:
    """Waits at most `timeout` seconds (then kills it); its exit code and the losses of its metrics.jsonl."""
    from trainer.metrics import read_metrics

    try:
      returncode = self.proc.wait(timeout=max(timeout, 1.0))
    except subprocess.TimeoutExpired:
      self.stop()
      return {"status": "error", "error": f"train.py still running after {timeout:.0f} s of budget; killed"}
    result = {"returncode": returncode, "wall_s": round(time.perf_counter() - self.started, 1)}
    records = read_metrics(os.path.join(self.workdir, "run"))
    train = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    if train:
      result.update(steps=train[-1]["step"], final_loss=train[-1]["loss"], first_loss=train[0]["loss"])
    if evals:
      result["final_eval_loss"] = evals[-1]["eval_loss"]
    ok = returncode == 0 and bool(train) and train[-1]["step"] == 3 and math.isfinite(train[-1]["loss"])
    result["status"] = "pass" if ok else "fail"
    if not ok:
      with open(self.log_path) as f:
        lines = [line.strip() for line in f.read().splitlines() if line.strip()]
      result["error"] = lines[-1][:400] if lines else "no output"
    return result

  def stop(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()


# ---------------------------------------------------------------------------------------------------------------
# train step throughput


def _config(path: str, **overrides):
  from settings.load import load_config_file

  cfg = load_config_file(os.path.join(REPO, path))
  for key, value in overrides.items():
    group, name = key.split(".")
    cfg[group][name] = value
  return cfg


def _device_memory() -> dict:
  import jax

  return jax.devices()[0].memory_stats() or {}


def measure_train_step(cfg, warmup: int, steps: int) -> dict:
  """One setting: build, compile ahead of time, check the step fits, then time `steps` steps after `warmup`."""
  import jax
  import numpy as np

  from data.synthetic import packed_batch
  from parallel.target import live_target
  from settings.validate import validate
  from trainer.metrics import flops_per_token, peak_flops_per_device
  from trainer.plan import compile_train_step, program_bytes

  validate(cfg)
  batch, seq_len = cfg.train.global_batch_size, cfg.data.seq_len
  row = {"remat": cfg.model.remat, "global_batch_size": batch, "seq_len": seq_len, "tokens_per_step": batch * seq_len}
  exp, compiled, compile_s = compile_train_step(cfg, live_target())
  row["compile_s"] = round(compile_s, 1)
  needed = program_bytes(compiled.memory_analysis())["total_bytes"]  # 0 where the backend gives no analysis
  if needed:
    row["compiled_memory_gib"] = round(needed / 2**30, 2)
    stats = _device_memory()
    if "bytes_limit" in stats:
      free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
      if needed > 0.97 * free:
        row.update(status="skip", reason=f"the step needs {needed / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
        return row
  rng = np.random.default_rng(0)
  shape = (batch, seq_len, cfg.data.vocab_size)
  batches = [jax.device_put(packed_batch(rng, *shape, docs_per_row=4), exp.batch_sharding) for _ in range(2)]
  state, frozen = exp.init_state(), exp.load_frozen()
  for i in range(warmup):
    state, metrics = compiled(state, batches[i % 2], frozen)
  jax.block_until_ready(state)
  start = time.perf_counter()
  for i in range(steps):
    state, metrics = compiled(state, batches[i % 2], frozen)
  jax.block_until_ready((state, metrics))
  step_s = (time.perf_counter() - start) / steps
  peak, peak_source = peak_flops_per_device(exp.model_cfg.dtype)
  tokens_per_sec = batch * seq_len / step_s
  devices = jax.device_count()
  loss = float(metrics["loss"])
  row.update(
    status="pass" if math.isfinite(loss) else "fail",
    step_s=round(step_s, 4),
    tokens_per_sec=round(tokens_per_sec, 1),
    tokens_per_sec_per_device=round(tokens_per_sec / devices, 1),
    mfu=round(tokens_per_sec * flops_per_token(exp.model_cfg, seq_len) / (peak * devices), 4),
    flops_per_token=flops_per_token(exp.model_cfg, seq_len),
    peak_flops_per_device=peak,
    peak_source=peak_source,
    final_loss=loss,
  )
  stats = _device_memory()
  if "peak_bytes_in_use" in stats:  # the process's peak so far: earlier settings included
    row["process_peak_memory_gib"] = round(stats["peak_bytes_in_use"] / 2**30, 2)
  return row


def check_train_step(p: dict, budget: Budget, reserve_s: float) -> dict:
  """Each (remat, batch) setting of the plan in turn; a later one only when the budget still holds it and what
  comes after (`reserve_s`)."""
  results, first_s = [], None
  for remat, batch in p["train_settings"]:
    if first_s is not None and budget.left() < first_s + reserve_s:
      results.append({"remat": remat, "global_batch_size": batch, "status": "skip", "reason": "time budget"})
      continue
    overrides = {
      "model.attention": p["kernel"],
      "model.compute_dtype": "bfloat16",
      "data.seq_len": p["train_seq_len"],
      "train.global_batch_size": batch,
    }
    if remat != "config":
      overrides["model.remat"] = remat
    start = time.perf_counter()
    try:
      row = measure_train_step(_config(p["train_config"], **overrides), *p["train_steps"])
    except Exception as e:  # one setting failing (out of memory, say) still runs the next
      traceback.print_exc(file=sys.stderr)
      row = {"remat": remat, "global_batch_size": batch, "status": "error", "error": _one_line(e)}
    first_s = first_s or time.perf_counter() - start
    _log(f"train_step: {json.dumps(row)}")
    results.append(row)
    gc.collect()
  statuses = [r["status"] for r in results]
  ran = [r for r in results if r["status"] == "pass"]
  status = "fail" if "fail" in statuses else "pass" if ran else "error" if "error" in statuses else "skip"
  entry = {"status": status, "config": p["train_config"], "attention": p["kernel"], "compute_dtype": "bfloat16"}
  if ran:
    best = max(ran, key=lambda r: r["tokens_per_sec"])
    entry.update(tokens_per_sec=best["tokens_per_sec"], mfu=best["mfu"], compile_s=best["compile_s"])
  entry["results"] = results
  return entry


# ---------------------------------------------------------------------------------------------------------------
# decoding


def check_decode(p: dict) -> dict:
  import jax

  from generation import Decoder
  from generation.run import one_device_mesh
  from model.params import init_params
  from parallel.rules import DEFAULT_RULES, parse_rules
  from scripts.benchmark_generate import measure
  from settings.validate import validate
  from storage.run import model_config

  def run(attention: str) -> list[dict]:
    cfg = _config(p["decode_config"], **{"model.attention": attention, "model.compute_dtype": "bfloat16"})
    validate(cfg)
    decoder = Decoder(model_config(cfg, cfg.data.vocab_size), cfg.data.vocab_size, one_device_mesh(), rules)
    params = jax.jit(lambda: init_params(decoder.model_cfg, 0), out_shardings=decoder.param_shardings)()
    shape = p["decode"]
    return [measure(decoder, params, b, shape["prompt_len"], shape["new_tokens"]) for b in shape["batches"]]

  rules = parse_rules(DEFAULT_RULES)
  entry = {"config": p["decode_config"], "attention": p["kernel"], "compute_dtype": "bfloat16"}
  try:
    results = run(p["kernel"])
  except Exception as e:  # the kernel may not take decoding's shapes: xla then
    if p["kernel"] == "xla":
      raise
    traceback.print_exc(file=sys.stderr)
    entry.update(attention="xla", kernel_error=_one_line(e))
    results = run("xla")
  for r in results:
    for key in ("prefill_tokens_per_sec", "decode_tokens_per_sec", "decode_step_ms", "compile_s"):
      r[key] = round(r[key], 2)
  entry["decode_tokens_per_sec"] = {str(r["batch"]): r["decode_tokens_per_sec"] for r in results}
  entry["results"] = results
  entry["status"] = "pass" if all(r["decode_tokens_per_sec"] > 0 for r in results) else "fail"
  return entry


# ---------------------------------------------------------------------------------------------------------------
# GRPO: rollouts and updates of the decode config's model in bf16 (scripts/benchmark_grpo.py)


def check_grpo(p: dict) -> dict:
  from scripts.benchmark_grpo import measure_grpo

  cfg = _config(p["decode_config"], **{"model.compute_dtype": "bfloat16"})
  result = measure_grpo(cfg, **p["grpo"])
  for key in ("rollout_tokens_per_sec", "update_tokens_per_sec", "rollout_share", "completion_len_mean"):
    result[key] = round(result[key], 3)
  ok = result["rollout_tokens_per_sec"] > 0 and result["update_tokens_per_sec"] > 0
  return {"config": p["decode_config"], **result, "status": "pass" if ok else "fail"}


# ---------------------------------------------------------------------------------------------------------------


def versions() -> dict:
  """Installed versions, read from the packages' metadata (nothing imported)."""
  found = {"python": platform.python_version()}
  for name, dist in (("jax", "jax"), ("jaxlib", "jaxlib"), ("flax", "flax"), ("optax", "optax")):
    found[name] = _version(dist)
  found["orbax"] = _version("orbax-checkpoint")
  found["numpy"] = _version("numpy")
  plugins = [d for d in ("jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu") if _version(d)]
  if plugins:
    found["plugin"] = f"{plugins[0]} {_version(plugins[0])}"
  return found


def device() -> dict:
  import jax

  devices = jax.devices()
  stats = devices[0].memory_stats() or {}
  found = {"device_kind": devices[0].device_kind, "platform": devices[0].platform, "count": len(devices)}
  if "bytes_limit" in stats:
    found["memory_limit_gib"] = round(stats["bytes_limit"] / 2**30, 1)
  return found


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true", help="tiny shapes and configs/tiny.py: CI's check on CPU")
  parser.add_argument("--budget_s", type=float, default=420.0, help="the whole run's time budget in seconds")
  args = parser.parse_args()

  missing = missing_packages()
  if missing:
    names = ", ".join(m.split("==")[0] for m in missing)
    message = (
      f"missing Python packages: {names} — carry them as wheels: {wheel_command(missing)}; then here: "
      "python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site "
      "python3 scripts/accelerator_check.py"
    )
    print(message, file=sys.stderr)
    print(json.dumps({"ok": False, "error": message, "missing": missing, "versions": versions()}))
    return 2

  sys.path.insert(0, REPO)
  budget = Budget(args.budget_s)
  report: dict = {"smoke": args.smoke, "budget_s": args.budget_s, "versions": versions()}
  with tempfile.TemporaryDirectory(prefix="kiln-accelerator-check-") as workdir:
    train_py = TrainPy(workdir)
    _log(f"train_py: started (pid {train_py.proc.pid}), log {train_py.log_path}")
    # Most of the accelerator's memory for this process (JAX's default is 75%), set after the child started: it
    # allocates as it goes.
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")
    try:
      import jax

      try:
        report["device"] = device()
      except Exception as e:  # no usable backend: the report still comes out
        traceback.print_exc(file=sys.stderr)
        report.update(device={"error": _one_line(e)}, ok=False, failed=["device"], skipped=[])
        print(json.dumps(report))
        return 1
      _log(f"device: {report['device']}, versions: {report['versions']}")
      p = plan(args.smoke, jax.default_backend())
      needs = p["needs_s"]
      run_section(
        report, "attention", lambda: check_attention(p["kernel"], p["attention_shape"]), budget, needs["attention"]
      )
      run_section(report, "moe", lambda: check_moe(p["moe_shape"]), budget, needs["moe"])
      # Waited for before the timed sections, so they have the accelerator (and the host) to themselves.
      run_section(report, "train_py", lambda: train_py.finish(budget.left() - needs["train_step"]), budget, 0)
      run_section(
        report, "train_step", lambda: check_train_step(p, budget, needs["decode"]), budget, needs["train_step"]
      )
      run_section(report, "decode", lambda: check_decode(p), budget, needs["decode"])
      run_section(report, "grpo", lambda: check_grpo(p), budget, needs["grpo"])
    finally:
      train_py.stop()
  sections = ("attention", "moe", "train_py", "train_step", "decode", "grpo")
  report["failed"] = [s for s in sections if report.get(s, {}).get("status") in ("fail", "error")]
  report["skipped"] = [s for s in sections if report.get(s, {}).get("status") == "skip"]
  report["ok"] = not report["failed"]
  report["total_s"] = round(time.perf_counter() - _START, 1)
  _log(f"done: ok={report['ok']} failed={report['failed']} skipped={report['skipped']}")
  print(json.dumps(report))
  return 0 if report["ok"] else 1


if __name__ == "__main__":
  sys.exit(main())
