"""The training loop: build, initialise or resume, step, log, evaluate, write the run directory."""

import logging
import os
import time

import jax
import numpy as np
from tqdm import tqdm

import data
from model.config import ModelConfig
from sharding.mesh import make_mesh
from trainer.checkpoint import Checkpointer, load_params
from trainer.experiment import Experiment, build
from trainer.metrics import MetricWriter, flops_per_token, peak_flops_per_device, plot_losses
from trainer.preemption import PreemptionGuard

_log = logging.getLogger(__name__)


def evaluate(exp: Experiment, params, eval_batches: list[dict]) -> dict:
  """Loss over the fixed eval batches (global arrays, placed once): the mean over all their target tokens."""
  nll, tokens = 0.0, 0.0
  for batch in eval_batches:
    batch_nll, batch_tokens = exp.eval_step(params, batch)
    nll, tokens = nll + float(batch_nll), tokens + float(batch_tokens)
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


def _initial_state(exp: Experiment, checkpointer: Checkpointer, ckpt_cfg):
  """The newest readable checkpoint of this run, else a fresh state (optionally from another run)."""
  state = checkpointer.restore_latest(exp.abstract_state(), None)
  if state is not None:
    return state
  state = exp.init_state()
  if ckpt_cfg.init_from:
    abstract = exp.abstract_state()
    opt_state = abstract.opt_state if ckpt_cfg.init_optimizer_state else None
    params, opt_state = load_params(ckpt_cfg.init_from, abstract.params, opt_state)
    state = state.replace(params=params, opt_state=opt_state if opt_state is not None else state.opt_state)
    what = "parameters and optimizer state" if opt_state is not None else "parameters"
    _log.info("initialised %s from %s", what, ckpt_cfg.init_from)
  return state


def train(cfg, workdir: str) -> dict:
  """Trains `cfg` in `workdir`, resuming from its latest checkpoint; returns the last train and eval metrics."""
  is_writer = jax.process_index() == 0
  checkpointer = Checkpointer(workdir, cfg.checkpoint)  # fails now, not at the first save, if unwritable
  mesh = make_mesh(cfg.mesh)
  tokenizer = data.load_tokenizer(cfg.data, workdir)  # every process: the run's copy pins the tokenizer
  exp = build(cfg, tokenizer.vocab_size, mesh)
  config_json = cfg.to_json_best_effort(indent=2, sort_keys=True)
  if is_writer:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_json)

  batch_size = cfg.train.global_batch_size
  # [] when nothing is held out (data.eval_fraction=0, or a corpus of one document): the run has no evaluation
  eval_batches = data.make_eval_batches(
    cfg.data, tokenizer, global_batch_size=batch_size, num_batches=cfg.train.eval_batches, sharding=exp.batch_sharding
  )
  state = _initial_state(exp, checkpointer, cfg.checkpoint)
  start_step, steps = int(state.step), cfg.train.steps
  if start_step >= steps:
    _log.info("the run in %s is complete (step %d of %d); nothing to do", workdir, start_step, steps)
    return {"train": {}, "eval": {}, "state": state, "experiment": exp}
  # TODO(loop owner): data cursor from checkpoint
  start_row = int(state.step) * batch_size
  train_iter = data.make_train_iterator(
    cfg.data,
    tokenizer,
    global_batch_size=batch_size,
    seed=cfg.train.seed,
    sharding=exp.batch_sharding,
    start_row=start_row,
  )

  writer = MetricWriter(workdir, enabled=is_writer)
  tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_len
  throughput = _Throughput(exp.model_cfg, tokens_per_step, cfg.data.seq_len, exp.model_cfg.dtype)
  _log.info(
    "model: %.1fM parameters, %.1f MFLOPs/token; peak %.3g FLOP/s per device (%s); mesh %s; %s at step %d",
    sum(x.size for x in jax.tree.leaves(exp.abstract_params)) / 1e6,
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
    record = {"step": step, **evaluate(exp, state.params, eval_batches)}
    writer.write(record)
    progress.write(f"step {step}: eval_loss {record['eval_loss']:.4f} (ppl {record['eval_ppl']:.2f})")
    return record

  if start_step == 0:
    last_eval = run_eval(0)  # the untrained model's loss: the baseline every later eval is read against
  throughput.mark(start_step)
  with PreemptionGuard() as preemption:
    for step in range(start_step, steps):
      batch = next(train_iter)
      state, metrics = exp.train_step(state, batch)
      done = step + 1
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
        checkpointer.save(done, state, None, config_json)
      if stop:
        if pending is not None:
          last_train = log_train(*pending)
        checkpointer.wait()
        progress.close()
        print(f"{stop}: saved checkpoint at step {done} in {checkpointer.directory}; exiting", flush=True)
        break
  progress.close()
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
