"""Mixture of experts: both dispatch paths against a naive per-token loop, the capacity rule per routing group,
the auxiliary losses, expert-parallel layouts against one device, the ragged and buffer dropless exchanges
against each other, and the active-parameter count behind MFU."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from model import ModelConfig
from model.mlp import activate
from model.moe import (
  Moe,
  _capacity_moe,
  _dropless_moe,
  exchange_plan,
  expert_capacity,
  load_balancing_loss,
  received_experts,
  resolve_dropless,
)
from model.params import abstract_model
from parallel.hlo import collectives
from parallel.rules import DEFAULT_RULES, parse_rules
from settings import ConfigError
from settings.load import load_config_file
from settings.validate import check_backend, dropless_problem, validate
from tests.helpers import VOCAB, mesh_for, packed_batch, run_steps, small_config
from trainer.experiment import build
from trainer.metrics import matmul_params_per_token

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


def _naive_moe(x_BxLxD, p: dict, cfg: ModelConfig, capacity: int | None, group: int | None = None):
  """One token and one choice at a time, in float64. The capacity rule, written from its definition: within a
  group (`group` consecutive tokens of a sequence, the last one shorter if they do not divide it; default the
  whole sequence), all first choices in token order, then all second choices, ...; an expert takes assignments
  until it holds `capacity` of them. Returns (output, dropped assignments, router probs [T, E], choices [T, K])."""
  b, length, _ = x_BxLxD.shape
  group = group or length
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
    for start in range(0, length, group):
      filled = [0] * e
      for j in range(k):
        for t in range(start, min(start + group, length)):
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


@pytest.mark.fast
@pytest.mark.parametrize(
  "capacity_factor,group_size",
  [(0.0, 512), (4.0, 512), (4.0, 3)],
  ids=["dropless", "ample_capacity", "ample_capacity_groups_of_3"],
)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_equals_naive_reference_with_ample_capacity(variant, capacity_factor, group_size):
  # Groups of 3 in sequences of 8: two full groups and one padded group of 2.
  cfg = _moe_config(capacity_factor=capacity_factor, group_size=group_size, **VARIANTS[variant])
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


@pytest.mark.parametrize("group_size", [512, 3], ids=["group_is_sequence", "groups_of_3"])
@pytest.mark.parametrize("variant", ["swiglu_softmax", "gelu_sigmoid_raw_gates_shared"])
def test_tight_capacity_drops_exactly_the_reference_assignments(variant, group_size):
  cfg = _moe_config(capacity_factor=0.5, group_size=group_size, **VARIANTS[variant])
  group = min(group_size, cfg.max_len)
  capacity = expert_capacity(0.5, group, cfg.top_k, cfg.num_experts)
  assert capacity == math.ceil(0.5 * group * 2 / 4) == {8: 2, 3: 1}[group]
  moe, p = _moe_and_params(cfg)
  x = _inputs(cfg, seed=1)
  got, aux = nnx.jit(lambda m, x: m(x))(moe, jnp.asarray(x))
  want, dropped, _, _ = _naive_moe(x.astype(np.float64), p, cfg, capacity=capacity, group=group)
  assert dropped > 0  # the test means something only if the rule had to choose
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(float(aux["moe_dropped_fraction"]), dropped / (x.shape[0] * x.shape[1] * cfg.top_k))


def test_capacity_is_capped_at_the_group_size():
  assert expert_capacity(1.25, 2048, 2, 8) == 640
  assert expert_capacity(100.0, 16, 2, 8) == 16


@pytest.mark.fast
@pytest.mark.parametrize("group_size,length", [(4, 10), (3, 10), (512, 10)])
def test_capacity_drops_per_group_as_the_formula_says(group_size, length):
  """A zero router ties every score, so every token picks experts 0 and 1 (ties: lower index first). In a group
  of n tokens each of the two then receives n assignments and keeps C of them: 2 * max(0, n - C) drops per
  group, C = ceil(capacity_factor * S * K / E) for S = min(group_size, L), also in a shorter last group."""
  cfg = _moe_config(capacity_factor=1.0, group_size=group_size, max_len=length)
  moe, _ = _moe_and_params(cfg)
  moe.router_DxE[...] = jnp.zeros_like(moe.router_DxE[...])
  x = _inputs(cfg)
  _, aux = nnx.jit(lambda m, x: m(x))(moe, jnp.asarray(x))
  group = min(group_size, length)
  capacity = math.ceil(1.0 * group * 2 / 4)
  sizes = [min(group, length - start) for start in range(0, length, group)]
  dropped_per_row = sum(2 * max(0, n - capacity) for n in sizes)
  assert float(aux["moe_dropped_fraction"]) == pytest.approx(dropped_per_row / (2 * length), rel=1e-6)
  # Groups of 4: C = 2, groups 4, 4, 2 drop 4 + 4 + 0 of 20. Of 3: C = 2, groups 3, 3, 3, 1 drop 2 + 2 + 2 + 0.
  # One group of 10: C = 5, drops 10 of 20.
  assert {4: 0.4, 3: 0.3, 512: 0.5}[group_size] == pytest.approx(dropped_per_row / (2 * length))


def test_group_size_must_be_positive():
  cfg = _ep_config("capacity")
  cfg.moe.group_size = 0
  with pytest.raises(ConfigError, match=r"^config.moe.group_size=0 must be positive[^\n]*$"):
    validate(cfg)


def _moe_flops(cfg: ModelConfig, length: int) -> float:
  moe, _ = _moe_and_params(cfg)
  x = jax.ShapeDtypeStruct((2, length, cfg.d_model), jnp.float32)
  return jax.jit(lambda x: moe(x)[0]).lower(x).cost_analysis()["flops"]


def test_grouped_capacity_dispatch_cost_is_linear_in_length():
  """XLA's flop count of the layer doubles with the sequence at a fixed group size; with one group per
  sequence (the capacity grows with L) it more than doubles, which is what grouping removes."""
  grouped = _moe_config(capacity_factor=1.25, group_size=16, max_len=128)
  assert _moe_flops(grouped, 128) / _moe_flops(grouped, 64) == pytest.approx(2.0, rel=1e-3)
  whole = _moe_config(capacity_factor=1.25, group_size=512, max_len=128)
  assert _moe_flops(whole, 128) / _moe_flops(whole, 64) > 2.5


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

RULES = parse_rules(DEFAULT_RULES)  # the layouts below change mesh sizes, not rules
SWIGLU = functools.partial(activate, "swiglu", platform="cpu")  # the experts' nonlinearity
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
  assert collectives(hlo)["all-to-all"]["count"] >= 2


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


# ---------------------------------------------------------------------------------------------------------
# The dropless exchange: ragged_all_to_all against the fixed buffers. XLA:CPU has no ragged_all_to_all kernel
# ("UNIMPLEMENTED: HLO opcode ragged-all-to-all"), so here the ragged path runs on an emulation of it, built
# from all_gather and checked against the example in its documentation; the real primitive is lowered only.


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name):
  """jax.lax.ragged_all_to_all as documented: sender s's slice i (rows input_offsets[i] + [0, send_sizes[i]))
  goes to device i // (N / P), at rows output_offsets[i] + [0, ...) there. Every device gathers all operands
  and slice tables and writes the slices addressed to it; `recv_sizes` must agree with the senders' sizes."""
  del recv_sizes
  peers = jax.lax.axis_size(axis_name)
  me = jax.lax.axis_index(axis_name)
  per = input_offsets.shape[0] // peers
  operand_PxRxD, in_PxN, size_PxN, out_PxN = (
    jax.lax.all_gather(v, axis_name) for v in (operand, input_offsets, send_sizes, output_offsets)
  )
  mine = me * per + jnp.arange(per)  # the slices of each sender that come here
  r = jnp.arange(operand.shape[0])
  src_PxQxR = in_PxN[:, mine, None] + r
  dst_PxQxR = jnp.where(r < size_PxN[:, mine, None], out_PxN[:, mine, None] + r, output.shape[0])  # else dropped
  sender_PxQxR = jnp.broadcast_to(jnp.arange(peers)[:, None, None], src_PxQxR.shape)
  rows = operand_PxRxD[sender_PxQxR, jnp.minimum(src_PxQxR, operand.shape[0] - 1)]
  return output.at[dst_PxQxR.reshape(-1)].set(rows.reshape(-1, *operand.shape[1:]), mode="drop")


@pytest.mark.fast
def test_emulated_ragged_all_to_all_reproduces_the_documented_example():
  # jax.lax.ragged_all_to_all's docstring: an axis of size 2 and these arguments give these results.
  mesh = jax.make_mesh((2,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:2])
  args = [
    [[1, 2, 2], [3, 4, 0]],  # operand
    [[0, 0, 0, 0], [0, 0, 0, 0]],  # output
    [[0, 1], [0, 1]],  # input_offsets
    [[1, 2], [1, 1]],  # send_sizes
    [[0, 0], [1, 2]],  # output_offsets
    [[1, 1], [2, 1]],  # recv_sizes
  ]
  args = [jnp.asarray(np.array(a, np.int32).reshape(-1)) for a in args]
  f = jax.shard_map(
    lambda *a: _emulated_ragged_all_to_all(*a, axis_name="x"), mesh=mesh, in_specs=(P("x"),) * 6, out_specs=P("x")
  )
  np.testing.assert_array_equal(np.asarray(jax.jit(f)(*args)).reshape(2, 4), [[1, 3, 0, 0], [2, 2, 4, 0]])


def test_exchange_plan_and_received_experts_match_a_simulated_exchange():
  """Built row by row: each sender lists its rows sorted by (receiver, expert); each receiver concatenates what
  the senders send it, sender by sender. Offsets are where the rows ended up."""
  rng = np.random.default_rng(0)
  peers, local = 3, 2
  counts = rng.integers(0, 4, size=(peers, peers, local))
  counts[1, 2] = 0  # an empty slice
  send_rows = [
    [(r, e) for r in range(peers) for e in range(local) for _ in range(counts[s, r, e])] for s in range(peers)
  ]
  recv_rows = [[(s, e) for s in range(peers) for (rr, e) in send_rows[s] if rr == r] for r in range(peers)]
  plan = {k: np.asarray(v) for k, v in exchange_plan(jnp.asarray(counts, jnp.int32)).items()}
  for s in range(peers):
    for r in range(peers):
      sent = [i for i, (rr, _) in enumerate(send_rows[s]) if rr == r]
      got = [i for i, (ss, _) in enumerate(recv_rows[r]) if ss == s]
      assert plan["send_sizes"][s, r] == len(sent) == len(got) == plan["recv_sizes"][r, s]
      if sent:
        assert plan["input_offsets"][s, r] == sent[0] and sent == list(range(sent[0], sent[0] + len(sent)))
        assert plan["output_offsets"][s, r] == got[0] and got == list(range(got[0], got[0] + len(got)))
  for r in range(peers):
    rows = peers * counts.sum(axis=(1, 2)).max() + 2
    want = [e for _, e in recv_rows[r]] + [local] * (rows - len(recv_rows[r]))
    np.testing.assert_array_equal(received_experts(jnp.asarray(counts[:, r], jnp.int32), rows), want)


def _dropless_inputs(seed: int = 0):
  """8 sequences of 4 tokens, 8 experts, top-2, skewed routing so that devices receive very different loads."""
  rng = np.random.default_rng(seed)
  b, length, d, f, e, k = 8, 4, 16, 12, 8, 2
  x = rng.normal(size=(b, length, d)).astype(np.float32)
  popularity = np.array([8, 4, 1, 1, 6, 1, 2, 1], np.float64)
  experts = np.stack([rng.choice(e, size=k, replace=False, p=popularity / popularity.sum()) for _ in range(b * length)])
  gates = rng.uniform(0.1, 1.0, size=(b * length, k)).astype(np.float32)
  w = [rng.normal(size=shape).astype(np.float32) * 0.3 for shape in [(e, d, f), (e, d, f), (e, f, d)]]
  cotangent = rng.normal(size=(b, length, d)).astype(np.float32)
  as_jnp = lambda a: jnp.asarray(a)  # noqa: E731
  return (
    as_jnp(x),
    as_jnp(experts.reshape(b, length, k).astype(np.int32)),
    as_jnp(gates.reshape(b, length, k)),
    tuple(map(as_jnp, w)),
    as_jnp(cotangent),
  )


def _dropless_value_and_grads(impl: str, layout: dict | None, collective=_emulated_ragged_all_to_all):
  moe = functools.partial(_dropless_moe, act=SWIGLU, rules=RULES, impl=impl, collective=collective)
  return _layer_value_and_grads(moe, layout)


def _layer_value_and_grads(moe, layout: dict | None):
  """(loss, output), grads of (x, gates, weights) of `moe(x, experts, gates, weights)` on `_dropless_inputs`,
  under the mesh of `layout` (None: no mesh, one device)."""
  x, experts, gates, weights, cotangent = _dropless_inputs()

  def loss(x, gates, weights):
    y = moe(x, experts, gates, weights)
    if isinstance(y, tuple):
      y = y[0]
    return jnp.sum(y * cotangent), y

  fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
  if layout is None:
    return fn(x, gates, weights)
  cfg = small_config(**layout)
  with jax.set_mesh(mesh_for(cfg)):
    return fn(x, gates, weights)


@pytest.fixture(scope="module")
def dropless_reference():
  return jax.device_get(_dropless_value_and_grads("buffer", None))


@pytest.mark.parametrize("impl", ["ragged", "buffer"])
@pytest.mark.parametrize("layout", ["expert4_data2", "expert2_data2_tensor2"])
def test_dropless_exchange_values_and_gradients_equal_one_device(impl, layout, dropless_reference):
  (_, want_y), want_grads = dropless_reference
  (_, y), grads = jax.device_get(_dropless_value_and_grads(impl, LAYOUTS[layout]))
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.fast
@pytest.mark.parametrize("layout", ["expert4_data2", "expert2_data2_tensor2"])
def test_grouped_capacity_path_under_expert_parallelism_equals_one_device(layout):
  # Groups of 2 in sequences of 4, one slot per expert and group: tokens are dropped, so placement matters.
  moe = functools.partial(_capacity_moe, act=SWIGLU, group=2, capacity=1, rules=RULES)
  x, experts, gates, weights, _ = _dropless_inputs()
  assert 0 < int(moe(x, experts, gates, weights)[1]) < experts.size
  (_, want_y), want_grads = jax.device_get(_layer_value_and_grads(moe, None))
  (_, y), grads = jax.device_get(_layer_value_and_grads(moe, LAYOUTS[layout]))
  np.testing.assert_allclose(y, want_y, rtol=1e-5, atol=1e-5)
  for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.fast
def test_ragged_path_lowers_to_ragged_all_to_all_forward_and_backward():
  x, experts, gates, weights, cotangent = _dropless_inputs()
  cfg = small_config(**LAYOUTS["expert4_data2"])

  def loss(x, weights):
    return jnp.sum(_dropless_moe(x, experts, gates, weights, SWIGLU, RULES, "ragged") * cotangent)

  with jax.set_mesh(mesh_for(cfg)):
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(x, weights).as_text()
  # Tokens there and back in the forward pass, and the transposes of both in the backward pass.
  assert text.count("custom_call @ragged_all_to_all") == 4
  # What fixed-size all_to_alls remain move int32 offsets (in JAX's transpose rule), never token rows.
  fixed = [line for line in text.splitlines() if '"stablehlo.all_to_all"' in line]
  assert fixed and all("xi32>" in line and "xf32>" not in line for line in fixed)


def test_dropless_impl_resolves_per_backend_and_ragged_is_refused_on_cpu():
  assert [resolve_dropless("auto", b) for b in ("cpu", "gpu", "tpu")] == ["buffer", "ragged", "ragged"]
  assert resolve_dropless("buffer", "gpu") == "buffer"
  assert dropless_problem("ragged", "gpu") is None and dropless_problem("buffer", "cpu") is None
  cfg = _ep_config("dropless", "expert4_data2")
  cfg.moe.dropless_impl = "ragged"
  validate(cfg)
  with pytest.raises(ConfigError, match=r"^config.moe.dropless_impl='ragged' needs jax.lax.ragged_all_to_all[^\n]*$"):
    build(cfg, VOCAB, mesh_for(cfg))
  cfg.moe.dropless_impl = "fast"
  with pytest.raises(ConfigError, match=r"^config.moe.dropless_impl='fast' is not one of auto, ragged, buffer$"):
    check_backend(cfg, "gpu")
