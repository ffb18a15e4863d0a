"""Checkpoints: exact resume after SIGKILL, SIGTERM saves, damaged checkpoints are skipped, layouts can change."""

import functools
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from storage.checkpoint import Checkpointer, CheckpointError, check_writable, load_params
from tests.helpers import VOCAB, mesh_for, mini_run_args, packed_batch, small_config, tree_snapshot
from trainer.experiment import build

ENV = {**os.environ, "XLA_FLAGS": "", "JAX_PLATFORMS": "cpu"}
RUN_STEPS = 120


def _losses(workdir) -> dict[int, float]:
  """The last logged train loss of every step (a resumed run logs the steps after its checkpoint again)."""
  losses = {}
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      record = json.loads(line)
      if "loss" in record:
        losses[record["step"]] = record["loss"]
  return losses


def _start(args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, *args], env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(workdir, step: int, proc: subprocess.Popen, timeout: float = 120) -> None:
  deadline = time.time() + timeout
  while time.time() < deadline:
    if os.path.exists(os.path.join(workdir, "metrics.jsonl")) and max(_losses(workdir), default=0) >= step:
      return
    if proc.poll() is not None:
      raise AssertionError(f"run ended early: {proc.stderr.read()[-3000:]}")
    time.sleep(0.05)
  raise AssertionError(f"step {step} was not logged within {timeout} s")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, mini_run_cache):
  root, cache = tmp_path_factory.mktemp("uninterrupted"), mini_run_cache
  args = mini_run_args(root / "run", cache, steps=RUN_STEPS)
  proc = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return _losses(root / "run"), cache


@pytest.mark.slow
def test_sigkill_and_restart_reproduces_every_loss_exactly(uninterrupted, tmp_path):
  want, cache = uninterrupted
  workdir = tmp_path / "run"
  assert_sigkill_resume_is_exact(workdir, mini_run_args(workdir, cache, steps=RUN_STEPS), want)


def assert_sigkill_resume_is_exact(workdir, args: list[str], want: dict) -> None:
  """Runs train.py `args`, SIGKILLs it mid-run, runs it again: every loss after the restored step equals `want`
  (step -> loss of the uninterrupted run)."""
  proc = _start(args)
  _wait_for_step(workdir, 10, proc)  # checkpoint 8 is committed or being written; the kill lands mid-run
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = max(_losses(workdir))
  assert killed_at < RUN_STEPS, "the run ended before the kill: make it longer"
  resumed = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  restored_step = int(re.search(r"resuming at step (\d+)", resumed.stderr).group(1))
  assert 4 <= restored_step <= killed_at
  got = _losses(workdir)
  assert sorted(got) == sorted(want)
  for step in range(restored_step + 1, max(want) + 1):
    assert got[step] == want[step], f"step {step}: {got[step]!r} != {want[step]!r}"


# SIGTERM saves and exits 0: test_multihost's preempted runs, of one process (its [1-2] case) and of two, SIGTERM
# after step 3 with no periodic checkpoint before the end, check the one "SIGTERM: saved checkpoint at step" line,
# the exit status and the checkpoint, and resume from it.


def _experiment(layout: dict):
  """The small model on `layout`, built once: the tests of one layout share its compiled init and step."""
  return _built(tuple(sorted(layout.items())))


@functools.cache
def _built(layout: tuple):
  cfg = small_config(**{"model.d_model": 64, "model.num_kv_heads": 4, **dict(layout)})
  return build(cfg, VOCAB, mesh_for(cfg))


@pytest.mark.fast
def test_restore_onto_another_layout_gives_the_same_parameters_and_next_loss(tmp_path):
  rng = np.random.default_rng(0)
  batches = [packed_batch(rng, 8, 16) for _ in range(3)]
  fsdp = _experiment({"mesh.fsdp": 8})
  state = fsdp.init_state()
  for batch in batches[:2]:
    state, _ = fsdp.train_step(state, jax.device_put(batch, fsdp.batch_sharding), {})
  checkpointer = Checkpointer(str(tmp_path), small_config().checkpoint)
  checkpointer.save(2, state, None)
  checkpointer.wait()
  saved_params = jax.device_get(state.params)
  _, want = fsdp.train_step(state, jax.device_put(batches[2], fsdp.batch_sharding), {})

  for layout in ({"mesh.tensor": 4, "mesh.data": 2}, {}):
    other = _experiment(layout)
    restored = Checkpointer(str(tmp_path), small_config().checkpoint).restore_latest(other.abstract_state()).state
    assert int(restored.step) == 2
    for a, b in zip(jax.tree.leaves(jax.device_get(restored.params)), jax.tree.leaves(saved_params)):
      np.testing.assert_array_equal(a, b)
    _, got = other.train_step(restored, jax.device_put(batches[2], other.batch_sharding), {})
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-6)


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
  exp = _experiment({})
  state = exp.init_state()
  checkpointer = Checkpointer(str(tmp_path), small_config().checkpoint)
  checkpointer.save(1, state, None)
  checkpointer.save(2, state.replace(step=state.step + 1), None)
  checkpointer.wait()
  # Truncate every data file of step 2's arrays, as a crash or a full disk would.
  damaged = 0
  for root, _, files in os.walk(tmp_path / "checkpoints" / "2" / "state"):
    for name in files:
      if "d" == os.path.basename(root) or name.endswith(".data") or "ocdbt" in root:
        with open(os.path.join(root, name), "r+b") as f:
          f.truncate(7)
        damaged += 1
  assert damaged
  with caplog.at_level(logging.WARNING):
    restored = Checkpointer(str(tmp_path), small_config().checkpoint).restore_latest(exp.abstract_state())
  assert restored.step == 1 and int(restored.state.step) == 0  # the state saved as step 1
  assert any("checkpoints/2 cannot be read" in r.getMessage() for r in caplog.records)
  assert (tmp_path / "checkpoints" / "2.corrupt").is_dir()  # kept for inspection, not deleted


def test_checkpoint_of_another_model_is_a_config_error(tmp_path):
  exp = _experiment({})
  checkpointer = Checkpointer(str(tmp_path), small_config().checkpoint)
  checkpointer.save(1, exp.init_state(), None)
  checkpointer.wait()
  other = _experiment({"model.mlp_dim": 128})
  with pytest.raises(CheckpointError, match="does not fit this config"):
    Checkpointer(str(tmp_path), small_config().checkpoint).restore_latest(other.abstract_state())
  assert (tmp_path / "checkpoints" / "1").is_dir()


def test_unwritable_run_directory_fails_at_start(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  with pytest.raises(CheckpointError, match=r"run directory .*a_file/run/checkpoints is not writable"):
    check_writable(str(blocker / "run" / "checkpoints"))
  proc = subprocess.run(
    [sys.executable, "train.py", "--config", "configs/tiny.py", f"--workdir={blocker / 'run'}"],
    env=ENV,
    capture_output=True,
    text=True,
  )
  assert proc.returncode != 0
  assert proc.stderr.strip().splitlines()[-1].startswith("error: run directory")


def test_init_from_a_run_or_a_bf16_export_loads_its_parameters(tmp_path):
  exp = _experiment({})
  state = exp.init_state()
  batch = jax.device_put(packed_batch(np.random.default_rng(1), 8, 16), exp.batch_sharding)
  state, _ = exp.train_step(state, batch, {})
  checkpointer = Checkpointer(str(tmp_path / "run"), small_config().checkpoint)
  checkpointer.save(1, state, None)
  checkpointer.wait()
  want = jax.device_get(state.params)

  fresh = _experiment({"mesh.fsdp": 8}).abstract_state()  # another layout, as a new run may use
  params, opt_state = load_params(str(tmp_path / "run"), fresh.params, fresh.opt_state)
  for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(want)):
    np.testing.assert_array_equal(a, b)
  assert int(jax.tree.leaves(opt_state)[0]) == 1  # Adam's step count came along

  export = subprocess.run(
    [sys.executable, "scripts/export_params.py", f"--run={tmp_path / 'run'}", f"--out={tmp_path / 'export'}",
     "--dtype=bfloat16"],
    env=ENV, capture_output=True, text=True,
  )  # fmt: skip
  assert export.returncode == 0, export.stderr[-2000:]
  params, _ = load_params(str(tmp_path / "export"), fresh.params)
  for a, b in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(want)):
    assert a.dtype == np.float32
    np.testing.assert_array_equal(a, b.astype(jax.numpy.bfloat16).astype(np.float32))
  with pytest.raises(CheckpointError, match="holds no checkpoint"):
    load_params(str(tmp_path / "nothing_here"), fresh.params)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A run directory with checkpoints at steps 1 and 2 of the small model, clipping at 1.0, and its config."""
  workdir = tmp_path_factory.mktemp("saved_run")
  cfg = small_config(**{"optim.clip_norm": 1.0})
  exp = build(cfg, VOCAB, mesh_for(cfg))
  state = exp.init_state()
  checkpointer = Checkpointer(str(workdir), cfg.checkpoint)
  for step in (1, 2):
    batch = jax.device_put(packed_batch(np.random.default_rng(step), 8, 16), exp.batch_sharding)
    state, _ = exp.train_step(state, batch, {})
    checkpointer.save(step, state, {"next_row": 8 * step}, cfg.to_json())
  checkpointer.wait()
  return workdir, json.loads(cfg.to_json()), jax.device_get(state.params)


@pytest.mark.parametrize(
  "change",
  [
    {"optim.clip_norm": 0.0},  # clipping turned off
    {"optim.clip_norm": 0.25, "optim.peak_lr": 1e-3, "optim.final_lr": 0.0},
    {"optim.warmup_steps": 7, "train.steps": 50, "train.log_every": 3, "checkpoint.every_steps": 5},
    {"optim.schedule": "wsd", "optim.decay_fraction": 0.5, "optim.decay_shape": "1-sqrt", "train.steps": 40},
    {"optim.weight_decay": 0.0, "optim.b2": 0.99, "train.grad_accum": 2},
    {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "optim.zero_stage": 1},  # another layout
    # Execution (model/config.py): how the step computes, never what the weights mean.
    {"model.remat": "full", "model.scan_unroll": 2, "model.attention": "chunked", "model.attention_block": 8},
    {"model.loss_chunk": 8, "model.compute_dtype": "bfloat16", "model.dropout_rate": 0.1},
  ],
)
def test_a_change_that_keeps_the_state_structure_resumes_at_the_saved_step(saved_run, change):
  workdir, _, saved_params = saved_run
  cfg = small_config(**{"optim.clip_norm": 1.0, **change})
  exp = build(cfg, VOCAB, mesh_for(cfg))
  before = tree_snapshot(workdir)
  restored = Checkpointer(str(workdir), cfg.checkpoint).restore_latest(exp.abstract_state(), json.loads(cfg.to_json()))
  assert restored.step == 2 and int(restored.state.step) == 2 and restored.data == {"next_row": 16}
  for a, b in zip(jax.tree.leaves(jax.device_get(restored.state.params)), jax.tree.leaves(saved_params)):
    np.testing.assert_array_equal(a, b)
  assert tree_snapshot(workdir) == before


@pytest.mark.parametrize(
  "change,first_difference,changed_keys",
  [
    ({"model.mlp_dim": 48}, r"params\.blocks\.mlp\.w_down_FxD has shape \(2, 64, 32\) in the checkpoint and \(2, 48,",
     r"model\.mlp_dim: 64 -> 48"),
    ({"model.num_layers": 3}, r"has shape \(2, ", r"model\.num_layers: 2 -> 3"),
    ({"model.tie_embeddings": False}, r"params\.\S+ is in this config's state but not in the checkpoint",
     r"model\.tie_embeddings: True -> False"),
  ],
)  # fmt: skip
def test_a_checkpoint_that_does_not_fit_stops_the_run_and_changes_nothing(saved_run, change, first_difference,
                                                                         changed_keys):  # fmt: skip
  message = _refused_resume(saved_run, change)
  assert "\n" not in message
  assert re.search(r"checkpoints/2 does not fit this config: ", message)
  assert re.search(first_difference, message), message
  assert re.search(changed_keys, message), message
  assert "checkpoint.init_from=" in message and "new --workdir" in message


def _refused_resume(saved_run, change: dict) -> str:
  """The one-line CheckpointError of resuming `saved_run` under `change`; asserts nothing on disk changed."""
  workdir, _, _ = saved_run
  cfg = small_config(**{"optim.clip_norm": 1.0, **change})
  exp = build(cfg, VOCAB, mesh_for(cfg))
  before = tree_snapshot(workdir)
  with pytest.raises(CheckpointError) as error:
    Checkpointer(str(workdir), cfg.checkpoint).restore_latest(exp.abstract_state(), json.loads(cfg.to_json()))
  assert tree_snapshot(workdir) == before  # names and bytes: no checkpoint renamed, skipped over or touched
  return str(error.value)


@pytest.mark.parametrize("change", [{"model.rope_theta": 500_000.0}, {"model.norm_eps": 1e-5, "model.qk_norm": False}])
def test_an_architecture_change_with_the_same_shapes_stops_the_run(saved_run, change):
  message = _refused_resume(saved_run, change)
  assert "\n" not in message and "was saved with another architecture" in message
  key, value = next((k, v) for k, v in change.items() if small_config()[k.split(".")[0]][k.split(".")[1]] != v)
  assert f"{key}: " in message and f"-> {value}" in message, message


def test_a_read_that_fails_once_is_retried_and_nothing_is_set_aside(saved_run, monkeypatch, caplog):
  workdir, _, _ = saved_run
  cfg = small_config(**{"optim.clip_norm": 1.0})
  exp = build(cfg, VOCAB, mesh_for(cfg))
  monkeypatch.setattr("storage.checkpoint._RETRY_PAUSE_S", 0.0)
  checkpointer = Checkpointer(str(workdir), cfg.checkpoint)
  real_restore, failures = checkpointer._manager.restore, []

  def flaky_restore(*args, **kwargs):
    if not failures:
      failures.append(1)
      raise OSError("connection reset by peer")
    return real_restore(*args, **kwargs)

  monkeypatch.setattr(checkpointer._manager, "restore", flaky_restore)
  with caplog.at_level(logging.WARNING):
    restored = checkpointer.restore_latest(exp.abstract_state())
  assert failures and restored.step == 2
  assert any("trying again" in r.getMessage() for r in caplog.records)
  assert sorted(os.listdir(workdir / "checkpoints")) == ["1", "2"]


def test_init_from_starts_a_new_run_with_its_own_schedule(saved_run, tmp_path):
  from trainer.loop import _initial_state

  workdir, _, saved_params = saved_run
  cfg = small_config(**{"checkpoint.init_from": str(workdir), "checkpoint.init_optimizer_state": True})
  exp = build(cfg, VOCAB, mesh_for(cfg))
  state, next_row = _initial_state(exp, Checkpointer(str(tmp_path / "new"), cfg.checkpoint), cfg.checkpoint, {})
  assert int(state.step) == 0 and next_row is None
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(saved_params)):
    np.testing.assert_array_equal(a, b)
  adam, _, schedule = state.opt_state[1]
  assert int(adam.count) == 2  # Adam's moments and their bias correction continue
  assert int(schedule.count) == 0  # the learning rate starts over: warmup from 0, as the log says
  _, metrics = exp.train_step(
    state, jax.device_put(packed_batch(np.random.default_rng(9), 8, 16), exp.batch_sharding), {}
  )
  assert float(metrics["lr"]) == 0.0  # step 0 of this run's warmup, which is also the lr applied


@pytest.mark.slow
def test_train_py_resumes_after_clipping_is_turned_off_and_refuses_another_model(uninterrupted, tmp_path):
  _, cache = uninterrupted
  workdir = tmp_path / "run"
  first = subprocess.run([sys.executable, *mini_run_args(workdir, cache, steps=8)], env=ENV, capture_output=True,
                         text=True)  # fmt: skip
  assert first.returncode == 0, first.stderr[-3000:]
  # Clipping off, a longer run, another warmup and log interval: the same state structure, so it resumes.
  args = mini_run_args(workdir, cache, steps=12) + ["--config.optim.clip_norm=0", "--config.optim.warmup_steps=5"]
  resumed = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming at step 8" in resumed.stderr
  assert sorted(_losses(workdir)) == list(range(1, 13))
  assert sorted(os.listdir(workdir / "checkpoints")) == ["12", "4", "8"]

  before = tree_snapshot(workdir)
  other = subprocess.run([sys.executable, *args, "--config.model.mlp_dim=96", "--config.train.steps=20"], env=ENV,
                         capture_output=True, text=True)  # fmt: skip
  assert other.returncode != 0
  lines = [line for line in other.stderr.splitlines() if line.strip()]
  assert lines[-1].startswith(f"error: checkpoint {workdir}/checkpoints/12 does not fit this config: params."), lines
  assert "model.mlp_dim: 64 -> 96" in lines[-1] and "train.steps: 12 -> 20" in lines[-1]
  assert tree_snapshot(workdir) == before  # every checkpoint, config.json and metrics.jsonl as they were


def _logged_steps(steps: int, log_every: int, eval_every: int) -> tuple[list[int], list[int]]:
  """(train, eval) steps a run logs, from the schedule: train every `log_every` steps, at eval steps and at the
  last; eval before the first step, every `eval_every` steps and at the last."""
  evals = sorted({0, steps, *range(eval_every, steps + 1, eval_every)})
  train = sorted({steps, *range(log_every, steps + 1, log_every), *evals} - {0})
  return train, evals


def _steps_by_kind(workdir) -> tuple[list[int], list[int]]:
  """(train, eval) steps of metrics.jsonl's lines, in file order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return [r["step"] for r in records if "loss" in r], [r["step"] for r in records if "eval_loss" in r]


@pytest.mark.fast
@pytest.mark.parametrize("torn", ['{"step": 3, "lo', '{"step": 3, "loss": 2.5}'])
def test_metric_writer_keeps_one_line_per_step_and_mends_a_torn_last_line(tmp_path, torn):
  """A kill mid-write leaves part of a line: cut off unless it is a whole record, which gets its newline."""
  from trainer.metrics import MetricWriter, read_metrics

  (tmp_path / "metrics.jsonl").write_text(
    '{"step": 0, "eval_loss": 5.0, "eval_ppl": 148.4}\n{"step": 2, "loss": 3.0}\n' + torn
  )
  writer = MetricWriter(str(tmp_path), enabled=True)
  for record in ({"step": 2, "loss": 9.0}, {"step": 3, "loss": 2.5}, {"step": 3, "eval_loss": 2.6, "eval_ppl": 13.5}):
    writer.write(record)
  writer.close()
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert (
    [json.loads(line) for line in lines]
    == read_metrics(str(tmp_path))
    == [
      {"step": 0, "eval_loss": 5.0, "eval_ppl": 148.4},
      {"step": 2, "loss": 3.0},
      {"step": 3, "loss": 2.5},
      {"step": 3, "eval_loss": 2.6, "eval_ppl": 13.5},
    ]
  )


class _Killed(Exception):
  """Stands for a SIGKILL in an in-process run."""


_KILLED_RUN = {"train.steps": 12, "train.log_every": 2, "train.eval_every": 5, "checkpoint.every_steps": 4}


@pytest.fixture(scope="module")
def killed_after_checkpoint_8(tmp_path_factory, mini_run_cache):
  """An in-process run of `_KILLED_RUN` that dies the moment its checkpoint at step 8 has committed (a logged
  step, not an eval step); returns (its run directory, its config)."""
  from tests.helpers import mini_run_config
  from trainer.loop import train

  root = tmp_path_factory.mktemp("killed")
  cfg = mini_run_config(mini_run_cache, **{"mesh.data": -1, "train.global_batch_size": 8, **_KILLED_RUN})
  real_save = Checkpointer.save

  def save_then_die(self, step, *args, **kwargs):
    real_save(self, step, *args, **kwargs)
    if step == 8:
      self.wait()
      raise _Killed

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(_Killed):
      train(cfg, str(root / "run"))
  return root / "run", cfg


@pytest.mark.parametrize("resume_at", [8, 4])
def test_a_run_killed_after_a_checkpoint_logs_every_step_once_when_resumed(killed_after_checkpoint_8, tmp_path,
                                                                          resume_at):  # fmt: skip
  """Resumed at 8, the checkpoint that had just committed: step 8's line must already be there. Resumed at 4 (as
  when the kill lands before checkpoint 8 commits): steps 5..8 run again and must not be logged twice."""
  import shutil

  from trainer.loop import train

  killed, cfg = killed_after_checkpoint_8
  workdir = tmp_path / "run"
  shutil.copytree(killed, workdir)
  if resume_at == 4:
    shutil.rmtree(workdir / "checkpoints" / "8")
  result = train(cfg, str(workdir))
  assert result["train"]["step"] == 12
  assert _steps_by_kind(workdir) == _logged_steps(12, log_every=2, eval_every=5)


def _committed_checkpoints(workdir) -> list[str]:
  """Checkpoint directories that have committed (orbax writes into a temporary name and renames on commit)."""
  directory = os.path.join(workdir, "checkpoints")
  return [name for name in os.listdir(directory) if name.isdigit()] if os.path.isdir(directory) else []


@pytest.mark.slow
def test_sigkill_right_after_a_checkpoint_then_resume_logs_each_step_once_at_real_throughput(uninterrupted, tmp_path):
  _, cache = uninterrupted
  workdir, steps, eval_every = tmp_path / "run", 40, 15
  # Steps long against the host's work per line, so that a step timed over no device work would read far too fast.
  args = mini_run_args(workdir, cache, steps=steps, every=10) + [
    f"--config.train.eval_every={eval_every}",
    "--config.train.global_batch_size=16",
    "--config.data.seq_len=128",
  ]
  proc = _start(args)
  deadline = time.time() + 120
  while not _committed_checkpoints(workdir) and proc.poll() is None and time.time() < deadline:
    time.sleep(0.001)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _committed_checkpoints(workdir) and max(_losses(workdir)) < steps, "the kill did not land mid-run"
  with open(workdir / "metrics.jsonl") as f:
    typical = float(np.median([json.loads(line)["tokens_per_sec"] for line in f if '"loss"' in line]))

  resumed = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert re.search(r"resuming at step (10|20|30)\b", resumed.stderr)
  assert _steps_by_kind(workdir) == _logged_steps(steps, log_every=1, eval_every=eval_every)
  # The intervals next to a (re)start and the end are of the same order as the killed run's: the first line (the
  # first interval of a new run), the first and last figures of the resumed run's progress bar (the first one's
  # line was written before the kill), and their median.
  with open(workdir / "metrics.jsonl") as f:
    first_line = next(json.loads(line)["tokens_per_sec"] for line in f if '"loss"' in line)
  shown = [float(x) for x in re.findall(r"tok_s=(\d+)", resumed.stderr)]
  assert shown, resumed.stderr[-3000:]
  for name, rate in [("step 1", first_line), ("first after the restart", shown[0]), ("last", shown[-1]),
                     ("median after the restart", float(np.median(shown)))]:  # fmt: skip
    assert typical / 10 < rate < typical * 10, f"{name}: {rate:.0f} tokens/s against {typical:.0f} before the kill"
