"""optim.optimizer and optim.schedule: each optimizer trains and resumes exactly under ZeRO, Muon's update against
a numpy Newton-Schulz on one device and sharded, which parameters Muon takes, the schedules' formulas, a WSD run
extended on resume, and the one line that refuses another optimizer's checkpoint."""

import json
import math

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from model.params import abstract_model
from parallel.mesh import make_mesh
from storage.checkpoint import Checkpointer, CheckpointError
from storage.run import model_config
from tests.helpers import VOCAB, mesh_for, packed_batch, small_config, tree_snapshot
from trainer.experiment import build
from trainer.optim import lr_schedule, make_optimizer, muon_dimensions

# Muon's quintic Newton-Schulz coefficients (Keller Jordan, "Muon: An optimizer for hidden layers", 2024).
NS_ABC = (3.4445, -4.7750, 2.0315)


def _newton_schulz(g: np.ndarray, steps: int = 5) -> np.ndarray:
  """The reference orthogonalisation of one fan_in x fan_out matrix, in float64."""
  x = g.T if g.shape[0] > g.shape[1] else g
  x = x / (np.linalg.norm(x) + 1e-8)
  a, b, c = NS_ABC
  for _ in range(steps):
    gram = x @ x.T
    x = a * x + (b * gram + c * gram @ gram) @ x
  return x.T if g.shape[0] > g.shape[1] else x


def _config(optimizer: str, **overrides):
  """Two data shards (for ZeRO), lr reaching its peak at step 1."""
  settings = {"optim.optimizer": optimizer, "optim.warmup_steps": 1, "mesh.data": 2, "checkpoint.async_save": False}
  if optimizer == "adafactor":  # d_model 128: the embedding [256, 128] gets factored row and column statistics;
    settings.update({"model.d_model": 128, "optim.peak_lr": 3e-3})  # its first steps are sign-like: smaller lr
  return small_config(**{**settings, **overrides})


def _steps(exp, state, batches, frozen):
  metrics = []
  for batch in batches:
    state, m = exp.train_step(state, jax.device_put(batch, exp.batch_sharding), frozen)
    metrics.append({k: float(v) for k, v in m.items() if np.ndim(v) == 0})
  return state, metrics


def _train_and_resume(cfg, workdir, steps: int = 4, saved_at: int = 2):
  """(metrics of steps 1..steps, metrics of saved_at+1..steps resumed from the checkpoint of step saved_at, exp).
  The checkpoint is read back from disk into the state's shardings, as a restarted process does after SIGKILL."""
  exp = build(cfg, VOCAB, mesh_for(cfg))
  rng = np.random.default_rng(1)
  two = [packed_batch(rng, 8, 16) for _ in range(2)]  # alternating: random tokens are learnt by heart
  batches = [two[i % 2] for i in range(steps)]
  frozen = exp.load_frozen()
  config = json.loads(cfg.to_json())
  checkpointer = Checkpointer(str(workdir), cfg.checkpoint)
  state, first = _steps(exp, exp.init_state(), batches[:saved_at], frozen)
  checkpointer.save(saved_at, state, config_json=cfg.to_json())
  checkpointer.wait()
  _, rest = _steps(exp, state, batches[saved_at:], frozen)
  restored = checkpointer.restore_latest(exp.abstract_state(), config)
  assert restored.step == saved_at
  _, resumed = _steps(exp, restored.state, batches[saved_at:], frozen)
  checkpointer.close()
  return first + rest, resumed, exp


@pytest.mark.parametrize(
  "optimizer,layout",
  [
    ("muon", {"optim.zero_stage": 2}),
    ("adafactor", {"optim.zero_stage": 2}),
    ("lion", {"lora.rank": 4, "optim.zero_stage": 1}),  # LoRA: the state holds the adapters and their moments
  ],
)  # adamw: test_a_wsd_run_resumes_exactly_and_extended_stays_at_peak
def test_each_optimizer_trains_and_resumes_exactly_under_zero(optimizer, layout, tmp_path):
  metrics, resumed, exp = _train_and_resume(_config(optimizer, **layout), tmp_path / "run", steps=5)
  losses = [m["loss"] for m in metrics]
  assert losses[4] < losses[0], losses  # steps 1 and 5 see the same batch
  assert resumed == metrics[2:]  # every metric of the steps after the checkpoint, bit for bit
  # ZeRO: the state of every parameter big enough to split is sharded over `data`, as the parameter is not.
  opt_specs = {str(s.spec) for s in jax.tree.leaves(exp.shardings.opt_state)}
  param_specs = {str(s.spec) for s in jax.tree.leaves(exp.shardings.params)}
  assert any("data" in spec for spec in opt_specs) and not any("data" in spec for spec in param_specs), opt_specs
  if layout.get("lora.rank"):
    trained = {jax.tree_util.keystr(p, simple=True, separator=".") for p, _ in
               jax.tree_util.tree_flatten_with_path(exp.abstract_params)[0]}  # fmt: skip
    assert trained == {f"blocks.attn.lora_{t}.{ab}" for t in "qv" for ab in "ab"}  # the adapters alone train


def test_muon_takes_lora_adapters_as_matrices():
  cfg = small_config(**{"lora.rank": 4, "lora.targets": "q,o"})
  exp = build(cfg, VOCAB, mesh_for(cfg))  # traces nothing: the adapters' logical names
  dims = muon_dimensions(exp.logical_names)["blocks"]["attn"]
  as_matrix = {f"{k}.{ab}": (d.reduction_axis, d.output_axis) for k, v in dims.items() for ab, d in v.items()}
  assert as_matrix == {
    "lora_q.a": ((1,), (2,)),  # [layers, D | R]
    "lora_q.b": ((1,), (2, 3)),  # [layers, R | N, H]
    "lora_o.a": ((1, 2), (3,)),  # [layers, N, H | R]
    "lora_o.b": ((1,), (2,)),  # [layers, R | D]
  }


def test_muon_takes_hidden_matrices_and_leaves_the_rest_to_adamw():
  cfg = small_config(
    **{"model.tie_embeddings": False, "model.attention_bias": True, "model.qk_norm": True,
       "model.position_type": "learned", "moe.num_experts": 4, "moe.every": 2}
  )  # fmt: skip
  _, params, names = abstract_model(model_config(cfg, VOCAB))
  is_dims = lambda x: x is None or hasattr(x, "reduction_axis")  # noqa: E731
  flat = jax.tree_util.tree_flatten_with_path(muon_dimensions(names), is_leaf=is_dims)[0]
  got = {jax.tree_util.keystr(p, simple=True, separator="."): d for p, d in flat}
  shapes = {jax.tree_util.keystr(p, simple=True, separator="."): x.shape
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}  # fmt: skip
  assert got.keys() == shapes.keys()
  to_adamw = {k for k, d in got.items() if d is None}
  assert {"embed_VxD", "head_DxV", "pos_embed_LxD", "final_norm.scale"} <= to_adamw
  assert all(k in to_adamw for k in got if k.endswith(("scale", "_NH", "_KH")))  # norms, q/k norms and biases
  assert to_adamw == {k for k in got if k.endswith(("scale", "_NH", "_KH")) or "blocks" not in k}

  def matrix(key):  # (fan_in, fan_out) of one layer's (and expert's) 2-D view
    d, shape = got[key], shapes[key]
    return math.prod(shape[i] for i in d.reduction_axis), math.prod(shape[i] for i in d.output_axis)

  D, N, K, H, F = 32, 4, 2, 8, 64
  assert matrix("blocks.dense.attn.wq_DxNxH") == (D, N * H)
  assert matrix("blocks.dense.attn.wk_DxKxH") == (D, K * H)
  assert matrix("blocks.dense.attn.wo_NxHxD") == (N * H, D)
  assert matrix("blocks.dense.mlp.w_down_FxD") == (F, D)
  assert matrix("blocks.moe.mlp.w_up_ExDxF") == (D, F)  # per expert: "experts" is a batch axis, as "layers"
  assert matrix("blocks.moe.mlp.router_DxE") == (D, 4)

  # The optimizer state follows: Muon's momentum for the hidden matrices, Adam's moments for the rest.
  cfg.optim.optimizer = "muon"
  optimizer, _ = make_optimizer(cfg.optim, 10, names)
  parts = jax.eval_shape(optimizer.init, params)[1].inner_states
  leaves = lambda tree: {jax.tree_util.keystr(p, simple=True, separator=".")  # noqa: E731
                         for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}  # fmt: skip
  assert leaves(parts["muon"].inner_state[0].mu) == set(got) - to_adamw
  assert leaves(parts["adamw"].inner_state[0].mu) == to_adamw


def _muon_update(grads, params, names, mesh, specs):
  """The first update of make_optimizer's Muon (no clipping, no decay, lr 1 from step 0) under jit, with the
  gradients and parameters laid out by `specs` on `mesh`."""
  cfg = small_config(
    **{"optim.optimizer": "muon", "optim.clip_norm": 0.0, "optim.weight_decay": 0.0, "optim.schedule": "constant",
       "optim.warmup_steps": 0, "optim.peak_lr": 1.0}
  )  # fmt: skip
  optimizer, _ = make_optimizer(cfg.optim, 10, names)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs)
  place = lambda tree: jax.device_put(tree, shardings)  # noqa: E731

  @jax.jit
  def update(g, p):
    return optimizer.update(g, optimizer.init(p), p)[0]

  return jax.device_get(update(place(grads), place(params)))


@pytest.mark.fast
def test_muon_update_is_newton_schulz_per_layer_and_the_same_sharded():
  rng = np.random.default_rng(0)
  L, D, N, H, F = 2, 16, 4, 8, 32
  shapes = {"wq": (L, D, N, H), "wo": (L, N, H, D), "w_up": (L, D, F)}
  names = {"wq": P("layers", "embed", "heads", "head_dim"), "wo": P("layers", "heads", "head_dim", "embed"),
           "w_up": P("layers", "embed", "mlp")}  # fmt: skip
  grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
  params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}

  one = make_mesh(small_config().mesh, jax.devices()[:1])
  single = _muon_update(grads, params, names, one, jax.tree.map(lambda _: P(), names))
  # fsdp=2 x tensor=2: D over fsdp; heads, F over tensor, as the default rules lay them out.
  cfg = small_config(**{"mesh.fsdp": 2, "mesh.tensor": 2})
  mesh = make_mesh(cfg.mesh, jax.devices()[:4])
  sharded_specs = {"wq": P(None, "fsdp", "tensor"), "wo": P(None, "tensor", None, "fsdp"),
                   "w_up": P(None, "fsdp", "tensor")}  # fmt: skip
  sharded = _muon_update(grads, params, names, mesh, sharded_specs)

  views = {"wq": (D, N * H), "wo": (N * H, D), "w_up": (D, F)}  # (fan_in, fan_out) of each layer
  for k, (fan_in, fan_out) in views.items():
    np.testing.assert_allclose(sharded[k], single[k], rtol=1e-5, atol=2e-6)  # float32 sums in another order
    for layer in range(L):
      want = -0.2 * math.sqrt(max(fan_in, fan_out)) * _newton_schulz(grads[k][layer].astype(np.float64).reshape(
        fan_in, fan_out))  # fmt: skip
      np.testing.assert_allclose(single[k][layer].reshape(fan_in, fan_out), want, rtol=2e-4, atol=2e-5)


@pytest.mark.fast
@pytest.mark.parametrize("shape", ["linear", "1-sqrt"])
def test_wsd_schedule_follows_its_formula(shape):
  peak, final, warmup, total, fraction = 1e-3, 1e-4, 10, 100, 0.3
  schedule = lr_schedule(peak, final, warmup, total, kind="wsd", decay_fraction=fraction, decay_shape=shape)
  fall = (lambda t: t) if shape == "linear" else math.sqrt

  def formula(s):
    if s < warmup:
      return peak * s / warmup
    if s < 70:  # the last 30 of 100 steps decay
      return peak
    return final + (peak - final) * (1 - fall(min((s - 70) / 30, 1.0)))

  for step in (0, 5, 10, 40, 69, 70, 71, 85, 99, 100, 120):
    assert float(schedule(step)) == pytest.approx(formula(step), rel=1e-5, abs=1e-12), step
  assert float(schedule(70)) == pytest.approx(peak) and float(schedule(100)) == pytest.approx(final)


def test_linear_and_constant_schedules_follow_their_formulas():
  peak, final, warmup, total = 2e-3, 2e-4, 4, 44
  linear = lr_schedule(peak, final, warmup, total, kind="linear")
  constant = lr_schedule(peak, final, warmup, total, kind="constant")
  for step in (0, 1, 3, 4, 14, 24, 43, 44, 60):
    ramp = peak * step / warmup
    after = final + (peak - final) * (1 - min(step - warmup, total - warmup) / (total - warmup))
    assert float(linear(step)) == pytest.approx(ramp if step < warmup else after, rel=1e-5, abs=1e-12), step
    assert float(constant(step)) == pytest.approx(ramp if step < warmup else peak, rel=1e-5, abs=1e-12), step


def test_a_wsd_run_resumes_exactly_and_extended_stays_at_peak_and_another_optimizer_is_one_line(tmp_path):
  # 8 steps, decay over the last half: from step 4 the lr falls. Resumed at step 5 with 16 steps, it is at peak.
  settings = {"optim.schedule": "wsd", "optim.decay_fraction": 0.5, "train.steps": 8, "optim.zero_stage": 2}
  cfg = _config("adamw", **settings)
  metrics, resumed, _ = _train_and_resume(cfg, tmp_path / "run", steps=6, saved_at=5)
  assert resumed == metrics[5:] and metrics[4]["loss"] < metrics[0]["loss"] - 0.05
  peak, final = cfg.optim.peak_lr, cfg.optim.final_lr
  logged = [m["lr"] for m in metrics]  # step s logs the lr of its update, the schedule at s
  assert logged == pytest.approx([0.0, peak, peak, peak, peak, final + (peak - final) * (1 - 1 / 4)], rel=1e-6)
  longer = _config("adamw", **{**settings, "train.steps": 16})
  exp = build(longer, VOCAB, mesh_for(longer))
  checkpointer = Checkpointer(str(tmp_path / "run"), longer.checkpoint)
  state = checkpointer.restore_latest(exp.abstract_state(), json.loads(longer.to_json())).state
  checkpointer.close()
  batches = [packed_batch(np.random.default_rng(2), 8, 16)] * 2
  _, resumed = _steps(exp, state, batches, {})
  assert [m["lr"] for m in resumed] == pytest.approx([peak, peak], rel=1e-6)  # steps 5 and 6 of 16: stable

  before = tree_snapshot(tmp_path / "run")
  other = _config("muon", **settings)
  with pytest.raises(CheckpointError) as error:
    Checkpointer(str(tmp_path / "run"), other.checkpoint).restore_latest(
      build(other, VOCAB, mesh_for(other)).abstract_state(), json.loads(other.to_json())
    )
  message = str(error.value)
  assert "\n" not in message and "config.optim.optimizer=adamw, not muon" in message, message
  assert "--config.optim.optimizer=adamw" in message
  assert tree_snapshot(tmp_path / "run") == before
