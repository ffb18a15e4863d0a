"""The training loop: build, initialise or resume, step, log, evaluate, write the run directory."""

import json
import logging
import time

import jax
import numpy as np
from tqdm import tqdm

import data
import objectives
from data.cache import cache_root
from model.config import ModelConfig
from objectives.frozen import tokenizer_data_cfg
from parallel.mesh import make_mesh
from storage import as_path
from storage.checkpoint import Checkpointer, CheckpointError, load_params
from trainer.experiment import Experiment, build
from trainer.metrics import MetricWriter, flops_per_token, peak_flops_per_device, plot_losses
from trainer.optim import restart_schedule
from trainer.preemption import PreemptionGuard

_log = logging.getLogger(__name__)


def evaluate(exp: Experiment, params, eval_batches: list[dict], frozen: dict) -> dict:
  """Loss over the fixed eval batches (global arrays, placed once): the mean over all their target tokens (over
  their pairs for dpo)."""
  # Every batch is dispatched before any result is read: one wait for the whole evaluation, not one per batch.
  sums = jax.device_get([exp.eval_step(params, batch, frozen) for batch in eval_batches])
  nll, tokens = sum(float(n) for n, _ in sums), sum(float(t) for _, t in sums)
  loss = nll / max(tokens, 1.0)
  return {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 80.0)))}


class _Throughput:
  """Tokens/s and MFU between two completed steps, timed on the host when their metrics arrive."""

  def __init__(self, model_cfg: ModelConfig, tokens_per_step: int, seq_len: int, compute_dtype):
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token(model_cfg, seq_len)
    peak, self.peak_source = peak_flops_per_device(compute_dtype)
    self.peak_total = peak * jax.device_count()
    self.step, self.time = None, None

  def mark(self, step: int) -> None:
    """Step `step` has just completed."""
    self.step, self.time = step, time.perf_counter()

  def rates(self, step: int) -> dict:
    """Rates from the last mark up to step `step`, which has just completed; then marks it."""
    tokens = (step - self.step) * self.tokens_per_step
    tokens_per_sec = tokens / max(time.perf_counter() - self.time, 1e-9)
    self.mark(step)
    return {
      "tokens_per_sec": tokens_per_sec,
      "tokens_per_sec_per_device": tokens_per_sec / jax.device_count(),
      "mfu": tokens_per_sec * self.flops_per_token / self.peak_total,
    }


def _initial_state(exp: Experiment, checkpointer: Checkpointer, ckpt_cfg, config: dict) -> tuple[object, int | None]:
  """(state, saved data row cursor or None): the newest readable checkpoint of this run, else a new run's state
  (optionally with the weights, and the optimizer moments, of another run)."""
  restored = checkpointer.restore_latest(exp.abstract_state(), config)
  if restored is not None:
    check_lora_base(checkpointer.saved_config(restored.step), config, restored.path)
    return restored.state, (restored.data or {}).get("next_row")
  state = exp.init_state()
  # LoRA: init_from names the frozen base (exp.load_frozen), not where the trained adapters start.
  if ckpt_cfg.init_from and exp.model_cfg.lora_rank == 0:
    abstract = exp.abstract_state()
    opt_state = abstract.opt_state if ckpt_cfg.init_optimizer_state else None
    params, opt_state = load_params(ckpt_cfg.init_from, abstract.params, opt_state)
    # A new run: its own step 0, warmup and schedule, whatever step the source had reached.
    opt_state = restart_schedule(opt_state) if opt_state is not None else state.opt_state
    state = state.replace(params=params, opt_state=opt_state)
    what = "parameters and optimizer state" if ckpt_cfg.init_optimizer_state else "parameters"
    _log.info("initialised %s from %s; this run starts at step 0 with its own schedule", what, ckpt_cfg.init_from)
  return state, None


def check_lora_base(saved: dict | None, config: dict, path: str) -> None:
  """A LoRA checkpoint holds adapters trained on one base (checkpoint.init_from, or the random init of
  train.seed when that is empty): resuming them on another base would silently train another model."""

  def base(c: dict) -> str:
    return c["checkpoint"]["init_from"] or f"the random init of train.seed={c['train']['seed']}"

  if saved is None or saved.get("lora", {}).get("rank", 0) == 0 or base(saved) == base(config):
    return
  raise CheckpointError(
    f"checkpoint {path} holds LoRA adapters trained on {base(saved)}, but this run's base is {base(config)}; "
    "resume with the checkpoint.init_from and train.seed it was saved with, or use a new --workdir"
  )


def _use_compilation_cache(data_cfg, enabled: bool) -> None:
  """JAX's persistent compilation cache in the cache dir: a restarted or resumed run loads its compiled steps
  instead of compiling them again."""
  path = str(cache_root(data_cfg.cache_dir) / "jax")
  if enabled and jax.config.jax_compilation_cache_dir != path:
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.set_cache_dir(path)
    # Every step the run compiles, not only those over JAX's default 1 s: a restart should compile nothing.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    compilation_cache.reset_cache()  # JAX decides once per process whether to cache: in a notebook it already has


def train(cfg, workdir: str) -> dict:
  """Trains `cfg` in `workdir`, resuming from its latest checkpoint; returns the last train and eval metrics."""
  _use_compilation_cache(cfg.data, cfg.train.compilation_cache)
  is_writer = jax.process_index() == 0
  checkpointer = Checkpointer(workdir, cfg.checkpoint)  # fails now, not at the first save, if unwritable
  mesh = make_mesh(cfg.mesh)
  # Every process: the run's copy pins the tokenizer. Fine-tuning may take it from the run it builds on.
  tokenizer = data.load_tokenizer(tokenizer_data_cfg(cfg), workdir)
  exp = build(cfg, tokenizer.vocab_size, mesh)
  config_json = cfg.to_json_best_effort(indent=2, sort_keys=True)
  # Restored before config.json is rewritten: a checkpoint that does not fit must leave the run as it was.
  state, next_row = _initial_state(exp, checkpointer, cfg.checkpoint, json.loads(config_json))
  frozen = exp.load_frozen()  # models the objective reads but never trains; {} for pre-training
  if is_writer:
    (as_path(workdir) / "config.json").write_text(config_json)
  start_step, steps, batch_rows = int(state.step), cfg.train.steps, cfg.train.global_batch_size
  if start_step >= steps:
    _log.info("the run in %s is complete (step %d of %d); nothing to do", workdir, start_step, steps)
    return {"train": {}, "eval": {}, "state": state, "experiment": exp}
  # The data position is a global row cursor: the same for any number of processes, and it carries over a
  # change of batch size. Checkpoints without one were written at a constant batch size.
  start_row = next_row if next_row is not None else start_step * batch_rows
  # Once, for the train and the eval batches: the corpus's token cache, or the sft / dpo examples.
  token_cache = objectives.get(cfg.train.objective).load_documents(cfg.data, tokenizer)
  train_iter = data.make_train_iterator(
    cfg.data, tokenizer, global_batch_size=batch_rows, seed=cfg.train.seed, sharding=exp.batch_sharding,
    start_row=start_row, token_cache=token_cache,
  )  # fmt: skip
  # [] when nothing is held out (data.eval_fraction=0, or a one-document corpus): the run has no evaluation.
  eval_batches = data.make_eval_batches(
    cfg.data, tokenizer, global_batch_size=batch_rows, num_batches=cfg.train.eval_batches,
    sharding=exp.batch_sharding, token_cache=token_cache,
  )  # fmt: skip

  writer = MetricWriter(workdir, enabled=is_writer)
  tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
  throughput = _Throughput(exp.model_cfg, tokens_per_step, cfg.data.seq_len, exp.model_cfg.dtype)
  _log.info(
    "model: %.1fM parameters, %.1f MFLOPs/token; peak %.3g FLOP/s per device (%s); mesh %s; %s at step %d",
    sum(x.size for x in jax.tree.leaves((exp.abstract_params, exp.frozen_shapes.get("base", {})))) / 1e6,  # + LoRA base
    throughput.flops_per_token / 1e6,
    throughput.peak_total / jax.device_count(),
    throughput.peak_source,
    dict(mesh.shape),
    "resuming" if start_step else "starting",
    start_step,
  )

  progress = tqdm(total=steps, initial=start_step, disable=not is_writer, unit="step", dynamic_ncols=True)
  last_train, last_eval = {}, {}
  pending = None  # (step, device metrics) of the previous step, read only after the next one is dispatched

  def log_train(step: int, metrics) -> dict:
    host = jax.device_get(metrics)
    arrays = {k: np.asarray(v) for k, v in host.items() if np.ndim(v) > 0}  # e.g. per-layer expert load
    scalars = {k: float(v) for k, v in host.items() if k not in arrays and k != "tokens"}
    record = {"step": step, "loss": scalars.pop("loss"), "lr": scalars.pop("lr"), "grad_norm": scalars.pop("grad_norm")}
    record.update(throughput.rates(step))
    record.update(scalars)
    writer.write(record, arrays)
    progress.set_postfix(
      loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_sec']:.0f}"
    )
    return record

  def run_eval(step: int) -> dict:
    if not eval_batches:
      return {}
    record = {"step": step, **evaluate(exp, state.params, eval_batches, frozen)}
    writer.write(record)
    progress.write(f"step {step}: eval_loss {record['eval_loss']:.4f} (ppl {record['eval_ppl']:.2f})")
    return record

  if start_step == 0:
    last_eval = run_eval(0)  # the untrained model's loss: the baseline every later eval is read against
  throughput.mark(start_step)
  # Traced steps start after the first two of this invocation, so neither compilation nor warm-up is in them.
  profile_start = start_step + 2 if cfg.train.profile_steps > 0 and is_writer else None
  with PreemptionGuard() as preemption:
    for step in range(start_step, steps):
      if step == profile_start:
        jax.profiler.start_trace(writer.tensorboard_dir)
      state, metrics = exp.train_step(state, next(train_iter), frozen)
      done = step + 1
      if profile_start is not None and done == min(profile_start + cfg.train.profile_steps, steps):
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        progress.write(f"profiled steps {profile_start + 1}..{done}: open {workdir}/tb in TensorBoard (Profile tab)")
      if pending is not None and pending[0] % cfg.train.log_every == 0:
        last_train = log_train(*pending)
      pending = (done, metrics)
      if step == start_step:
        jax.block_until_ready(metrics)  # includes compilation
        if done % cfg.train.log_every:
          throughput.mark(done)  # keep compile time out of the first logged interval
      progress.update(1)
      if done % cfg.train.eval_every == 0 or done == steps:
        last_train = log_train(*pending)
        pending = None
        last_eval = run_eval(done)
      stop = _preemption_requested(preemption, done, cfg.train.log_every)
      if done % cfg.checkpoint.every_steps == 0 or done == steps or stop:
        position = {"next_row": start_row + (done - start_step) * batch_rows}
        checkpointer.save(done, state, position, config_json)
        writer.flush()
      if stop:
        if pending is not None:
          last_train = log_train(*pending)
        checkpointer.wait()
        progress.close()
        print(f"{stop}: saved checkpoint at step {done} in {checkpointer.directory}; exiting", flush=True)
        break
  progress.close()
  train_iter.close()  # the background thread that builds the next batch
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  if is_writer:
    plot_losses(workdir)
  return {"train": last_train, "eval": last_eval, "state": state, "experiment": exp}


def _preemption_requested(guard: PreemptionGuard, step: int, every: int) -> str | None:
  """The signal's name if a process was asked to stop. With several processes they agree (an all-gather, so
  only every `every` steps, where the loop syncs for logging anyway) and all save the same step."""
  if jax.process_count() == 1:
    return guard.requested
  if step % every:
    return None
  from jax.experimental import multihost_utils

  flags = multihost_utils.process_allgather(np.array(guard.requested is not None))
  return (guard.requested or "SIGTERM") if flags.any() else None
