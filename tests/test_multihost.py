"""Several processes train exactly like one: jax.distributed over gloo on this machine, 2 x 4 CPU devices."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from ml_collections import ConfigDict

from parallel.mesh import make_mesh
from storage.checkpoint import Checkpointer
from tests.helpers import mini_run_args
from trainer.experiment import build

LAYOUTS = {"fsdp8": {"mesh.fsdp": 8}, "data2_tensor4": {"mesh.data": 2, "mesh.tensor": 4}}
STEPS = 24


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _args(workdir, cache, layout: dict, steps: int = STEPS) -> list[str]:
  overrides = {
    "mesh.data": 1,
    **layout,
    "model.num_heads": 4,
    "model.num_kv_heads": 4,
    "model.dropout_rate": 0.0,
    "train.global_batch_size": 8,  # the same global rows per step whether one process loads them or two do
  }
  args = mini_run_args(workdir, cache, steps=steps, every=steps)
  return [a for a in args if not a.startswith("--config.mesh.")] + [f"--config.{k}={v}" for k, v in overrides.items()]


def _env(devices: int) -> dict:
  return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}


def _start_processes(args: list[str], num_processes: int) -> list[subprocess.Popen]:
  """train.py as `num_processes` processes of one job (a plain single process for 1), 8 devices in all."""
  port = _free_port()
  job = lambda i: [f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={num_processes}", f"--process_id={i}"]
  return [
    subprocess.Popen(
      [sys.executable, *args, *(job(i) if num_processes > 1 else [])],
      env=_env(8 // num_processes),
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(num_processes)
  ]


def _run_processes(args: list[str], num_processes: int, timeout: float = 300) -> list[subprocess.CompletedProcess]:
  procs = _start_processes(args, num_processes)
  results = []
  for proc in procs:
    out, err = proc.communicate(timeout=timeout)
    results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
  return results


@pytest.fixture(scope="module")
def cache(mini_run_cache):
  return mini_run_cache


def _losses_by_step(workdir) -> dict[int, float]:
  """The last logged train loss of each step (a resumed run logs the steps after its checkpoint again)."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted_one_process(tmp_path_factory, cache):
  """layout -> (train loss by step, run directory) of one process, each run once."""
  runs = {}

  def get(layout: str):
    if layout not in runs:
      workdir = tmp_path_factory.mktemp(f"one_{layout}")
      args = _args(workdir, cache, LAYOUTS[layout])
      proc = subprocess.run([sys.executable, *args], env=_env(8), capture_output=True, text=True)
      assert proc.returncode == 0, proc.stderr[-3000:]
      runs[layout] = _losses_by_step(workdir), workdir
    return runs[layout]

  return get


def _preempt(procs: list[subprocess.Popen], workdir, after_step: int, timeout: float = 300) -> int:
  """SIGTERMs every process once `after_step` is logged; returns the step they agreed to save and stop at."""
  deadline = time.time() + timeout
  metrics = os.path.join(workdir, "metrics.jsonl")
  while not (os.path.exists(metrics) and max(_losses_by_step(workdir), default=0) >= after_step):
    assert time.time() < deadline and all(p.poll() is None for p in procs), procs[0].stderr.read()[-3000:]
    time.sleep(0.05)
  for proc in procs:
    proc.send_signal(signal.SIGTERM)
  outputs = [proc.communicate(timeout=timeout) for proc in procs]
  for proc, (_, err) in zip(procs, outputs):
    assert proc.returncode == 0, err[-3000:]
  lines = [x for x in outputs[0][0].splitlines() if x.startswith("SIGTERM")]
  assert len(lines) == 1 and lines[0].startswith("SIGTERM: saved checkpoint at step"), outputs[0][0][-3000:]
  step = int(lines[0].split("at step ")[1].split()[0])
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))
  return step


# Every two-process run of this file is a part of a preempted run: one layout starts as two processes and
# resumes as one, the other starts as one and resumes as two. Each of their losses is the one-process run's.
@pytest.mark.slow
@pytest.mark.parametrize("first,then,layout", [(2, 1, "fsdp8"), (1, 2, "data2_tensor4")])
def test_two_processes_train_like_one_and_resume_with_another_process_count(first, then, layout,
                                                                           uninterrupted_one_process, cache,
                                                                           tmp_path):  # fmt: skip
  workdir = tmp_path / "run"
  args = _args(workdir, cache, LAYOUTS[layout])
  stopped_at = _preempt(_start_processes(args, first), workdir, after_step=3)
  assert 3 <= stopped_at < STEPS, "the run ended before the preemption: make it longer"
  results = _run_processes(args, then)
  for r in results:
    assert r.returncode == 0, r.stderr[-3000:]
  assert f"resuming at step {stopped_at}" in results[0].stderr
  got, (want, one_process) = _losses_by_step(workdir), uninterrupted_one_process(layout)
  assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
  # The same global batches at every step, before and after the move (a wrong batch would be off by far more).
  np.testing.assert_allclose([got[s] for s in sorted(want)], [want[s] for s in sorted(want)], rtol=1e-5)
  # One line per step, the two processes' steps included: process 1 writes no metrics.
  assert _train_steps(workdir) == list(range(1, STEPS + 1))
  if then == 2:
    assert "[process 1]" in results[1].stderr  # log lines say which process wrote them
    # The checkpoint both processes wrote at the end restores in this single process, onto its 8 devices, to the
    # parameters of the one-process run.
    for a, b in zip(jax.tree.leaves(_restored_params(workdir)), jax.tree.leaves(_restored_params(one_process))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _train_steps(workdir) -> list[int]:
  """The step of every train line of metrics.jsonl, in file order."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [r["step"] for r in map(json.loads, f) if "loss" in r]


def _restored_params(run):
  cfg = ConfigDict(json.load(open(os.path.join(run, "config.json"))))
  exp = build(cfg, cfg.data.vocab_size, make_mesh(cfg.mesh))
  state = Checkpointer(str(run), cfg.checkpoint).restore_latest(exp.abstract_state()).state
  assert int(state.step) == STEPS
  return jax.device_get(state.params)


def _tiny_cmd(workdir, port: int, *flags: str) -> list[str]:
  """train.py on tiny as one process of a job whose coordinator is at 127.0.0.1:port."""
  return [sys.executable, "train.py", "--config", "configs/tiny.py", f"--workdir={workdir}",
          f"--coordinator_address=127.0.0.1:{port}", *flags]  # fmt: skip


@pytest.mark.fast
def test_unreachable_coordinator_fails_in_one_line_within_the_timeout(tmp_path):
  port = _free_port()  # nothing listens here
  start = time.time()
  proc = subprocess.run(
    _tiny_cmd(tmp_path, port, "--num_processes=2", "--process_id=1", "--distributed_timeout_s=3"),
    env=_env(4),
    capture_output=True,
    text=True,
    timeout=60,
  )
  assert proc.returncode != 0
  assert time.time() - start < 30
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert lines == [
    f"error: no coordinator answered at 127.0.0.1:{port} (process 1 of 2 waited until the timeout); "
    "start process 0 there, or fix --coordinator_address"
  ]


def test_mismatched_process_counts_fail_in_one_line(tmp_path):
  port = _free_port()
  procs = [
    subprocess.Popen(
      _tiny_cmd(tmp_path, port, f"--num_processes={n}", f"--process_id={i}", "--distributed_timeout_s=20"),
      env=_env(4),
      stderr=subprocess.PIPE,
      text=True,
    )
    for i, n in ((0, 2), (1, 3))
  ]
  for proc in procs:
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert err.strip().splitlines()[-1] == (
      "error: process 1 was started with --num_processes=3 but process 0 with 2; give every process the same count"
    )


def _grpo_args(workdir, cache, layout: dict) -> list[str]:
  """A 4-step GRPO run of a 2-layer model on examples/grpo.jsonl: 2 prompts x 4 completions per rollout."""
  overrides = {
    **layout, "model.num_layers": 2, "model.d_model": 64, "model.num_heads": 4, "model.num_kv_heads": 4,
    "model.mlp_dim": 128, "data.vocab_size": 512, "data.cache_dir": cache, "data.seq_len": 48,
    "data.chat_template": "{content}", "grpo.prompts_per_step": 2, "grpo.group_size": 4, "grpo.max_new_tokens": 8,
    "grpo.rewards": "format,overlong", "grpo.overlong_window": 4, "grpo.beta": 0.04,
    "train.global_batch_size": 8, "train.steps": 4, "train.log_every": 1, "checkpoint.every_steps": 4,
    "optim.warmup_steps": 1, "optim.peak_lr": 1e-2,
    # lm-eval tasks at the last step: process 0 drives the harness, process 1 follows its device calls.
    "train.eval_tasks": "examples/eval/kiln_ppl.yaml,examples/eval/kiln_gen.yaml", "train.eval_tasks_limit": 2,
  }  # fmt: skip
  return ["train.py", "--config", "configs/grpo_tiny.py", f"--workdir={workdir}"] + [
    f"--config.{k}={v}" for k, v in overrides.items()
  ]


@pytest.mark.slow
def test_two_processes_roll_out_score_and_update_as_one(cache, tmp_path):
  """GRPO over fsdp x tensor on 2 x 4 devices: each process generates and scores the rows its devices hold; the
  rewards, advantages (over whole groups) and updates are those of one process. So are the lm-eval figures of
  the last step (rolling log-likelihoods and generations), which process 0 drives and process 1 follows."""
  layout = {"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2}
  records = {}
  for processes in (1, 2):
    workdir = tmp_path / f"p{processes}"
    for r in _run_processes(_grpo_args(workdir, cache, layout), processes):
      assert r.returncode == 0, r.stderr[-3000:]
    records[processes] = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
  one, two = ([r for r in records[n] if "loss" in r] for n in (1, 2))  # the train lines
  assert [r["step"] for r in one] == [r["step"] for r in two] == [1, 2, 3, 4]
  for name in ("reward_mean", "reward_std", "reward/format", "completion_len_mean", "loss", "kl", "grad_norm"):
    np.testing.assert_allclose([r[name] for r in two], [r[name] for r in one], rtol=2e-5, atol=1e-6, err_msg=name)
  evals = {n: next(r for r in records[n] if "eval/kiln_ppl/bits_per_byte" in r) for n in (1, 2)}
  assert evals[1]["step"] == evals[2]["step"] == 4
  for name in ("eval/kiln_ppl/bits_per_byte", "eval/kiln_gen/exact_match"):
    np.testing.assert_allclose(evals[2][name], evals[1][name], rtol=2e-5, err_msg=name)
