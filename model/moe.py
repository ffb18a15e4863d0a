"""Mixture-of-experts MLP: an fp32 router picks `top_k` of `num_experts` expert MLPs for every token.

Routing. logits = x @ router in fp32; scores = softmax(logits) or sigmoid(logits) (`router_score`); each token
takes its `top_k` highest-scoring experts (ties: lower expert index first); its gates are those scores, divided
by their sum when `renormalize_gates`. The output is sum_k gate_k * expert_k(x), plus the always-on shared
experts when `num_shared_experts` > 0.

Two dispatch paths, chosen by `capacity_factor`:
- `> 0`, capacity (GShard/Switch): each sequence is cut into groups of S = min(`group_size`, L) consecutive
  tokens (the last group of a sequence may be shorter; it is padded with tokens that route nowhere). The
  tokens of one group fill per-expert buffers of C = `expert_capacity(capacity_factor, S, ...)` slots, see there
  for the exact rule and priority order. An assignment that finds its expert's buffer full is dropped: it adds
  nothing (the token keeps its residual path and the shared experts) and counts in `moe_dropped_fraction`.
  Dispatch and combine are one-hot tensors [G, S, E, C] (G = B x groups per sequence) and einsums, so their
  cost is B * L * E * C * D: linear in L for a fixed `group_size` (one group per sequence would make C, and
  so the cost per token, grow with L). Groups never span sequences, so the batch dimension and its sharding
  stay as they are. Under a mesh the dispatched [E, G, C, D] tensor is constrained to "experts", so GSPMD
  moves tokens to their experts' devices (an all-to-all where experts split the batch).
- `<= 0`, dropless: token copies are sorted by expert, run through a grouped matmul (`jax.lax.ragged_dot`)
  and unsorted. Under a mesh it runs in `jax.shard_map`: each device sends its token copies to the devices
  of their experts, runs its local experts, and sends the results back, in one of two ways (`dropless_impl`):
  `buffer`, fixed-size `jax.lax.all_to_all` buffers sized for the worst case (`_buffer_exchange`; any backend),
  or `ragged`, `jax.lax.ragged_all_to_all`, which moves only the rows in use (`_ragged_exchange`; GPU/TPU:
  XLA:CPU has no kernel for it). `auto` picks ragged on GPU/TPU and buffer elsewhere.

Auxiliary outputs per MoE layer: `moe_aux_loss` (Switch load balancing, `load_balancing_loss`), `moe_z_loss`
(mean over tokens of logsumexp(logits)^2), `moe_dropped_fraction` (dropped / routed assignments) and
`moe_expert_load` [E] (fraction of routed assignments per expert, before any drop).

Letters beyond the model legend: A token copies (assignments, tokens x K), P devices along the experts' mesh
axes, M rows a device receives, G routing groups, S tokens per group, C slots per expert and group.
"""

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from model.config import ModelConfig
from model.layers import cast_kernel, output_std, param, project
from model.mlp import Mlp, activate
from parallel import rules as sharding_rules
from parallel.rules import constrain, logical_to_spec

# Expert weights as (gate or None, up, down): [E, D, F], [E, D, F], [E, F, D].
Weights = tuple[jax.Array | None, jax.Array, jax.Array]
# The experts' nonlinearity: (gate or None, up) -> hidden (model.mlp.activate for the model's mlp_type and target).
Activation = Callable[[jax.Array | None, jax.Array], jax.Array]

DROPLESS_IMPLS = ("auto", "ragged", "buffer")
RAGGED_BACKENDS = ("gpu", "tpu")  # XLA:CPU: "UNIMPLEMENTED: HLO opcode ragged-all-to-all"


def resolve_dropless(impl: str, backend: str) -> str:
  """The exchange `impl` stands for on `backend`: `auto` is ragged where the backend has it, else buffer."""
  if impl != "auto":
    return impl
  return "ragged" if backend in RAGGED_BACKENDS else "buffer"


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
    r = cfg.rules
    logits_BxLxE = project(
      x_BxLxD, self.router_DxE, "BLD,DE->BLE", names, name="router", dtype=jnp.float32, rules=r, platform=cfg.platform
    )
    experts_BxLxK, gates_BxLxK, probs_BxLxE = _route(logits_BxLxE, cfg.top_k, cfg.router_score, cfg.renormalize_gates)
    gate = cast_kernel(self.w_gate_ExDxF, dt, r) if cfg.mlp_type == "swiglu" else None
    weights = (gate, cast_kernel(self.w_up_ExDxF, dt, r), cast_kernel(self.w_down_ExFxD, dt, r))
    act = functools.partial(activate, cfg.mlp_type, platform=cfg.platform)
    if cfg.capacity_factor > 0:
      group = min(cfg.group_size, x_BxLxD.shape[1])
      capacity = expert_capacity(cfg.capacity_factor, group, cfg.top_k, cfg.num_experts)
      routed = (x_BxLxD, experts_BxLxK, gates_BxLxK, weights)
      y_BxLxD, kept = _capacity_moe(*routed, act, group, capacity, r)
      dropped_fraction = 1.0 - kept / experts_BxLxK.size
    else:
      impl = resolve_dropless(cfg.dropless_impl, cfg.platform)
      y_BxLxD = _dropless_moe(x_BxLxD, experts_BxLxK, gates_BxLxK, weights, act, r, impl)
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


def _capacity_moe(
  x_BxLxD, experts_BxLxK, gates_BxLxK, weights: Weights, act: Activation, group: int, capacity: int, rules
):
  """GShard dispatch/combine in groups of `group` consecutive tokens of a sequence, `capacity` slots per expert
  and group; -> (output [B, L, D], number of kept assignments)."""
  b, length, k = experts_BxLxK.shape
  num_experts = weights[1].shape[0]
  groups = -(-length // group)  # per sequence
  pad = groups * group - length
  if pad:
    # Padding tokens route to expert id E, which has no one-hot column: they take no slot and add nothing.
    x_BxLxD = jnp.pad(x_BxLxD, ((0, 0), (0, pad), (0, 0)))
    experts_BxLxK = jnp.pad(experts_BxLxK, ((0, 0), (0, pad), (0, 0)), constant_values=num_experts)
    gates_BxLxK = jnp.pad(gates_BxLxK, ((0, 0), (0, pad), (0, 0)))
  # Groups of one sequence are adjacent rows of G = B x groups, so a batch sharding carries over to G.
  d = x_BxLxD.shape[-1]
  x_GxSxD = x_BxLxD.reshape(b * groups, group, d)
  experts_GxSxK = experts_BxLxK.reshape(b * groups, group, k)
  gates_GxSxK = gates_BxLxK.reshape(b * groups, group, k)
  y_GxSxD, kept = _group_capacity_moe(x_GxSxD, experts_GxSxK, gates_GxSxK, weights, act, capacity, rules)
  y_BxLxD = y_GxSxD.reshape(b, groups * group, d)[:, :length]
  return constrain(y_BxLxD, ("batch", "length", "embed"), rules), kept


def _group_capacity_moe(x_GxSxD, experts_GxSxK, gates_GxSxK, weights: Weights, act: Activation, capacity: int, rules):
  """The capacity MoE of each group (row of G) on its own; expert ids >= E are padding that takes no slot."""
  g, size, k = experts_GxSxK.shape
  num_experts = weights[1].shape[0]
  dt = x_GxSxD.dtype
  # Slot of each assignment in its expert's buffer: a running count over (choice, token), choice-major, which
  # is the priority order of `expert_capacity`.
  chosen_GxKxSxE = jax.nn.one_hot(experts_GxSxK.transpose(0, 2, 1), num_experts, dtype=jnp.int32)
  slot_GxKxSxE = jnp.cumsum(chosen_GxKxSxE.reshape(g, k * size, num_experts), axis=1).reshape(chosen_GxKxSxE.shape)
  slot_GxKxS = jnp.sum(slot_GxKxSxE * chosen_GxKxSxE, axis=-1) - 1  # -1 for padding
  kept = jnp.sum((slot_GxKxS >= 0) & (slot_GxKxS < capacity))
  dispatch_GxSxExC = jnp.zeros((g, size, num_experts, capacity), jnp.float32)
  combine_GxSxExC = jnp.zeros((g, size, num_experts, capacity), jnp.float32)
  for choice in range(k):  # K one-hot terms of [G, S, E, C], not one of [G, S, K, E, C]
    # one_hot of a slot >= capacity (or -1) is all zeros: that is the drop.
    slot_GxSxC = jax.nn.one_hot(slot_GxKxS[:, choice], capacity, dtype=jnp.float32)
    expert_GxSxE = jax.nn.one_hot(experts_GxSxK[:, :, choice], num_experts, dtype=jnp.float32)
    selected_GxSxExC = expert_GxSxE[..., None] * slot_GxSxC[:, :, None, :]
    dispatch_GxSxExC = dispatch_GxSxExC + selected_GxSxExC
    combine_GxSxExC = combine_GxSxExC + selected_GxSxExC * gates_GxSxK[:, :, choice, None, None]
  names = ("experts", "batch", None, "embed")
  x_ExGxCxD = constrain(jnp.einsum("GSEC,GSD->EGCD", dispatch_GxSxExC.astype(dt), x_GxSxD), names, rules)
  gate_ExDxF, up_ExDxF, down_ExFxD = weights
  up_ExGxCxF = jnp.einsum("EGCD,EDF->EGCF", x_ExGxCxD, up_ExDxF)
  gate_ExGxCxF = jnp.einsum("EGCD,EDF->EGCF", x_ExGxCxD, gate_ExDxF) if gate_ExDxF is not None else None
  h_ExGxCxF = constrain(act(gate_ExGxCxF, up_ExGxCxF), ("experts", "batch", None, "mlp"), rules)
  y_ExGxCxD = constrain(jnp.einsum("EGCF,EFD->EGCD", h_ExGxCxF, down_ExFxD), names, rules)
  return jnp.einsum("GSEC,EGCD->GSD", combine_GxSxExC.astype(dt), y_ExGxCxD), kept


def _dropless_moe(
  x_BxLxD,
  experts_BxLxK,
  gates_BxLxK,
  weights: Weights,
  act: Activation,
  rules,
  impl: str = "buffer",
  collective=jax.lax.ragged_all_to_all,
) -> jax.Array:
  """`impl`: "buffer" | "ragged", how tokens travel between expert-parallel devices. `collective`: the
  function with `jax.lax.ragged_all_to_all`'s signature and meaning that the ragged exchange calls. Under the
  mesh of JAX's context, tokens and experts are split as `rules` say (an exchange when both share axes); with
  no mesh, every token meets every expert on the one device."""
  assert impl in ("buffer", "ragged"), impl
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _dropless_shard(x_BxLxD, experts_BxLxK, gates_BxLxK, weights, act=act)
  token_spec = logical_to_spec(("batch", "length", None), rules, mesh)
  up_spec = logical_to_spec(("experts", None, "mlp"), rules, mesh)
  down_spec = logical_to_spec(("experts", "mlp", None), rules, mesh)
  token_axes = sharding_rules.entry_axes(token_spec[0]) + sharding_rules.entry_axes(token_spec[1])
  expert_axes, mlp_axes = sharding_rules.entry_axes(up_spec[0]), sharding_rules.entry_axes(up_spec[2])
  exchange = bool(expert_axes) and set(expert_axes) <= set(token_axes)
  assert exchange or not set(expert_axes) & set(token_axes), "settings.validate.validate_layout checks this"
  if not exchange:
    exchange_fn = None
  elif impl == "ragged":
    exchange_fn = functools.partial(_ragged_exchange, collective=collective)
  else:
    exchange_fn = _buffer_exchange
  body = functools.partial(_dropless_shard, act=act, expert_axes=expert_axes, exchange=exchange_fn, sum_axes=mlp_axes)
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
  act: Activation,
  expert_axes: tuple[str, ...] = (),
  exchange=None,
  sum_axes: tuple[str, ...] = (),
) -> jax.Array:
  """The dropless MoE on one device's tokens and experts (all of both when there is no mesh).

  `expert_axes`: mesh axes that split the experts. With an `exchange` (`_buffer_exchange`, `_ragged_exchange`)
  they also split the tokens, which travel to their experts; without, every device holds all tokens, runs its
  own experts on their share of the assignments, and the partial outputs are summed over `expert_axes`.
  `sum_axes` split the experts' mlp dimension (tensor parallelism): outputs are partial sums there too.
  """
  b, length, d = x_BxLxD.shape
  k = experts_BxLxK.shape[-1]
  local_experts = weights[1].shape[0]
  # Assignment a = token a // K, choice a % K.
  x_AxD = jnp.repeat(x_BxLxD.reshape(b * length, d), k, axis=0)
  expert_A = experts_BxLxK.reshape(-1)
  if exchange is not None:
    y_AxD = exchange(x_AxD, expert_A, weights, act, expert_axes)
  elif expert_axes:
    local_A = expert_A - jax.lax.axis_index(expert_axes) * local_experts
    local_A = jnp.where((local_A >= 0) & (local_A < local_experts), local_A, local_experts)  # not ours: padding
    y_AxD = _grouped_mlp(x_AxD, local_A, weights, act)
    sum_axes = sum_axes + expert_axes
  else:
    y_AxD = _grouped_mlp(x_AxD, expert_A, weights, act)
  y_TxKxD = y_AxD.reshape(b * length, k, d).astype(jnp.float32)
  y_TxD = jnp.sum(y_TxKxD * gates_BxLxK.reshape(b * length, k, 1), axis=1).astype(x_BxLxD.dtype)
  if sum_axes:
    y_TxD = jax.lax.psum(y_TxD, sum_axes)
  return y_TxD.reshape(b, length, d)


def _buffer_exchange(x_AxD, expert_A, weights: Weights, act: Activation, expert_axes: tuple[str, ...]) -> jax.Array:
  """Sends each assignment to the device holding its expert, runs the local experts, brings results back.

  Device p along `expert_axes` holds experts [p * E_local, (p + 1) * E_local). The send buffer has one block
  of A rows per peer, [P, A, D]: sized for the worst case, in which all A assignments of this device go to one
  peer, because `jax.lax.all_to_all` moves fixed sizes. Rows not in use are padding with expert id E_local:
  sorted last and left out of the grouped matmul. So each device receives [P, A, D] and runs its experts on
  P * A rows, and every device moves P * A rows each way whatever the routing.
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
  y_MxD = _grouped_mlp(recv_PxAxD.reshape(peers * a, d), recv_expert_PxA.reshape(peers * a), weights, act)
  back_PxAxD = jax.lax.all_to_all(y_MxD.reshape(peers, a, d), expert_axes, 0, 0)
  return back_PxAxD[dest_A, row_A]


def exchange_plan(counts_PxPxE: jax.Array) -> dict[str, jax.Array]:
  """Offsets and sizes of the ragged exchange for every device, from what goes where.

  `counts_PxPxE[s, r, e]`: rows device s sends to local expert e of device r. Sender s orders its rows by
  destination device, then expert (they are sorted by global expert id); receiver r lays out what it receives
  by sender, then expert. Returns, indexed [device, peer], the four arrays of `jax.lax.ragged_all_to_all` for
  the way there (`input_offsets`, `send_sizes`, `output_offsets`, `recv_sizes`); the way back sends each
  received slice home, which is the same four arrays transposed and swapped (`_ragged_exchange`).
  """
  send_PxP = jnp.sum(counts_PxPxE, axis=-1)  # [sender, receiver]
  input_offsets_PxP = jnp.cumsum(send_PxP, axis=1) - send_PxP  # in the sender's buffer
  recv_PxP = send_PxP.T  # [receiver, sender]
  recv_offsets_PxP = jnp.cumsum(recv_PxP, axis=1) - recv_PxP  # in the receiver's buffer
  return {
    "input_offsets": input_offsets_PxP,
    "send_sizes": send_PxP,
    "output_offsets": recv_offsets_PxP.T,  # [sender, receiver]: where the sender's slice lands
    "recv_sizes": recv_PxP,
  }


def received_experts(counts_PxE: jax.Array, rows: int) -> jax.Array:
  """[rows]: the local expert of each row a receiver holds after the ragged exchange, E for unused rows.

  `counts_PxE[s, e]`: rows sender s sent to this device's expert e; they sit by sender, then expert."""
  peers, local_experts = counts_PxE.shape
  ends_B = jnp.cumsum(counts_PxE.reshape(-1))  # end row of each (sender, expert) block
  block_M = jnp.searchsorted(ends_B, jnp.arange(rows, dtype=ends_B.dtype), side="right")
  return jnp.where(block_M < peers * local_experts, block_M % local_experts, local_experts).astype(jnp.int32)


def _ragged_exchange(
  x_AxD, expert_A, weights: Weights, act: Activation, expert_axes: tuple[str, ...], *, collective
) -> jax.Array:
  """`_buffer_exchange` with `ragged_all_to_all`: each device sends only the rows its peers' experts need.

  Rows are sorted by global expert id, so those for device p are one contiguous slice. Every device learns the
  whole [P, P, E_local] count matrix (a tiny all-gather) and reads its offsets from `exchange_plan`. The
  receive buffer is still sized for the worst case (P * A rows: every peer sends all its rows here) because
  shapes are static, but only the rows in use travel, and the grouped matmul skips the unused ones.
  """
  a, d = x_AxD.shape
  local_experts = weights[1].shape[0]
  peers = jax.lax.axis_size(expert_axes)
  me = jax.lax.axis_index(expert_axes)
  order_A = jnp.argsort(expert_A, stable=True)
  xs_AxD = x_AxD[order_A]
  counts_PxE = jnp.bincount(expert_A, length=peers * local_experts).astype(jnp.int32).reshape(peers, local_experts)
  counts_PxPxE = jax.lax.all_gather(counts_PxE, expert_axes)
  plan = exchange_plan(counts_PxPxE)
  there = (plan["input_offsets"][me], plan["send_sizes"][me], plan["output_offsets"][me], plan["recv_sizes"][me])
  recv_MxD = collective(xs_AxD, jnp.zeros((peers * a, d), x_AxD.dtype), *there, axis_name=expert_axes)
  recv_expert_M = received_experts(counts_PxPxE[:, me], peers * a)
  y_MxD = _grouped_mlp(recv_MxD, recv_expert_M, weights, act)
  # Back: the slice from each sender s returns to the rows s sent it from. Columns [:, me] of the plan hold what
  # the others did with this device, which is what this device now does in reverse.
  back = (plan["output_offsets"][:, me], plan["recv_sizes"][me], plan["input_offsets"][:, me], plan["send_sizes"][me])
  ys_AxD = collective(y_MxD, jnp.zeros((a, d), y_MxD.dtype), *back, axis_name=expert_axes)
  unsort_A = jnp.zeros_like(order_A).at[order_A].set(jnp.arange(a, dtype=order_A.dtype))
  return ys_AxD[unsort_A]


def _grouped_mlp(x_MxD, expert_M, weights: Weights, act: Activation) -> jax.Array:
  """Row m through expert expert_M[m]: rows sorted by expert, grouped matmuls, unsorted. Ids >= E give 0."""
  gate_ExDxF, up_ExDxF, down_ExFxD = weights
  num_experts = up_ExDxF.shape[0]
  order_M = jnp.argsort(expert_M, stable=True)
  sizes_E = jnp.bincount(expert_M, length=num_experts).astype(jnp.int32)  # ids >= E are not counted
  xs_MxD = x_MxD[order_M]
  up_MxF = jax.lax.ragged_dot(xs_MxD, up_ExDxF, sizes_E)
  gate_MxF = jax.lax.ragged_dot(xs_MxD, gate_ExDxF, sizes_E) if gate_ExDxF is not None else None
  # Rows past sum(sizes_E) (padding) come out of ragged_dot as zeros.
  ys_MxD = jax.lax.ragged_dot(act(gate_MxF, up_MxF), down_ExFxD, sizes_E)
  unsort_M = jnp.zeros_like(order_M).at[order_M].set(jnp.arange(order_M.shape[0], dtype=order_M.dtype))
  return ys_MxD[unsort_M]
