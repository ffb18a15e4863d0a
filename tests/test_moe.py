"""Mixture of experts: both dispatch paths against a naive per-token loop, the capacity rule, the auxiliary
losses, expert-parallel layouts against one device, and the active-parameter count behind MFU."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import ModelConfig
from model.moe import Moe, expert_capacity, load_balancing_loss
from tests.helpers import VOCAB, mesh_for, packed_batch, run_steps, small_config
from trainer.config import load_config_file, validate
from trainer.experiment import build
from trainer.metrics import matmul_params_per_token
from trainer.plan import count_collectives
from trainer.state import abstract_model

# ---------------------------------------------------------------------------------------------------------
# The MoE block against a naive reference.


def _moe_config(**kw) -> ModelConfig:
  fields = dict(
    vocab_size=128, max_len=8, num_layers=2, d_model=16, num_heads=2, num_kv_heads=2, head_dim=8, mlp_dim=24
  )
  fields.update(num_experts=4, top_k=2, expert_mlp_dim=12)
  fields.update(kw)
  return ModelConfig(**fields)


def _gelu_tanh(x):
  return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _mlp(x_D, w_gate, w_up, w_down, mlp_type):
  up = x_D @ w_up
  if mlp_type == "swiglu":
    g = x_D @ w_gate
    return (g / (1 + np.exp(-g)) * up) @ w_down
  return _gelu_tanh(up) @ w_down


def _naive_moe(x_BxLxD, p: dict, cfg: ModelConfig, capacity: int | None):
  """One token and one choice at a time, in float64. The capacity rule, written from its definition: within a
  sequence, all first choices in token order, then all second choices, ...; an expert takes assignments until
  it holds `capacity` of them. Returns (output, dropped assignments, router probs [T, E], choices [T, K])."""
  b, length, _ = x_BxLxD.shape
  k, e = cfg.top_k, cfg.num_experts
  out = np.zeros(x_BxLxD.shape)
  dropped = 0
  all_probs, all_choices = [], []
  for row in range(b):
    choices, gates = [], []
    for t in range(length):
      logits = x_BxLxD[row, t] @ p["router"]
      if cfg.router_score == "softmax":
        scores = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
      else:
        scores = 1 / (1 + np.exp(-logits))
      top = sorted(range(e), key=lambda i: -scores[i])[:k]
      g = np.array([scores[i] for i in top])
      if cfg.renormalize_gates:
        g = g / g.sum()
      choices.append(top)
      gates.append(g)
      all_probs.append(scores / scores.sum())
      all_choices.append(top)
    filled = [0] * e
    for j in range(k):
      for t in range(length):
        expert = choices[t][j]
        if capacity is not None and filled[expert] >= capacity:
          dropped += 1
          continue
        filled[expert] += 1
        w = [p["gate"][expert] if "gate" in p else None, p["up"][expert], p["down"][expert]]
        out[row, t] += gates[t][j] * _mlp(x_BxLxD[row, t], *w, cfg.mlp_type)
    if "shared" in p:
      for t in range(length):
        out[row, t] += _mlp(x_BxLxD[row, t], *p["shared"], cfg.mlp_type)
  return out, dropped, np.array(all_probs), np.array(all_choices)


def _moe_and_params(cfg: ModelConfig, seed: int = 0):
  with nnx.use_eager_sharding(False):
    moe = Moe(cfg, nnx.Rngs(params=seed))
  f64 = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
  p = {"router": f64(moe.router_DxE), "up": f64(moe.w_up_ExDxF), "down": f64(moe.w_down_ExFxD)}
  if cfg.mlp_type == "swiglu":
    p["gate"] = f64(moe.w_gate_ExDxF)
  if cfg.num_shared_experts:
    s = moe.shared
    p["shared"] = [f64(s.w_gate_DxF) if cfg.mlp_type == "swiglu" else None, f64(s.w_up_DxF), f64(s.w_down_FxD)]
  return moe, p


def _inputs(cfg: ModelConfig, seed: int = 0):
  # Larger than init-scale activations so that routing is decisive and the experts' outputs are not tiny.
  return np.random.default_rng(seed).normal(size=(2, cfg.max_len, cfg.d_model)).astype(np.float32) * 3


VARIANTS = {
  "swiglu_softmax": {},
  "gelu_sigmoid_raw_gates_shared": dict(
    mlp_type="gelu", router_score="sigmoid", renormalize_gates=False, num_shared_experts=2
  ),
  "top1_shared": dict(top_k=1, num_shared_experts=1),
}


@pytest.mark.parametrize("capacity_factor", [0.0, 4.0], ids=["dropless", "ample_capacity"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_equals_naive_reference_with_ample_capacity(variant, capacity_factor):
  cfg = _moe_config(capacity_factor=capacity_factor, **VARIANTS[variant])
  moe, p = _moe_and_params(cfg)
  x = _inputs(cfg)
  got, aux = nnx.jit(lambda m, x: m(x))(moe, jnp.asarray(x))
  want, dropped, probs, choices = _naive_moe(x.astype(np.float64), p, cfg, capacity=None)
  assert dropped == 0
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  assert float(aux["moe_dropped_fraction"]) == 0.0
  load = np.bincount(choices.ravel(), minlength=cfg.num_experts) / choices.size
  np.testing.assert_allclose(np.asarray(aux["moe_expert_load"]), load, rtol=1e-6)
  np.testing.assert_allclose(float(aux["moe_aux_loss"]), cfg.num_experts * np.sum(load * probs.mean(0)), rtol=1e-5)
  logits = x.reshape(-1, cfg.d_model).astype(np.float64) @ p["router"]
  z = np.log(np.exp(logits).sum(-1))
  np.testing.assert_allclose(float(aux["moe_z_loss"]), np.mean(z**2), rtol=1e-5)


@pytest.mark.parametrize("variant", ["swiglu_softmax", "gelu_sigmoid_raw_gates_shared"])
def test_tight_capacity_drops_exactly_the_reference_assignments(variant):
  cfg = _moe_config(capacity_factor=0.5, **VARIANTS[variant])
  capacity = expert_capacity(0.5, cfg.max_len, cfg.top_k, cfg.num_experts)
  assert capacity == math.ceil(0.5 * 8 * 2 / 4) == 2
  moe, p = _moe_and_params(cfg)
  x = _inputs(cfg, seed=1)
  got, aux = nnx.jit(lambda m, x: m(x))(moe, jnp.asarray(x))
  want, dropped, _, _ = _naive_moe(x.astype(np.float64), p, cfg, capacity=capacity)
  assert dropped > 0  # the test means something only if the rule had to choose
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(aux["moe_dropped_fraction"]), dropped / (x.shape[0] * x.shape[1] * cfg.top_k))


def test_capacity_is_capped_at_the_group_size():
  assert expert_capacity(1.25, 2048, 2, 8) == 640
  assert expert_capacity(100.0, 16, 2, 8) == 16


def test_load_balancing_loss_formula_and_its_minimum():
  probs = np.array([[0.7, 0.1, 0.1, 0.1], [0.2, 0.5, 0.2, 0.1], [0.25, 0.25, 0.25, 0.25]], np.float32)
  choices = np.array([[0, 1], [1, 2], [0, 3]])
  # f = assignments per expert / 6 = [2, 2, 1, 1] / 6; P = column means of probs.
  f = np.array([2, 2, 1, 1]) / 6
  p = probs.mean(0)
  want = 4 * sum(f[e] * p[e] for e in range(4))
  np.testing.assert_allclose(float(load_balancing_loss(jnp.asarray(probs), jnp.asarray(choices))), want, rtol=1e-6)
  uniform = np.full((8, 4), 0.25, np.float32)
  balanced = np.array([[t % 4, (t + 1) % 4] for t in range(8)])
  assert float(load_balancing_loss(jnp.asarray(uniform), jnp.asarray(balanced))) == pytest.approx(1.0, rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# In the model and the train step.


def test_moe_every_2_layers_tree_and_per_layer_metrics_through_grad_accum():
  cfg = small_config(
    **{
      "model.num_layers": 4,
      "moe.every": 2,
      "moe.num_experts": 4,
      "moe.expert_mlp_dim": 32,
      "moe.num_shared_experts": 1,
      "moe.capacity_factor": 1.0,
      "train.grad_accum": 2,
    }
  )
  exp = build(cfg, VOCAB, mesh_for(cfg))
  shapes = jax.tree.map(jnp.shape, exp.abstract_params)["blocks"]
  assert shapes["dense"]["mlp"]["w_up_DxF"] == (2, 1, 32, 64)  # [groups, dense blocks per group, D, F]
  assert shapes["moe"]["mlp"]["w_up_ExDxF"] == (2, 4, 32, 32)  # [groups, E, D, expert F]
  assert shapes["moe"]["mlp"]["shared"]["w_up_DxF"] == (2, 32, 32)
  assert tuple(exp.logical_names["blocks"]["moe"]["mlp"]["w_down_ExFxD"]) == ("layers", "experts", "mlp", "embed")
  state = exp.init_state()
  batch = packed_batch(np.random.default_rng(0), 8, 16)
  _, metrics = exp.train_step(state, jax.device_put(batch, exp.batch_sharding), {})
  assert metrics["moe_expert_load"].shape == (2, 4)  # [MoE layers, experts], kept through the microbatch sum
  np.testing.assert_allclose(np.asarray(metrics["moe_expert_load"]).sum(-1), 1.0, rtol=1e-5)
  for name in ("moe_aux_loss", "moe_z_loss", "moe_dropped_fraction"):
    assert metrics[name].shape == ()
  assert 0.0 <= float(metrics["moe_dropped_fraction"]) < 1.0
  assert float(metrics["moe_aux_loss"]) >= 0.9  # near its minimum 1 at init, never far below


def test_dense_model_keeps_the_dense_tree():
  _, params, _ = abstract_model(_moe_config(num_experts=0))
  assert set(params["blocks"]) == {"attn", "attn_norm", "mlp", "mlp_norm"}
  assert set(params["blocks"]["mlp"]) == {"w_gate_DxF", "w_up_DxF", "w_down_FxD"}


# ---------------------------------------------------------------------------------------------------------
# Expert parallelism: every layout trains like one device.

LAYOUTS = {
  "expert4_data2": {"mesh.expert": 4, "mesh.data": 2},
  "expert2_data2_tensor2": {"mesh.expert": 2, "mesh.data": 2, "mesh.tensor": 2},
}
PATHS = {"dropless": 0.0, "capacity": 1.0}  # capacity 1.0: C = 4 of 16 tokens per expert, some drops


def _ep_config(path: str, layout: str = ""):
  return small_config(
    **{
      "moe.num_experts": 8,
      "moe.top_k": 2,
      "moe.expert_mlp_dim": 32,
      "moe.num_shared_experts": 1,
      "moe.capacity_factor": PATHS[path],
      **LAYOUTS.get(layout, {}),
    }
  )


@pytest.fixture(scope="module")
def batches():
  rng = np.random.default_rng(0)
  return [packed_batch(rng, 8, 16) for _ in range(3)]


@pytest.fixture(scope="module")
def runs(batches):
  """(path, layout) -> run_steps result, computed once."""
  cache = {}

  def get(path: str, layout: str):
    if (path, layout) not in cache:
      cache[path, layout] = run_steps(_ep_config(path, layout), batches)
    return cache[path, layout]

  return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("path", list(PATHS))
def test_expert_parallel_layout_reproduces_single_device_training(path, layout, runs):
  want_losses, want_params, _ = runs(path, "single")
  losses, params, exp = runs(path, layout)
  assert exp.mesh.devices.size == 8
  np.testing.assert_allclose(losses, want_losses, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_dropless_expert_parallel_step_exchanges_tokens_with_all_to_all(runs):
  _, _, exp = runs("dropless", "expert4_data2")
  hlo = exp.train_step.lower(exp.abstract_state(), exp.abstract_batch(), {}).compile().as_text()
  # Tokens out and results back, forward and backward.
  assert count_collectives(hlo)["all-to-all"] >= 2


# ---------------------------------------------------------------------------------------------------------
# Configs and the active-parameter count behind MFU.


def _param_count(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def test_mfu_counts_active_parameters_per_token():
  """From the parameter tree: every matrix except the input embedding, the routed experts scaled by
  top_k / num_experts (each token runs top_k of them); the tied embedding counts once, as the LM head."""
  cfg = _moe_config(num_layers=4, moe_every=2, num_shared_experts=1, top_k=2, num_experts=4)
  _, params, names = abstract_model(cfg)
  active = 0.0

  def visit(path, leaf, spec):
    nonlocal active
    key = jax.tree_util.keystr(path, simple=True, separator=".")
    if "norm" in key or key == "embed_VxD":
      return
    size = math.prod(leaf.shape)
    active += size * cfg.top_k / cfg.num_experts if "experts" in tuple(spec) else size

  jax.tree_util.tree_map_with_path(visit, params, names)
  active += cfg.vocab_size * cfg.d_model  # the tied head
  assert matmul_params_per_token(cfg) == pytest.approx(active, rel=1e-9)


def test_named_moe_configs_validate_and_mixtral_has_mixtral_size():
  tiny = load_config_file("configs/tiny_moe.py")
  validate(tiny)
  assert tiny.moe.num_experts == 8 and tiny.moe.top_k == 2
  mixtral = load_config_file("configs/mixtral_8x7b.py")
  validate(mixtral)
  cfg = ModelConfig.from_config(mixtral.model, mixtral.moe, vocab_size=32_000, max_len=mixtral.data.seq_len)
  _, params, _ = abstract_model(cfg)
  # Published: 46.7B parameters, 12.9B active per token (the latter with the input embedding, 0.13B).
  assert _param_count(params) / 1e9 == pytest.approx(46.7, abs=0.05)
  assert (matmul_params_per_token(cfg) + 32_000 * 4096) / 1e9 == pytest.approx(12.9, abs=0.05)
