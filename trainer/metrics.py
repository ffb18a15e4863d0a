"""Throughput accounting (FLOPs per token, peak FLOP/s, MFU) and the run directory's metric files."""

import io
import json
import logging
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from model import ModelConfig
from storage import as_path, is_url

_log = logging.getLogger(__name__)

# Dense bf16 peak FLOP/s per chip, from the vendors' spec sheets (no sparsity).
PEAK_BF16_FLOPS = {
  "TPU v4": 275e12,
  "TPU v5 lite": 197e12,  # v5e
  "TPU v5e": 197e12,
  "TPU v5p": 459e12,
  "TPU v5": 459e12,
  "TPU v6 lite": 918e12,  # v6e (Trillium)
  "TPU v6e": 918e12,
  "NVIDIA A100": 312e12,
  "NVIDIA H100": 989e12,
  "NVIDIA H200": 989e12,
}


def matmul_params_per_token(cfg: ModelConfig) -> int:
  """Weights each token multiplies with in a forward pass (MoE: the active experts only); no embedding lookup."""
  d, h = cfg.d_model, cfg.head_dim
  attn = d * h * (2 * cfg.num_heads + 2 * cfg.num_kv_heads)
  dense_mlp = d * cfg.mlp_dim * (3 if cfg.mlp_type == "swiglu" else 2)
  mlp_per_layer = [dense_mlp] * cfg.num_layers
  if cfg.num_experts > 0:
    expert_dim = cfg.expert_mlp_dim or cfg.mlp_dim
    expert = d * expert_dim * (3 if cfg.mlp_type == "swiglu" else 2)
    moe_mlp = (cfg.top_k + cfg.num_shared_experts) * expert + d * cfg.num_experts
    mlp_per_layer = [moe_mlp if (i + 1) % cfg.moe_every == 0 else dense_mlp for i in range(cfg.num_layers)]
  return cfg.num_layers * attn + sum(mlp_per_layer) + d * cfg.vocab_size


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token: 6 * matmul weights + 12 * layers * heads * head_dim * seq_len (attention).

  6 = 2 (multiply-add) x 3 (forward + two backward matmuls). The attention term counts QK^T and PV over the
  full L x L square, as PaLM and MaxText do, although causal masking makes half of it unnecessary.
  """
  attention = 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len
  return 6 * matmul_params_per_token(cfg) + attention


def measure_matmul_peak(dtype=jnp.float32, n: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of a large matmul on the default device: the CPU's practical peak, measured, not assumed.

  For a 16-bit dtype the faster of a matmul returning that dtype and one accumulating in fp32 (what mixed
  precision runs, and on XLA:CPU twice as fast as the first)."""
  a = jax.random.normal(jax.random.PRNGKey(0), (n, n), dtype)
  matmuls = [jax.jit(lambda x: x @ x)]
  if jnp.dtype(dtype).itemsize < 4:
    matmuls.append(jax.jit(lambda x: jnp.dot(x, x, preferred_element_type=jnp.float32)))
  best = float("inf")
  for f in matmuls:
    f(a).block_until_ready()
    for _ in range(repeats):
      start = time.perf_counter()
      f(a).block_until_ready()
      best = min(best, time.perf_counter() - start)
  return 2 * n**3 / best


def peak_flops_per_device(compute_dtype=jnp.float32) -> tuple[float, str]:
  """(peak FLOP/s of one device, where the figure comes from)."""
  kind = jax.devices()[0].device_kind
  for name, peak in PEAK_BF16_FLOPS.items():
    if kind.startswith(name):
      return peak, f"{kind} bf16 spec sheet"
  if jax.default_backend() == "cpu":
    # Emulated CPU devices share the host's cores: the measured peak is for the whole host.
    return measure_matmul_peak(compute_dtype) / jax.local_device_count(), "measured matmul on this CPU"
  _log.warning("unknown device kind %r: MFU is reported against a measured matmul peak", kind)
  return measure_matmul_peak(compute_dtype), "measured matmul"


class MetricWriter:
  """Appends metrics.jsonl lines and TensorBoard scalars; a no-op on processes other than 0.

  In a local run directory both files are written in place. Object stores (gs://) cannot append, so for a URL
  both are kept in a local staging directory and copied whole into the run directory at every `flush()` (the
  loop flushes at each checkpoint) and at `close()`; metrics.jsonl lines are still only ever added.

  metrics.jsonl holds one line per kind of record (train, eval) and step. A resumed run repeats the steps
  between its checkpoint and the moment the run before it stopped, with the same results (resume is exact):
  `write` skips a record whose kind and step the file already holds, so each step keeps the line written first.
  A kill in the middle of a write may leave a last line torn: it is cut off when the file is opened (it never
  was a record), so that every line stays one JSON object.
  """

  def __init__(self, workdir: str, enabled: bool):
    self.enabled = enabled
    self._run = as_path(workdir)
    self._tb = None
    if not enabled:
      return
    self._staging = None
    if is_url(workdir):
      self._staging = epath.Path(tempfile.mkdtemp(prefix="kiln-metrics-"))
      remote = self._run / "metrics.jsonl"
      if remote.exists():  # a resumed run: keep what earlier runs logged
        (self._staging / "metrics.jsonl").write_text(remote.read_text())
    local = self._staging or self._run
    self.path = local / "metrics.jsonl"
    self._recorded = _recorded_keys(self.path)
    if self._recorded:
      _log.info("metrics.jsonl records %d lines up to step %d: their steps are not written again",
                len(self._recorded), max(step for _, step in self._recorded))  # fmt: skip
    from tensorboardX import SummaryWriter

    self._tb = SummaryWriter(str(local / "tb"))

  def write(self, record: dict, arrays: dict | None = None) -> None:
    """`record` goes to metrics.jsonl and TensorBoard; `arrays` (e.g. expert load [layers, experts]) to
    TensorBoard only, one scalar per entry, tagged `name/i/j`. Nothing is written for a kind and step the file
    already records."""
    if not self.enabled:
      return
    key = (_kind(record), record["step"])
    if key in self._recorded:
      return
    self._recorded.add(key)
    with self.path.open("a") as f:
      f.write(json.dumps(record) + "\n")
    step = record["step"]
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)):
        self._tb.add_scalar(key, value, step)
    for key, values in (arrays or {}).items():
      for index, value in np.ndenumerate(values):
        self._tb.add_scalar("/".join([key, *map(str, index)]), float(value), step)

  def flush(self) -> None:
    """Makes everything written so far visible in the run directory."""
    if not self.enabled:
      return
    self._tb.flush()
    if self._staging is None:
      return
    (self._run / "metrics.jsonl").write_bytes(self.path.read_bytes())
    staged_tb = str(self._staging / "tb")
    for folder, _, names in os.walk(staged_tb):  # event files, and profiler traces in their subfolders
      for name in names:
        target = self._run / "tb" / os.path.relpath(os.path.join(folder, name), staged_tb)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes((epath.Path(folder) / name).read_bytes())

  @property
  def tensorboard_dir(self) -> str:
    """Where TensorBoard files go before `flush()` (profiler traces too): the run's tb/ or its staging copy."""
    return str((self._staging or self._run) / "tb")

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
      self.flush()


def _kind(record: dict) -> str:
  """The kind of a record: "eval" for evaluation (eval_loss, eval_loss/<name>, eval/<task>/<metric>), else "train"."""
  return "eval" if any(key.startswith("eval") for key in record) else "train"


def _parse(line: bytes) -> dict | None:
  """The record of one metrics.jsonl line; None for a line that is not a whole JSON object (torn by a kill)."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record if isinstance(record, dict) and "step" in record else None


def _recorded_keys(path: epath.Path) -> set[tuple[str, int]]:
  """(kind, step) of every record of the local file `path` (absent: none), after mending a torn last line: one
  that holds a whole record gets its newline; one that does not is cut off, so the next line starts clean."""
  if not path.exists():
    return set()
  text = path.read_bytes()
  complete, tail = text[: text.rfind(b"\n") + 1], text[text.rfind(b"\n") + 1 :]
  if tail and _parse(tail) is not None:
    with path.open("ab") as f:
      f.write(b"\n")
    complete += tail
  elif tail:
    _log.warning("metrics.jsonl ends in a torn line (%d bytes, from a run that was killed): cut off", len(tail))
    os.truncate(str(path), len(complete))
  records = [r for r in map(_parse, complete.splitlines()) if r is not None]
  return {(_kind(r), r["step"]) for r in records}


def read_metrics(workdir: str) -> list[dict]:
  """The records of the run's metrics.jsonl, in order; a line that is not a whole record is skipped."""
  path = as_path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [r for r in map(_parse, path.read_bytes().splitlines()) if r is not None]


def plot_losses(workdir: str) -> str:
  """Writes loss.png (train and eval loss against step) from metrics.jsonl, and rewards.png beside it for a run
  with rewards (grpo); returns loss.png's path."""
  records = read_metrics(workdir)
  # A file written before lines were kept one per step may repeat steps after a resume: the last line wins.
  train = sorted({r["step"]: r["loss"] for r in records if "loss" in r}.items())
  evals = sorted({r["step"]: r["eval_loss"] for r in records if "eval_loss" in r}.items())
  curves = [("train loss", train, "-"), ("eval loss", evals, "o-")]
  path = _plot(workdir, "loss.png", curves, "cross-entropy (nats/token)")
  reward_names = sorted({k for r in records for k in r if k == "reward_mean" or k.startswith("reward/")})
  if reward_names:
    rewards = [(name, sorted({r["step"]: r[name] for r in records if name in r}.items()), "-") for name in reward_names]
    _plot(workdir, "rewards.png", rewards, "mean reward per rollout")
  return path


def _plot(workdir: str, name: str, curves: list[tuple[str, list, str]], ylabel: str) -> str:
  """Writes `name` in the run directory: each (label, [(step, value)], style) curve against step."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4.5))
  for label, points, style in curves:
    if points:
      ax.plot(*zip(*points), style, label=label, lw=1, ms=3)
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(as_path(workdir).name)
  ax.grid(alpha=0.3)
  ax.legend()
  image = io.BytesIO()
  fig.savefig(image, format="png", dpi=120, bbox_inches="tight")
  plt.close(fig)
  path = as_path(workdir) / name
  path.write_bytes(image.getvalue())
  return str(path)
