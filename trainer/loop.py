"""The training loop: build, initialise or resume, step, log, evaluate, write the run directory.

A train line is logged every `train.log_every` steps, at eval steps, at the last step and at a preempted one.
Each step's metrics stay on the device until the next step has been dispatched, so the device has work while the
host reads them. A step followed by a pause (an eval, a checkpoint, the end of the profile, the run or a
preemption) is read at once instead: its train line, and its eval line, are in metrics.jsonl before a checkpoint
that holds the step is started. A resumed run repeats the steps between its checkpoint and the moment the last run
stopped, bit-exactly; the MetricWriter does not write a line again for a step metrics.jsonl already records, so the
file ends up with one train line per logged step and one eval line per eval step, appended only.

Throughput is the tokens of the steps the device has finished between two host timestamps over the time between
them; compilation and the pauses fall in no interval (`_Throughput`).
"""

import dataclasses
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
from storage.checkpoint import Checkpointer, load_params
from trainer.experiment import Experiment, build
from trainer.metrics import MetricWriter, flops_per_token, peak_flops_per_device, plot_losses
from trainer.optim import restart_schedule
from trainer.preemption import PreemptionGuard

_log = logging.getLogger(__name__)


def evaluate(exp: Experiment, params, eval_batches: list[dict] | dict[str, list[dict]], frozen: dict) -> dict:
  """Loss over the fixed eval batches (global arrays, placed once): the mean over all their target tokens (over
  their pairs for dpo). A mixture's {source: batches} adds `eval_loss/<source>`, each source's own mean."""
  named = eval_batches if isinstance(eval_batches, dict) else {"": eval_batches}
  # Every batch is dispatched before any result is read: one wait for the whole evaluation, not one per batch.
  sums = jax.device_get({name: [exp.eval_step(params, b, frozen) for b in batches] for name, batches in named.items()})
  totals = {name: (sum(float(n) for n, _ in s), sum(float(t) for _, t in s)) for name, s in sums.items()}
  loss = sum(n for n, _ in totals.values()) / max(sum(t for _, t in totals.values()), 1.0)
  out = {"eval_loss": loss, "eval_ppl": float(np.exp(min(loss, 80.0)))}
  if isinstance(eval_batches, dict):
    out.update({f"eval_loss/{name}": n / max(t, 1.0) for name, (n, t) in totals.items()})
  return out


class _Throughput:
  """Tokens/s and MFU over intervals between host timestamps, each taken when the device had finished a known
  number of steps: the tokens of the steps completed in between over the time in between.

  `restart` opens a new interval without measuring one: at the first step after compilation and after each pause
  (eval, checkpoint, profile), so that none of them is counted as training time."""

  def __init__(self, model_cfg: ModelConfig, tokens_per_step: int, seq_len: int, compute_dtype):
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token(model_cfg, seq_len)
    peak, self.peak_source = peak_flops_per_device(compute_dtype)
    self.peak_total = peak * jax.device_count()
    self._mark: tuple[int, float] | None = None  # (steps completed, host time)
    self._latest: dict = {}

  def restart(self, completed: int) -> None:
    """The device has just completed step `completed` and no interval runs: the next one starts here."""
    self._mark = (completed, time.perf_counter())

  def rates(self, completed: int) -> dict:
    """Rates over the steps completed since the last timestamp, the device having just completed step
    `completed`. When no step has completed since (a step read right after the one before it), the latest
    interval's rates; {} before any interval."""
    now = time.perf_counter()
    assert self._mark is not None, "rates() before restart()"
    since_step, since_time = self._mark
    if completed > since_step:
      tokens_per_sec = (completed - since_step) * self.tokens_per_step / max(now - since_time, 1e-9)
      self._latest = {
        "tokens_per_sec": tokens_per_sec,
        "tokens_per_sec_per_device": tokens_per_sec / jax.device_count(),
        "mfu": tokens_per_sec * self.flops_per_token / self.peak_total,
      }
      self._mark = (completed, now)
    return self._latest


def _ready(tree) -> bool:
  """Whether the device has finished computing every array of `tree`."""
  return all(leaf.is_ready() for leaf in jax.tree.leaves(tree) if isinstance(leaf, jax.Array))


@dataclasses.dataclass
class _Pending:
  """A dispatched step whose metrics have not been read yet."""

  step: int
  metrics: dict  # on the device
  due: bool  # whether the step's train line is to be written


class _MetricsLogger:
  """The run's train and eval lines: holds each step's device metrics until they can be read without making the
  device wait, times throughput, writes through the MetricWriter and keeps the progress bar."""

  def __init__(self, writer: MetricWriter, throughput: _Throughput, progress: tqdm):
    self.writer, self.throughput, self.progress = writer, throughput, progress
    self.last_train, self.last_eval = {}, {}
    self._pending: _Pending | None = None

  def dispatched(self, step: int, metrics: dict, due: bool) -> None:
    """Step `step` has been dispatched; `due`: its train line is to be written. The line of the step before, if
    due, is written now, while this one runs."""
    previous, self._pending = self._pending, _Pending(step, metrics, due)
    if previous is None:
      # The first step since a (re)start or a pause: its call compiled or followed the pause; time from here.
      self.throughput.restart(step if _ready(metrics) else step - 1)
    elif previous.due:
      self._write_train(previous, following=self._pending)
    self.progress.update(1)

  def before_pause(self) -> None:
    """The last dispatched step is followed by host work (eval, checkpoint, end of a profile or of the run):
    its line is written now, and the device is waited for, so the pause falls in no throughput interval."""
    pending, self._pending = self._pending, None
    if pending is None:  # already read (the step before a pause)
      return
    if pending.due:
      self._write_train(pending, following=None)
    else:
      jax.block_until_ready(pending.metrics)

  def write_eval(self, step: int, metrics: dict) -> None:
    self.last_eval = {"step": step, **metrics}
    self.writer.write(self.last_eval)
    shown = [f"eval_loss {metrics['eval_loss']:.4f} (ppl {metrics['eval_ppl']:.2f})"] if "eval_loss" in metrics else []
    shown += [f"{k} {v:.4g}" for k, v in metrics.items() if k.startswith("eval/")]
    self.progress.write(f"step {step}: {', '.join(shown)}")

  def _write_train(self, pending: _Pending, following: _Pending | None) -> None:
    host = jax.device_get(pending.metrics)
    # Reading waited for `pending.step`; the step dispatched after it may be done too (synchronous dispatch, the
    # CPU backend's, finishes each step before the call returns): the timestamp counts every finished step.
    ahead = following is not None and _ready(following.metrics)
    rates = self.throughput.rates(following.step if ahead else pending.step)
    arrays = {k: np.asarray(v) for k, v in host.items() if np.ndim(v) > 0}  # e.g. per-layer expert load
    scalars = {k: float(v) for k, v in host.items() if k not in arrays and k != "tokens"}
    record = {
      "step": pending.step,
      "loss": scalars.pop("loss"),
      "lr": scalars.pop("lr"),
      "grad_norm": scalars.pop("grad_norm"),
    }
    record.update(rates)
    record.update(scalars)
    self.writer.write(record, arrays)
    tok_s = f"{record['tokens_per_sec']:.0f}" if rates else "-"
    self.progress.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}", tok_s=tok_s)
    self.last_train = record


def _initial_state(exp: Experiment, checkpointer: Checkpointer, ckpt_cfg, config: dict) -> tuple[object, dict | None]:
  """(state, the checkpoint's data item or None): the newest readable checkpoint of this run, else a new run's
  state (optionally with the weights, and the optimizer moments, of another run)."""
  restored = checkpointer.restore_latest(exp.abstract_state(), config)
  if restored is not None:
    return restored.state, restored.data
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


@dataclasses.dataclass(frozen=True)
class _Schedule:
  """Which steps (optimizer updates completed) the loop logs, evaluates, checkpoints and profiles."""

  steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  profile: range  # the steps whose dispatch is traced; empty when not profiling

  def evaluates(self, step: int) -> bool:
    return step % self.eval_every == 0 or step == self.steps

  def logs(self, step: int) -> bool:
    return step % self.log_every == 0 or self.evaluates(step)

  def checkpoints(self, step: int) -> bool:
    return step % self.checkpoint_every == 0 or step == self.steps


@dataclasses.dataclass
class _Run:
  """What the steps of one invocation of `train` share."""

  exp: Experiment
  frozen: dict
  eval_batches: list[dict] | dict[str, list[dict]]
  checkpointer: Checkpointer
  logger: _MetricsLogger
  schedule: _Schedule
  config_json: str
  start_step: int
  source: objectives.BatchSource
  workdir: str
  tasks: object = None  # evaluation.training.TrainingTasks of train.eval_tasks, or None
  named_eval: dict = dataclasses.field(default_factory=dict)  # data.eval_files: {name: fixed eval batches}

  def evaluate(self, state) -> dict | None:
    """The eval metrics of `state`: the corpus's held-out loss and each named set's (`eval_loss/<name>`); None
    when nothing is held out (data.eval_fraction=0 or a one-document corpus, and no data.eval_files)."""
    metrics = evaluate(self.exp, state.params, self.eval_batches, self.frozen) if self.eval_batches else {}
    for name, batches in self.named_eval.items():
      named = evaluate(self.exp, state.params, batches, self.frozen)
      metrics[f"eval_loss/{name}"], metrics[f"eval_ppl/{name}"] = named["eval_loss"], named["eval_ppl"]
    return metrics or None

  def tasks_due(self, step: int) -> bool:
    return self.tasks is not None and self.tasks.due(step)


def _after_step(run: _Run, done: int, state, metrics: dict, preemption: PreemptionGuard) -> str | None:
  """The bookkeeping of the step that completes `done`, just dispatched: its train line, eval, end of the
  profile, checkpoint. Returns the signal's name when the run was asked to stop (it has saved)."""
  schedule = run.schedule
  stop = _preemption_requested(preemption, done, schedule.log_every)
  if stop is not None and not run.source.can_stop(done):
    stop = None  # the source cannot resume exactly from here (mid rollout batch): the next step that can stops
  run.logger.dispatched(done, metrics, due=schedule.logs(done) or stop is not None)
  evaluates, saves = schedule.evaluates(done), schedule.checkpoints(done) or stop is not None
  profile_ends = bool(schedule.profile) and done == schedule.profile.stop
  tasks_due = run.tasks_due(done)
  if not (evaluates or saves or profile_ends or tasks_due):
    return None
  run.logger.before_pause()
  if profile_ends:
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    run.logger.progress.write(
      f"profiled steps {schedule.profile.start + 1}..{done}: open {run.workdir}/tb in TensorBoard (Profile tab)"
    )
  eval_metrics = (run.evaluate(state) or {}) if evaluates else {}
  if tasks_due:  # one eval line per step: the held-out loss and the tasks' figures together
    eval_metrics.update(run.tasks(state.params, run.frozen))
  if eval_metrics:
    run.logger.write_eval(done, eval_metrics)
  if saves:
    run.logger.writer.flush()  # an object store gets the lines before the checkpoint that holds their steps
    run.checkpointer.save(done, state, run.source.position(done), run.config_json)
  return stop


def _save_before_failing(run: _Run, done: int, state) -> None:
  """Saves the steps completed since the last checkpoint when the run is about to stop on bad user input, so that
  the fixed run resumes where this one stopped."""
  if done == run.start_step or run.schedule.checkpoints(done) or not run.source.can_stop(done):
    return
  run.logger.before_pause()
  run.logger.writer.flush()
  run.checkpointer.save(done, state, run.source.position(done), run.config_json)
  run.checkpointer.wait()
  _log.info("saved checkpoint at step %d before stopping", done)


def _train_steps(run: _Run, state):
  """Steps from `run.start_step` to the end of the schedule, or to a preemption; returns the last state."""
  if run.start_step == 0 and (baseline := run.evaluate(state)) is not None:
    run.logger.write_eval(0, baseline)  # the untrained model's loss: every later eval is read against it
  with PreemptionGuard() as preemption:
    for step in range(run.start_step, run.schedule.steps):
      if step == run.schedule.profile.start and run.schedule.profile:
        jax.profiler.start_trace(run.logger.writer.tensorboard_dir)
      try:
        batch, host_metrics = run.source.next(state)
      except data.DataError:  # e.g. a reward function failed: keep the steps done so far, then stop
        _save_before_failing(run, step, state)
        raise
      state, metrics = run.exp.train_step(state, batch, run.frozen)
      stop = _after_step(run, step + 1, state, {**metrics, **host_metrics}, preemption)
      if stop:
        run.checkpointer.wait()
        run.logger.progress.close()
        print(f"{stop}: saved checkpoint at step {step + 1} in {run.checkpointer.directory}; exiting", flush=True)
        break
  return state


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
  state, saved_position = _initial_state(exp, checkpointer, cfg.checkpoint, json.loads(config_json))
  frozen = exp.load_frozen()  # models the objective reads but never trains; {} for pre-training
  if is_writer:
    (as_path(workdir) / "config.json").write_text(config_json)
  start_step, steps, batch_rows = int(state.step), cfg.train.steps, cfg.train.global_batch_size
  if start_step >= steps:
    _log.info("the run in %s is complete (step %d of %d); nothing to do", workdir, start_step, steps)
    return {"train": {}, "eval": {}, "state": state, "experiment": exp}
  make_batches = objectives.get(cfg.train.objective).batches or _stream_batches
  source, eval_batches = make_batches(cfg, tokenizer, exp, frozen, start_step, saved_position)

  writer = MetricWriter(workdir, enabled=is_writer)
  throughput = _Throughput(exp.model_cfg, batch_rows * cfg.data.seq_len, cfg.data.seq_len, exp.model_cfg.dtype)
  _log_start(exp, throughput, mesh, start_step)
  progress = tqdm(total=steps, initial=start_step, disable=not is_writer, unit="step", dynamic_ncols=True)
  run = _Run(
    exp=exp, frozen=frozen, eval_batches=eval_batches, checkpointer=checkpointer,
    logger=_MetricsLogger(writer, throughput, progress),
    schedule=_schedule(cfg, start_step, profiles=is_writer), config_json=config_json,
    start_step=start_step, source=source, workdir=workdir, tasks=_training_tasks(cfg, exp, tokenizer),
    named_eval=_named_eval_batches(cfg, tokenizer, exp),
  )  # fmt: skip
  state = _train_steps(run, state)
  progress.close()
  source.close()  # e.g. the background thread that builds the next batch
  checkpointer.wait()
  checkpointer.close()
  writer.close()
  if is_writer:
    plot_losses(workdir)
  return {"train": run.logger.last_train, "eval": run.logger.last_eval, "state": state, "experiment": exp}


def _training_tasks(cfg, exp: Experiment, tokenizer):
  """train.eval_tasks, ready to run on the live parameters; None without any (lm-eval is imported only then)."""
  if not cfg.train.eval_tasks:
    return None
  from evaluation.training import TrainingTasks

  return TrainingTasks(cfg.train, exp, tokenizer, cfg.data.chat_template)


def _named_eval_batches(cfg, tokenizer, exp: Experiment) -> dict:
  """data.eval_files: {name: fixed eval batches} of each named held-out set ({} without any)."""
  if not cfg.data.get("eval_files"):
    return {}
  from evaluation.heldout import named_eval_batches

  return named_eval_batches(
    cfg.data, tokenizer, global_batch_size=cfg.train.global_batch_size, num_batches=cfg.train.eval_batches,
    sharding=exp.batch_sharding,
  )  # fmt: skip


class _StreamBatches:
  """The batches of a data stream (objectives' `load_documents`): step s takes global rows from a cursor that
  advances by the batch size, whatever the state."""

  def __init__(self, train_iter, start_step: int, start_row: int, batch_rows: int):
    self._iter, self._start_step, self._start_row, self._rows = train_iter, start_step, start_row, batch_rows

  def next(self, state) -> tuple[dict, dict]:
    del state
    return next(self._iter), {}

  def position(self, done: int) -> dict:
    return {"next_row": self._start_row + (done - self._start_step) * self._rows}

  def can_stop(self, done: int) -> bool:
    del done
    return True

  def close(self) -> None:
    self._iter.close()  # the background thread that builds the next batch


def _stream_batches(cfg, tokenizer, exp: Experiment, frozen: dict, start_step: int, saved: dict | None):
  """(the train batches from the saved row cursor, the fixed eval batches)."""
  del frozen
  batch_rows = cfg.train.global_batch_size
  # The data position is a global row cursor: the same for any number of processes, and it carries over a
  # change of batch size. Checkpoints without one were written at a constant batch size.
  start_row = (saved or {}).get("next_row", start_step * batch_rows)
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
  return _StreamBatches(train_iter, start_step, start_row, batch_rows), eval_batches


def _schedule(cfg, start_step: int, profiles: bool) -> _Schedule:
  # Traced steps start after the first two of this invocation, so neither compilation nor warm-up is in them.
  profile_start = start_step + 2
  profile_end = min(profile_start + cfg.train.profile_steps, cfg.train.steps)
  return _Schedule(
    steps=cfg.train.steps,
    log_every=cfg.train.log_every,
    eval_every=cfg.train.eval_every,
    checkpoint_every=cfg.checkpoint.every_steps,
    profile=range(profile_start, profile_end) if profiles and cfg.train.profile_steps > 0 else range(0),
  )


def _log_start(exp: Experiment, throughput: _Throughput, mesh, start_step: int) -> None:
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
