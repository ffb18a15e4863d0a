"""Pipeline parallelism: every schedule trains exactly like stage=1, the tables have the textbook bubble, 1f1b
keeps fewer activations than gpipe, and checkpoints move between stage counts."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from parallel import schedules
from parallel.hlo import collectives
from settings import ConfigError
from storage.checkpoint import Checkpointer
from tests.helpers import VOCAB, mesh_for, packed_batch, small_config
from trainer.experiment import build

M = 4  # pipeline microbatches in the training comparisons
SCHEDULES = {"gpipe": {}, "1f1b": {}, "circular": {"pipeline.repeats": 2}}
LAYOUTS = {
  "stage4_data2": {"mesh.stage": 4, "mesh.data": 2},
  "moe_stage2_expert2_data2": {"mesh.stage": 2, "mesh.expert": 2, "mesh.data": 2},
  # The head's weight is split over fsdp and tensor; gathering it in the last stage's branch once hung the step.
  # grad_accum=2: each of its two microbatches is split again into the pipeline's M.
  "stage2_fsdp2_tensor2_accum2": {"mesh.stage": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.grad_accum": 2},
}
# 8 layers: 4 stages x 2 repeats of one layer. The MoE model has an MoE layer every 2 (4 units of 2 layers)
# and tight capacity, so tokens are dropped: that only matches stage=1 if the microbatches hold the same rows.
DENSE = {"model.num_layers": 8, "train.global_batch_size": 16}
MOE = {
  **DENSE,
  "moe.num_experts": 4,
  "moe.every": 2,
  "moe.expert_mlp_dim": 32,
  "moe.num_shared_experts": 1,
  "moe.capacity_factor": 1.0,
}


def _config(layout: str, schedule: str | None):
  model = MOE if layout.startswith("moe") else DENSE
  if schedule is None:
    # The stage=1 reference. MoE: grad_accum=M splits the batch into the pipeline's microbatches, since the
    # capacity rule and the balancing loss depend on which tokens share a microbatch (dense: any split).
    return small_config(**model, **({"train.grad_accum": M} if layout.startswith("moe") else {}))
  return small_config(
    **model, **LAYOUTS[layout], **{"pipeline.schedule": schedule, "pipeline.microbatches": M}, **SCHEDULES[schedule]
  )


@pytest.fixture(scope="module")
def batches():
  rng = np.random.default_rng(0)
  return [packed_batch(rng, 16, 16) for _ in range(3)]


def _train(cfg, batches, init=None):
  """Like helpers.run_steps, but starts from `init` (a host TrainState) when given, so the pipelined runs
  start from the reference's initial state without compiling an initializer each; returns the initial state."""
  exp = build(cfg, VOCAB, mesh_for(cfg))
  # The compile the first step would make (jit's cache is shared), checked before anything runs: a hang there
  # would abort the whole test process after XLA's 40 s rendezvous timeout.
  if exp.pipeline is not None:
    hlo = exp.train_step.lower(exp.abstract_state(), exp.abstract_batch(), {}).compile().as_text()
    assert not _permutes_in_branches(hlo), f"collective-permutes in a branch: {_permutes_in_branches(hlo)}"
  state = exp.init_state() if init is None else jax.device_put(init, exp.state_sharding)
  init = jax.device_get(state)
  losses = []
  for batch in batches:
    state, metrics = exp.train_step(state, jax.device_put(batch, exp.batch_sharding), {})
    losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(state.params), exp, init


def _permutes_in_branches(hlo: str) -> list[str]:
  """The collective-permutes of optimized HLO text inside a conditional's branches or what those call. The stages
  take different branches at the same tick, and XLA runs a collective-permute as one rendezvous of every device."""
  bodies, name = {}, None
  for line in hlo.splitlines():
    header = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
    if header:
      name, bodies[header.group(1)] = header.group(1), []
    elif name is not None:
      bodies[name].append(line)
  names = lambda text: set(re.findall(r"%([\w.\-]+)", text)) & bodies.keys()  # noqa: E731
  todo = names(" ".join(re.findall(r"branch_computations=\{([^}]*)\}", hlo)))
  seen = set()
  while todo:
    name = todo.pop()
    seen.add(name)
    todo |= names(" ".join(bodies[name])) - seen
  return [line.strip() for name in seen for line in bodies[name] if re.search(r" collective-permute(-start)?\(", line)]


@pytest.fixture(scope="module")
def runs(batches):
  """(layout, schedule or None for stage=1) -> (losses, final params, experiment, initial state), once each."""
  cache = {}

  def get(layout: str, schedule: str | None):
    reference = (layout.startswith("moe"), None)
    if reference not in cache:
      cache[reference] = _train(_config(layout, None), batches)
    key = reference if schedule is None else (layout, schedule)
    if key not in cache:
      cache[key] = _train(_config(layout, schedule), batches, init=cache[reference][3])
    return cache[key]

  return get


# A Latin square of schedules and layouts: every schedule on two layouts, every layout under two schedules (the
# full 3 x 3 took half a minute more of the suite and crossed no new code path). The fast tests take one schedule
# on a layout with stage, tensor and data axes and gradient accumulation.
SQUARE = [
  ("gpipe", "stage2_fsdp2_tensor2_accum2"),
  ("gpipe", "moe_stage2_expert2_data2"),
  ("1f1b", "stage4_data2"),
  ("1f1b", "stage2_fsdp2_tensor2_accum2"),
  ("circular", "stage4_data2"),
  ("circular", "moe_stage2_expert2_data2"),
]


@pytest.mark.parametrize(
  "schedule,layout",
  [pytest.param(s, lay, marks=pytest.mark.fast) if (s, lay) == SQUARE[0] else (s, lay) for s, lay in SQUARE],
)
def test_pipeline_trains_like_one_stage(schedule, layout, runs):
  want_losses, want_params, _, _ = runs(layout, None)
  losses, params, exp, _ = runs(layout, schedule)
  assert exp.mesh.shape["stage"] == LAYOUTS[layout]["mesh.stage"] and exp.mesh.devices.size == 8
  np.testing.assert_allclose(losses, want_losses, rtol=1e-6)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_stacked_layers_are_split_over_stages_and_initialise_as_one_stage(runs):
  _, _, exp, init = runs("stage4_data2", "1f1b")
  kernel = exp.shardings.params["blocks"]["mlp"]["w_up_DxF"]
  assert kernel.spec[0] == "stage"
  assert kernel.shard_shape((8, 32, 64))[0] == 2  # 8 layers over 4 stages
  params = exp.init_state().params
  assert params["blocks"]["mlp"]["w_up_DxF"].sharding.spec[0] == "stage"
  for got, want in zip(jax.tree.leaves(jax.device_get(params)), jax.tree.leaves(init.params), strict=True):
    np.testing.assert_array_equal(got, want)


@pytest.mark.fast
@pytest.mark.parametrize("schedule", list(SCHEDULES))
@pytest.mark.parametrize("stages,microbatches,repeats", [(2, 2, 2), (4, 4, 2), (4, 16, 3), (3, 7, 2)])
def test_table_bubble_is_the_formula(schedule, stages, microbatches, repeats):
  repeats = repeats if schedule == "circular" else 1
  table = schedules.make_schedule(schedule, stages, microbatches, repeats)
  assert table.bubble_fraction == pytest.approx(schedules.bubble_formula(schedule, stages, microbatches, repeats))
  # Each stage runs every chunk forward and backward once for every microbatch.
  busy = (table.table["op"] != schedules.IDLE).sum(axis=0)
  assert (busy == 2 * microbatches * repeats).all()


def test_1f1b_stashes_at_most_stages_activations_gpipe_all_microbatches():
  for stages, microbatches in [(2, 8), (4, 16)]:
    assert schedules.make_schedule("1f1b", stages, microbatches).stash_slots == stages
    assert schedules.make_schedule("gpipe", stages, microbatches).stash_slots == microbatches


def test_1f1b_needs_less_temp_memory_than_gpipe_and_stages_talk_by_collective_permute(runs):
  # The programs the training comparisons compiled: 2 stages and M = 4 microbatches, more microbatches than stages.
  layout = "stage2_fsdp2_tensor2_accum2"
  stages = LAYOUTS[layout]["mesh.stage"]
  plans = {}
  for name in ("gpipe", "1f1b"):
    exp = runs(layout, name)[2]
    plans[name] = exp, exp.train_step.lower(exp.abstract_state(), exp.abstract_batch(), {}).compile()
  temp = {name: compiled.memory_analysis().temp_size_in_bytes for name, (_, compiled) in plans.items()}
  assert temp["1f1b"] < temp["gpipe"], temp
  for _, compiled in plans.values():
    assert collectives(compiled.as_text())["collective-permute"]["count"] >= 2  # activations up, gradients down
  # The plan's own account: gpipe stashes M microbatch inputs, 1f1b S.
  ratio = (
    plans["gpipe"][0].pipeline["activation_bytes_per_device"] / plans["1f1b"][0].pipeline["activation_bytes_per_device"]
  )
  assert ratio == (M + 1) / (stages + 1)  # stash + one gradient slot each


@pytest.mark.fast
def test_checkpoints_move_between_stage_counts(runs, batches, tmp_path):
  _, _, staged, init = runs("stage4_data2", "1f1b")
  _, _, single, _ = runs("stage4_data2", None)
  for source, target in ((staged, single), (single, staged)):
    start = jax.device_put(init, source.state_sharding)
    state, _ = source.train_step(start, jax.device_put(batches[0], source.batch_sharding), {})
    directory = tmp_path / f"from_stage{source.mesh.shape['stage']}"
    checkpointer = Checkpointer(str(directory), small_config().checkpoint)
    checkpointer.save(1, state, None)
    checkpointer.wait()
    saved = jax.device_get(state)
    _, want = source.train_step(state, jax.device_put(batches[1], source.batch_sharding), {})  # donates `state`
    restored = Checkpointer(str(directory), small_config().checkpoint).restore_latest(target.abstract_state()).state
    for a, b in zip(jax.tree.leaves(jax.device_get(restored)), jax.tree.leaves(saved), strict=True):
      np.testing.assert_array_equal(a, b)
    _, got = target.train_step(restored, jax.device_put(batches[1], target.batch_sharding), {})
    np.testing.assert_allclose(float(got["loss"]), float(want["loss"]), rtol=1e-6)


@pytest.mark.fast
@pytest.mark.parametrize(
  "changes,error,message",
  [
    (
      {"mesh.stage": 4, "model.num_layers": 6},
      ConfigError,
      r"6 layers do not split into mesh\.stage=4 stages x pipeline\.repeats=1 chunks",
    ),
    (
      {"mesh.stage": 2, "model.num_layers": 6, "pipeline.schedule": "circular", "pipeline.repeats": 2},
      ConfigError,
      r"6 layers do not split into mesh\.stage=2 stages x pipeline\.repeats=2 chunks; make "
      r"config\.model\.num_layers a multiple of 4",
    ),
    (
      {"mesh.stage": 2, "model.num_layers": 6, "moe.num_experts": 4, "moe.every": 2},
      ConfigError,
      r"3 layer units \(num_layers / moe\.every=2\) do not split into mesh\.stage=2 stages .* multiple of 4",
    ),
    ({"mesh.stage": 4, "pipeline.microbatches": 2}, ConfigError, r"microbatches=2 is fewer than the 4 stages"),
    (
      {"mesh.stage": 2, "train.global_batch_size": 12, "pipeline.microbatches": 8},
      ConfigError,
      r"global_batch_size=12 does not split into grad_accum=1 x pipeline\.microbatches=8",
    ),
  ],
)
def test_pipeline_config_errors_name_the_numbers(changes, error, message):
  cfg = small_config(**changes)
  with pytest.raises(error, match=message):
    build(cfg, VOCAB, mesh_for(cfg))


@pytest.mark.slow
def test_dry_run_plans_llama_7b_over_four_slices(tmp_path):
  """docs/parallelism.md's worked example: 4 stages over DCN x fsdp=16 on 64 emulated devices, compiled, not run."""
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=64", "JAX_PLATFORMS": "cpu"}
  args = ["--config.mesh.dcn_stage=4", "--config.mesh.fsdp=16", "--config.pipeline.microbatches=16"]
  proc = subprocess.run(
    [sys.executable, "train.py", "--config", "configs/llama_7b.py", f"--workdir={tmp_path}", "--dry_run", *args],
    capture_output=True,
    text=True,
    env=env,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  plan = json.load(open(tmp_path / "plan.json"))
  assert plan["devices"] == 64 and plan["mesh"]["stage"] == 4 and plan["mesh"]["fsdp"] == 16
  assert plan["collectives"]["collective-permute"] >= 2
  want = {"schedule": "1f1b", "stages": 4, "microbatches": 16, "repeats": 1}
  assert {k: plan["pipeline"][k] for k in want} == want
  assert plan["pipeline"]["bubble_fraction"] == pytest.approx(3 / 19)
  # 4 stashed inputs + 1 gradient of one sequence (256 / 16 microbatches / 16 fsdp) x 2048 x 4096 in bf16.
  assert plan["pipeline"]["activation_bytes_per_device"] == 5 * 2048 * 4096 * 2
  assert "pipeline: 1f1b schedule, 4 stages x 16 microbatches" in proc.stderr
