"""Mixture-of-experts MLP: an fp32 router picks `top_k` of `num_experts` expert MLPs for every token.

Routing. logits = x @ router in fp32; scores = softmax(logits) or sigmoid(logits) (`router_score`); each token
takes its `top_k` highest-scoring experts (ties: lower expert index first); its gates are those scores, divided
by their sum when `renormalize_gates`. The output is sum_k gate_k * expert_k(x), plus the always-on shared
experts when `num_shared_experts` > 0.

Two dispatch paths, chosen by `capacity_factor`:
- `> 0`, capacity (GShard/Switch): the tokens of one group (one sequence of the batch, L tokens) fill
  per-expert buffers of `expert_capacity(...)` slots, see there for the exact rule and priority order. An
  assignment that finds its expert's buffer full is dropped: it adds nothing (the token keeps its residual
  path and the shared experts) and counts in `moe_dropped_fraction`. Dispatch and combine are one-hot
  tensors [B, L, E, C] and einsums; under a mesh the dispatched [E, B, C, D] tensor is constrained to
  "experts", so GSPMD moves tokens to their experts' devices (an all-to-all where experts split the batch).
- `<= 0`, dropless: token copies are sorted by expert, run through a grouped matmul (`jax.lax.ragged_dot`)
  and unsorted. Under a mesh it runs in `jax.shard_map`: each device sends its token copies to the devices
  of their experts with `jax.lax.all_to_all` over the mesh axes of "experts", runs its local experts, and
  sends the results back (see `_exchange`).

Auxiliary outputs per MoE layer: `moe_aux_loss` (Switch load balancing, `load_balancing_loss`), `moe_z_loss`
(mean over tokens of logsumexp(logits)^2), `moe_dropped_fraction` (dropped / routed assignments) and
`moe_expert_load` [E] (fraction of routed assignments per expert, before any drop).
"""

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import cast_kernel, output_std, param, project
from model.mlp import Mlp, activate
from sharding import rules as sharding_rules
from sharding.mesh import MeshError
from sharding.rules import constrain, logical_to_spec

# Expert weights as (gate or None, up, down): [E, D, F], [E, D, F], [E, F, D].
Weights = tuple[jax.Array | None, jax.Array, jax.Array]


def expert_capacity(capacity_factor: float, tokens_in_group: int, top_k: int, num_experts: int) -> int:
  """Buffer slots per expert and group: ceil(capacity_factor * tokens_in_group * top_k / num_experts), at most
  tokens_in_group (a token never picks one expert twice, so no expert can receive more).

  Who gets a slot (GShard priority): within a group, all tokens' first choices in token order, then all
  second choices in token order, and so on; an expert's slots go to its assignments in that order until
  full, and every later assignment to it is dropped.
  """
  return min(math.ceil(capacity_factor * tokens_in_group * top_k / num_experts), tokens_in_group)


def load_balancing_loss(probs_TxE: jax.Array, experts_TxK: jax.Array) -> jax.Array:
  """Switch Transformer's auxiliary loss: num_experts * sum_e f_e * P_e.

  f_e is the fraction of routed assignments (token, choice) that go to expert e and P_e the mean router
  probability of e over tokens. It is 1 when routing is uniform (f_e = P_e = 1/E), its minimum for a fixed P.
  """
  num_experts = probs_TxE.shape[-1]
  p_E = jnp.mean(probs_TxE.reshape(-1, num_experts), axis=0)
  return num_experts * jnp.sum(_expert_load(experts_TxK, num_experts) * p_E)


def _expert_load(experts: jax.Array, num_experts: int) -> jax.Array:
  """[E]: fraction of all assignments in `experts` (any shape of expert ids) that go to each expert."""
  counts_E = jnp.sum(jax.nn.one_hot(experts.reshape(-1), num_experts, dtype=jnp.float32), axis=0)
  return counts_E / experts.size


def _route(logits_BxLxE: jax.Array, top_k: int, score: str, renormalize: bool):
  """-> (expert ids [B, L, K] int32, gates [B, L, K] fp32, router probabilities [B, L, E] fp32)."""
  if score == "softmax":
    scores_BxLxE = jax.nn.softmax(logits_BxLxE, axis=-1)
    probs_BxLxE = scores_BxLxE
  else:
    scores_BxLxE = jax.nn.sigmoid(logits_BxLxE)
    # Sigmoid scores do not sum to 1; the balancing loss reads them normalised per token.
    probs_BxLxE = scores_BxLxE / jnp.sum(scores_BxLxE, axis=-1, keepdims=True)
  gates_BxLxK, experts_BxLxK = jax.lax.top_k(scores_BxLxE, top_k)
  if renormalize:
    gates_BxLxK = gates_BxLxK / jnp.sum(gates_BxLxK, axis=-1, keepdims=True)
  return experts_BxLxK.astype(jnp.int32), gates_BxLxK, probs_BxLxE


class Moe(nnx.Module):
  """The MoE MLP; returns (output [B, L, D], this layer's auxiliary outputs)."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    assert cfg.num_experts > 0 and 0 < cfg.top_k <= cfg.num_experts, (cfg.num_experts, cfg.top_k)
    assert cfg.router_score in ("softmax", "sigmoid"), cfg.router_score
    assert cfg.mlp_type in ("swiglu", "gelu"), cfg.mlp_type
    self.cfg = cfg
    e, d, f, wd = cfg.num_experts, cfg.d_model, cfg.expert_mlp_dim or cfg.mlp_dim, cfg.weight_dtype
    # The router is small and its top-k wants all E scores on one device: replicated over experts.
    self.router_DxE = param(rngs, (d, e), ("embed", None), std=cfg.init_std, dtype=wd)
    if cfg.mlp_type == "swiglu":
      self.w_gate_ExDxF = param(rngs, (e, d, f), ("experts", "embed", "mlp"), std=cfg.init_std, dtype=wd)
    self.w_up_ExDxF = param(rngs, (e, d, f), ("experts", "embed", "mlp"), std=cfg.init_std, dtype=wd)
    std_out = output_std(cfg.init_std, cfg.num_layers)
    self.w_down_ExFxD = param(rngs, (e, f, d), ("experts", "mlp", "embed"), std=std_out, dtype=wd)
    if cfg.num_shared_experts > 0:
      # n shared experts of width f, all applied to every token and summed, are one MLP of width n * f.
      self.shared = Mlp(cfg, rngs, mlp_dim=cfg.num_shared_experts * f)

  def __call__(self, x_BxLxD: jax.Array) -> tuple[jax.Array, dict[str, jax.Array]]:
    cfg = self.cfg
    dt = cfg.dtype
    # The router stays in fp32 whatever the compute dtype: routing and its z-loss are sensitive to rounding.
    names = ("batch", "length", None)
    logits_BxLxE = project(x_BxLxD, self.router_DxE, "BLD,DE->BLE", names, name="router", dtype=jnp.float32)
    experts_BxLxK, gates_BxLxK, probs_BxLxE = _route(logits_BxLxE, cfg.top_k, cfg.router_score, cfg.renormalize_gates)
    gate = cast_kernel(self.w_gate_ExDxF, dt) if cfg.mlp_type == "swiglu" else None
    weights = (gate, cast_kernel(self.w_up_ExDxF, dt), cast_kernel(self.w_down_ExFxD, dt))
    if cfg.capacity_factor > 0:
      capacity = expert_capacity(cfg.capacity_factor, x_BxLxD.shape[1], cfg.top_k, cfg.num_experts)
      y_BxLxD, kept = _capacity_moe(x_BxLxD, experts_BxLxK, gates_BxLxK, weights, cfg.mlp_type, capacity)
      dropped_fraction = 1.0 - kept / experts_BxLxK.size
    else:
      y_BxLxD = _dropless_moe(x_BxLxD, experts_BxLxK, gates_BxLxK, weights, cfg.mlp_type)
      dropped_fraction = jnp.zeros((), jnp.float32)
    if cfg.num_shared_experts > 0:
      y_BxLxD = y_BxLxD + self.shared(x_BxLxD)
    aux = {
      "moe_aux_loss": load_balancing_loss(probs_BxLxE, experts_BxLxK),
      "moe_z_loss": jnp.mean(jnp.square(jax.nn.logsumexp(logits_BxLxE, axis=-1))),
      "moe_dropped_fraction": dropped_fraction,
      "moe_expert_load": _expert_load(experts_BxLxK, cfg.num_experts),
    }
    return y_BxLxD, aux


def _capacity_moe(x_BxLxD, experts_BxLxK, gates_BxLxK, weights: Weights, mlp_type: str, capacity: int):
  """GShard dispatch/combine with one group per sequence; -> (output [B, L, D], number of kept assignments)."""
  b, length, k = experts_BxLxK.shape
  num_experts = weights[1].shape[0]
  dt = x_BxLxD.dtype
  # Slot of each assignment in its expert's buffer: a running count over (choice, token), choice-major, which
  # is the priority order of `expert_capacity`.
  chosen_BxKxLxE = jax.nn.one_hot(experts_BxLxK.transpose(0, 2, 1), num_experts, dtype=jnp.int32)
  slot_BxKxLxE = jnp.cumsum(chosen_BxKxLxE.reshape(b, k * length, num_experts), axis=1).reshape(chosen_BxKxLxE.shape)
  slot_BxKxL = jnp.sum(slot_BxKxLxE * chosen_BxKxLxE, axis=-1) - 1
  kept = jnp.sum(slot_BxKxL < capacity)
  dispatch_BxLxExC = jnp.zeros((b, length, num_experts, capacity), jnp.float32)
  combine_BxLxExC = jnp.zeros((b, length, num_experts, capacity), jnp.float32)
  for choice in range(k):  # K one-hot terms of [B, L, E, C], not one of [B, L, K, E, C]
    # one_hot of a slot >= capacity is all zeros: that is the drop.
    slot_BxLxC = jax.nn.one_hot(slot_BxKxL[:, choice], capacity, dtype=jnp.float32)
    expert_BxLxE = jax.nn.one_hot(experts_BxLxK[:, :, choice], num_experts, dtype=jnp.float32)
    selected_BxLxExC = expert_BxLxE[..., None] * slot_BxLxC[:, :, None, :]
    dispatch_BxLxExC = dispatch_BxLxExC + selected_BxLxExC
    combine_BxLxExC = combine_BxLxExC + selected_BxLxExC * gates_BxLxK[:, :, choice, None, None]
  names = ("experts", "batch", None, "embed")
  x_ExBxCxD = constrain(jnp.einsum("BLEC,BLD->EBCD", dispatch_BxLxExC.astype(dt), x_BxLxD), names)
  gate_ExDxF, up_ExDxF, down_ExFxD = weights
  up_ExBxCxF = jnp.einsum("EBCD,EDF->EBCF", x_ExBxCxD, up_ExDxF)
  gate_ExBxCxF = jnp.einsum("EBCD,EDF->EBCF", x_ExBxCxD, gate_ExDxF) if gate_ExDxF is not None else None
  h_ExBxCxF = constrain(activate(mlp_type, gate_ExBxCxF, up_ExBxCxF), ("experts", "batch", None, "mlp"))
  y_ExBxCxD = constrain(jnp.einsum("EBCF,EFD->EBCD", h_ExBxCxF, down_ExFxD), names)
  y_BxLxD = jnp.einsum("BLEC,EBCD->BLD", combine_BxLxExC.astype(dt), y_ExBxCxD)
  return constrain(y_BxLxD, ("batch", "length", "embed")), kept


def _dropless_moe(x_BxLxD, experts_BxLxK, gates_BxLxK, weights: Weights, mlp_type: str) -> jax.Array:
  mesh = sharding_rules.active_mesh()
  if mesh is None:
    return _dropless_shard(x_BxLxD, experts_BxLxK, gates_BxLxK, weights, mlp_type=mlp_type)
  rules = sharding_rules.active_rules()
  token_spec = logical_to_spec(("batch", "length", None), rules, mesh)
  up_spec = logical_to_spec(("experts", None, "mlp"), rules, mesh)
  down_spec = logical_to_spec(("experts", "mlp", None), rules, mesh)
  token_axes = sharding_rules.entry_axes(token_spec[0]) + sharding_rules.entry_axes(token_spec[1])
  expert_axes, mlp_axes = sharding_rules.entry_axes(up_spec[0]), sharding_rules.entry_axes(up_spec[2])
  exchange = bool(expert_axes) and set(expert_axes) <= set(token_axes)
  if expert_axes and not exchange and set(expert_axes) & set(token_axes):
    raise MeshError(
      f"experts are split over mesh axes {expert_axes} but tokens only over {token_axes}: the dropless MoE "
      "needs the batch split over all of the experts' axes or none; change config.mesh.rules"
    )
  body = functools.partial(
    _dropless_shard, mlp_type=mlp_type, expert_axes=expert_axes, exchange=exchange, sum_axes=mlp_axes
  )
  # The embed dimension of the weights is not in their specs: under fsdp, GSPMD gathers it before the call.
  # Their mlp dimension stays split (tensor parallelism): each device makes a partial sum, reduced at the end.
  weight_specs = (up_spec if weights[0] is not None else None, up_spec, down_spec)
  return jax.shard_map(
    body, mesh=mesh, in_specs=(token_spec, token_spec, token_spec, weight_specs), out_specs=token_spec
  )(x_BxLxD, experts_BxLxK, gates_BxLxK, weights)


def _dropless_shard(
  x_BxLxD,
  experts_BxLxK,
  gates_BxLxK,
  weights: Weights,
  *,
  mlp_type: str,
  expert_axes: tuple[str, ...] = (),
  exchange: bool = False,
  sum_axes: tuple[str, ...] = (),
) -> jax.Array:
  """The dropless MoE on one device's tokens and experts (all of both when there is no mesh).

  `expert_axes`: mesh axes that split the experts. With `exchange` they also split the tokens, which travel
  to their experts (`_exchange`); without, every device holds all tokens, runs its own experts on their share
  of the assignments, and the partial outputs are summed over `expert_axes`. `sum_axes` split the experts'
  mlp dimension (tensor parallelism): outputs are partial sums there too.
  """
  b, length, d = x_BxLxD.shape
  k = experts_BxLxK.shape[-1]
  local_experts = weights[1].shape[0]
  # Assignment a = token a // K, choice a % K.
  x_AxD = jnp.repeat(x_BxLxD.reshape(b * length, d), k, axis=0)
  expert_A = experts_BxLxK.reshape(-1)
  if exchange:
    y_AxD = _exchange(x_AxD, expert_A, weights, mlp_type, expert_axes)
  elif expert_axes:
    local_A = expert_A - jax.lax.axis_index(expert_axes) * local_experts
    local_A = jnp.where((local_A >= 0) & (local_A < local_experts), local_A, local_experts)  # not ours: padding
    y_AxD = _grouped_mlp(x_AxD, local_A, weights, mlp_type)
    sum_axes = sum_axes + expert_axes
  else:
    y_AxD = _grouped_mlp(x_AxD, expert_A, weights, mlp_type)
  y_TxKxD = y_AxD.reshape(b * length, k, d).astype(jnp.float32)
  y_TxD = jnp.sum(y_TxKxD * gates_BxLxK.reshape(b * length, k, 1), axis=1).astype(x_BxLxD.dtype)
  if sum_axes:
    y_TxD = jax.lax.psum(y_TxD, sum_axes)
  return y_TxD.reshape(b, length, d)


def _exchange(x_AxD, expert_A, weights: Weights, mlp_type: str, expert_axes: tuple[str, ...]) -> jax.Array:
  """Sends each assignment to the device holding its expert, runs the local experts, brings results back.

  Device p along `expert_axes` holds experts [p * E_local, (p + 1) * E_local). The send buffer has one block
  of A rows per peer, [P, A, D]: sized for the worst case, in which all A assignments of this device go to one
  peer, because `jax.lax.all_to_all` moves fixed sizes (`ragged_all_to_all`, which would move only the rows in
  use, is not implemented on XLA:CPU). Rows not in use are padding with expert id E_local: sorted last and
  left out of the grouped matmul. So each device receives [P, A, D] and runs its experts on P * A rows.
  """
  a, d = x_AxD.shape
  local_experts = weights[1].shape[0]
  peers = jax.lax.axis_size(expert_axes)
  dest_A = expert_A // local_experts
  # Row of each assignment in its peer's block: assignments to one peer keep their order.
  dest_AxP = jax.nn.one_hot(dest_A, peers, dtype=jnp.int32)
  row_A = jnp.sum((jnp.cumsum(dest_AxP, axis=0) - 1) * dest_AxP, axis=1)
  send_PxAxD = jnp.zeros((peers, a, d), x_AxD.dtype).at[dest_A, row_A].set(x_AxD)
  send_expert_PxA = jnp.full((peers, a), local_experts, jnp.int32).at[dest_A, row_A].set(expert_A % local_experts)
  # After the exchange, block p holds what peer p sent to this device.
  recv_PxAxD = jax.lax.all_to_all(send_PxAxD, expert_axes, 0, 0)
  recv_expert_PxA = jax.lax.all_to_all(send_expert_PxA, expert_axes, 0, 0)
  y_MxD = _grouped_mlp(recv_PxAxD.reshape(peers * a, d), recv_expert_PxA.reshape(peers * a), weights, mlp_type)
  back_PxAxD = jax.lax.all_to_all(y_MxD.reshape(peers, a, d), expert_axes, 0, 0)
  return back_PxAxD[dest_A, row_A]


def _grouped_mlp(x_MxD, expert_M, weights: Weights, mlp_type: str) -> jax.Array:
  """Row m through expert expert_M[m]: rows sorted by expert, grouped matmuls, unsorted. Ids >= E give 0."""
  gate_ExDxF, up_ExDxF, down_ExFxD = weights
  num_experts = up_ExDxF.shape[0]
  order_M = jnp.argsort(expert_M, stable=True)
  sizes_E = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32)  # ids >= E are not counted
  xs_MxD = x_MxD[order_M]
  up_MxF = jax.lax.ragged_dot(xs_MxD, up_ExDxF, sizes_E)
  gate_MxF = jax.lax.ragged_dot(xs_MxD, gate_ExDxF, sizes_E) if gate_ExDxF is not None else None
  # Rows past sum(sizes_E) (padding) come out of ragged_dot as zeros.
  ys_MxD = jax.lax.ragged_dot(activate(mlp_type, gate_MxF, up_MxF), down_ExFxD, sizes_E)
  unsort_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0], dtype=order_M.dtype))
  return ys_MxD[unsort_M]
