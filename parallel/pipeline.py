"""Pipeline parallelism inside the jitted step: the runner that executes any schedule table (schedules.py), the
gradients of one microbatch through it, the layer rules of a pipelined mesh and the plan's `pipeline` entry.

The runner (`run`) is a `lax.scan` over ticks inside `jax.shard_map` over the `stage` mesh axis (the data,
fsdp, expert, context and tensor axes stay automatic inside; context attention opens its own shard_map over
them, parallel/context.py). At every tick each stage reads its row of the table, stores the activation and
gradient that arrived, runs its action under `lax.switch`, and passes activations
to stage s + 1 and gradients to stage s - 1 with `lax.ppermute` (a ring, so circular's last stage feeds stage
0). The backward of a chunk is `jax.vjp` of that chunk's forward, recomputed from the stashed input (so a
stash slot holds one [B, L, D] input, not every intermediate of the chunk); the last chunk's backward also
runs the head and loss, so its gradient starts there. No autodiff runs through the tick loop.

The stages take different branches of the switch at the same tick, so a collective inside a branch may only
involve one stage's devices (the groups of the fsdp, tensor, ... all-gathers and all-reduces that XLA inserts),
never all of them: the stages outside the branch would never join it. XLA runs a collective-permute as one
rendezvous of every device, so none may sit in a branch; rules.STAGE_HEAD_RULES keeps the head free of them.

Shape letters as in schedules.py (S stages, M microbatches, R repeats, C units per chunk, X units).
"""

import dataclasses
import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, PartitionSpec

from parallel.partition import microbatches
from parallel.rules import entry_axes
from parallel.schedules import FORWARD, IDLE, Schedule, from_stage_major, make_schedule, to_stage_major

_log = logging.getLogger(__name__)


def run(schedule: Schedule, mesh, chunk_fn, head_fn, chunks, head_params, x_MxBxLxD, side, keys):
  """Runs the forward and backward passes of `schedule`; returns gradients and statistics.

  chunk_fn(chunk params [C, ...], head params, x [B, L, D], side [B, L] of one microbatch, keys [C] or None)
    -> (y [B, L, D], loss, stats [C, ...]): one chunk; `loss` is its scalar contribution to the objective
    (e.g. MoE auxiliary losses), `stats` per-unit statistics.
  head_fn(chunk params, head params, y [B, L, D], side of one microbatch) -> (loss, stats): the objective's
    remaining terms and their statistics, after the last chunk (the chunk's parameters are there only so the
    caller can assemble its model; the head's gradients are taken with respect to head params).
  chunks: the units in stage-major order (`to_stage_major`), leading axis X split over `stage`.
  x_MxBxLxD: the stack's inputs (the embedding), replicated over `stage`; side: dict of [M, B, L] arrays;
  keys: [M, X] unit keys in stage-major order, or None.

  Returns (chunk grads like `chunks`, head grads, d objective / d x_MxBxLxD, per-unit stats summed over
  microbatches [X, ...] in stage-major order, head stats summed over microbatches).
  """
  sched = schedule
  spec_stage, spec_rep = jax.sharding.PartitionSpec("stage"), jax.sharding.PartitionSpec()
  keys_spec = jax.sharding.PartitionSpec(None, "stage") if keys is not None else None

  def body(chunks, head_params, x_MxBxLxD, side, keys):
    # Inside, `stage` is manual; the constraints of chunk_fn and head_fn see that mesh through JAX's context.
    return _run_local(sched, chunk_fn, head_fn, chunks, head_params, x_MxBxLxD, side, keys)

  out_specs = (spec_stage, spec_rep, spec_rep, spec_stage, spec_rep)
  return jax.shard_map(
    body,
    mesh=mesh,
    in_specs=(spec_stage, spec_rep, spec_rep, spec_rep, keys_spec),
    out_specs=out_specs,
    axis_names={"stage"},
    check_vma=False,
  )(chunks, head_params, x_MxBxLxD, side, keys)


@dataclasses.dataclass(frozen=True)
class _Stage:
  """One stage's view of `run` inside the shard_map: its R chunks ([R * C, ...]), the inputs, and the actions."""

  sched: Schedule
  chunk_fn: object
  head_fn: object
  chunks: dict
  head_params: dict
  x_MxBxLxD: jax.Array
  side: dict
  keys: jax.Array | None
  stage: jax.Array  # this stage's index on the `stage` axis

  @property
  def c_units(self) -> int:
    return jax.tree.leaves(self.chunks)[0].shape[0] // self.sched.repeats

  @property
  def zeros_x(self) -> jax.Array:
    return jnp.zeros(self.x_MxBxLxD.shape[1:], self.x_MxBxLxD.dtype)

  def take_chunk(self, tree, r):
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, r * self.c_units, self.c_units), tree)

  def add_chunk(self, total, part, r):
    def one(a, b):
      current = jax.lax.dynamic_slice_in_dim(a, r * self.c_units, self.c_units)
      return jax.lax.dynamic_update_slice_in_dim(a, current + b.astype(a.dtype), r * self.c_units, 0)

    return jax.tree.map(one, total, part)

  def micro(self, m, r):
    """Microbatch m's side inputs and the unit keys of chunk r."""
    keys = None if self.keys is None else jax.lax.dynamic_slice_in_dim(self.keys[m], r * self.c_units, self.c_units)
    return jax.tree.map(lambda a: a[m], self.side), keys

  def is_last(self, r):
    return (self.stage == self.sched.stages - 1) & (r == self.sched.repeats - 1)

  def forward(self, carry, m, r, x_slot, g_slot):
    side_m, keys_m = self.micro(m, r)
    y, _, _ = self.chunk_fn(self.take_chunk(self.chunks, r), self.head_params, carry["stash"][x_slot], side_m, keys_m)
    return carry, y.astype(self.x_MxBxLxD.dtype), self.zeros_x

  def backward(self, carry, m, r, x_slot, g_slot):
    side_m, keys_m = self.micro(m, r)
    last = self.is_last(r)

    def objective(p, hp, x):
      y, loss, stats = self.chunk_fn(p, hp, x, side_m, keys_m)
      head_loss, head_stats = jax.lax.cond(last, self.head_fn, _zero_head(self.head_fn), p, hp, y, side_m)
      return (y, loss + head_loss), (stats, head_stats)

    chunk = self.take_chunk(self.chunks, r)
    (y, _), pullback, (stats, head_stats) = jax.vjp(
      objective, chunk, self.head_params, carry["stash"][x_slot], has_aux=True
    )
    dy = jnp.where(last, jnp.zeros_like(y), carry["grads_in"][g_slot].astype(y.dtype))
    d_chunk, d_head, dx = pullback((dy, jnp.ones((), jnp.float32)))
    carry = dict(carry)
    carry["chunk_grads"] = self.add_chunk(carry["chunk_grads"], d_chunk, r)
    carry["head_grads"] = jax.tree.map(jnp.add, carry["head_grads"], d_head)
    carry["unit_stats"] = self.add_chunk(carry["unit_stats"], stats, r)
    carry["head_stats"] = jax.tree.map(jnp.add, carry["head_stats"], head_stats)
    first = (self.stage == 0) & (r == 0)
    dtype = self.x_MxBxLxD.dtype
    carry["dx_M"] = carry["dx_M"].at[m].add(jnp.where(first, dx, jnp.zeros_like(dx)).astype(dtype))
    return carry, self.zeros_x, dx.astype(dtype)

  def idle(self, carry, m, r, x_slot, g_slot):
    return carry, self.zeros_x, self.zeros_x

  def tick(self, carry, t):
    row = {c: jnp.asarray(v)[t, self.stage] for c, v in self.sched.table.items()}
    m, r = row["microbatch"], row["repeat"]
    carry = dict(carry)
    x_in, g_in = carry.pop("x_in"), carry.pop("g_in")
    stash = carry["stash"].at[row["recv_x_slot"]].set(x_in)
    # The first chunk's input is the embedding, written at its forward's own tick.
    from_embedding = (row["op"] == FORWARD) & (self.stage == 0) & (r == 0)
    stash = stash.at[row["x_slot"]].set(jnp.where(from_embedding, self.x_MxBxLxD[m], stash[row["x_slot"]]))
    carry["stash"] = stash
    carry["grads_in"] = carry["grads_in"].at[row["recv_g_slot"]].set(g_in)
    # The last chunk's forward has nothing to send: its backward recomputes it together with the loss.
    op = jnp.where((row["op"] == FORWARD) & self.is_last(r), IDLE, row["op"])
    actions = (self.idle, self.forward, self.backward)
    carry, y, dx = jax.lax.switch(op, actions, carry, m, r, row["x_slot"], row["g_slot"])
    s_count = self.sched.stages
    carry["x_in"] = jax.lax.ppermute(y, "stage", [(s, (s + 1) % s_count) for s in range(s_count)])
    carry["g_in"] = jax.lax.ppermute(dx, "stage", [(s, (s - 1) % s_count) for s in range(s_count)])
    return carry, None

  def initial_carry(self) -> dict:
    """Buffers (each with a scratch slot), what arrives at the first tick, and zero gradients and statistics."""
    side_0, keys_0 = self.micro(0, 0)
    chunk_0, zeros_x = self.take_chunk(self.chunks, 0), self.zeros_x
    _, _, stats_shape = jax.eval_shape(lambda: self.chunk_fn(chunk_0, self.head_params, zeros_x, side_0, keys_0))
    _, head_stats_shape = jax.eval_shape(lambda: self.head_fn(chunk_0, self.head_params, zeros_x, side_0))
    zeros = lambda shapes: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)  # noqa: E731
    units = jax.tree.leaves(self.chunks)[0].shape[0]
    unit_stats_shape = jax.tree.map(lambda a: jax.ShapeDtypeStruct((units, *a.shape[1:]), a.dtype), stats_shape)
    return {
      "stash": jnp.zeros((self.sched.stash_slots + 1, *zeros_x.shape), zeros_x.dtype),
      "grads_in": jnp.zeros((self.sched.grad_slots + 1, *zeros_x.shape), zeros_x.dtype),
      "x_in": zeros_x,
      "g_in": zeros_x,
      "chunk_grads": jax.tree.map(jnp.zeros_like, self.chunks),
      "head_grads": jax.tree.map(jnp.zeros_like, self.head_params),
      "dx_M": jnp.zeros_like(self.x_MxBxLxD),
      "unit_stats": zeros(unit_stats_shape),
      "head_stats": zeros(head_stats_shape),
    }


def _run_local(sched: Schedule, chunk_fn, head_fn, chunks, head_params, x_MxBxLxD, side, keys):
  """One stage's view of `run`: `chunks` holds this stage's R chunks, [R * C, ...]."""
  stage = _Stage(sched, chunk_fn, head_fn, chunks, head_params, x_MxBxLxD, side, keys, jax.lax.axis_index("stage"))
  carry, _ = jax.lax.scan(stage.tick, stage.initial_carry(), jnp.arange(sched.ticks))
  # Each gradient and statistic outside the stages was made on one stage, zeros elsewhere: sum over `stage`.
  head_grads = jax.lax.psum(carry["head_grads"], "stage")
  # In fp32: XLA:CPU's AllReducePromotion aborts on a bf16 all-reduce made here ("Invalid binary instruction").
  dx_M = jax.lax.psum(carry["dx_M"].astype(jnp.float32), "stage").astype(x_MxBxLxD.dtype)
  head_stats = jax.lax.psum(carry["head_stats"], "stage")
  return carry["chunk_grads"], head_grads, dx_M, carry["unit_stats"], head_stats


def _zero_head(head_fn):
  """A stand-in for `head_fn` on chunks that are not the last: zero loss and zero statistics."""

  def zero(p, hp, y, side):
    loss_shape, stats_shape = jax.eval_shape(head_fn, p, hp, y, side)
    return jnp.zeros(loss_shape.shape, loss_shape.dtype), jax.tree.map(
      lambda a: jnp.zeros(a.shape, a.dtype), stats_shape
    )

  return zero


def plan_entry(cfg, mesh_shape: dict[str, int], batch_spec: PartitionSpec, model_cfg):
  """The schedule of a pipelined run and its plan entry; (None, None) when mesh.stage is 1. The layout was
  checked by settings.validate.validate_layout."""
  stages, p = mesh_shape["stage"], cfg.pipeline
  if stages == 1:
    return None, None
  schedule = make_schedule(p.schedule, stages, p.microbatches, p.repeats)
  # One microbatch's [B, L, D] activation on one device: B split over the batch's mesh axes.
  shards = math.prod(mesh_shape[a] for a in entry_axes(batch_spec[0]))
  rows = cfg.train.global_batch_size // (cfg.train.grad_accum * p.microbatches * shards)
  activation = rows * cfg.data.seq_len * model_cfg.d_model * jnp.dtype(model_cfg.dtype).itemsize
  plan = {
    "schedule": p.schedule,
    "stages": stages,
    "microbatches": p.microbatches,
    "repeats": p.repeats,
    "bubble_fraction": schedule.bubble_fraction,
    # The pipeline's own buffers: stashed chunk inputs and gradients in flight (peak counts from the table).
    "activation_bytes_per_device": (schedule.stash_slots + schedule.grad_slots) * activation,
  }
  _log.info(
    "pipeline: %s schedule, %d stages x %d microbatches x %d repeats, bubble %.1f%%, %.3g MiB of pipeline "
    "activations per device",
    *(schedule.name, stages, p.microbatches, p.repeats, 100 * schedule.bubble_fraction),
    plan["activation_bytes_per_device"] / 2**20,
  )
  return schedule, plan


@dataclasses.dataclass(frozen=True)
class Pipelined:
  """What the train step needs to run the layer stack as a pipeline over the mesh's `stage` axis."""

  schedule: Schedule
  mesh: Mesh
  model_cfg: object  # model.ModelConfig (this package reaches the model through its graphdefs only)
  head_graphdef: object  # the model as the last stage's head runs it: its rules are rules.stage_head_rules


def pipeline_grads(
  graphdef,
  pipelined: Pipelined,
  params: dict,
  batch: dict,
  key,
  *,
  total_tokens,
  z_loss_weight: float,
  aux_loss_weights: dict[str, float],
  microbatches_per_step: int,
  dropout: bool,
):
  """Gradients and statistics of one accumulation microbatch, like `jax.grad(objective)`, through the pipeline.

  The embedding runs before the pipeline and the final norm, LM head and loss inside it on the last stage;
  both are replicated over `stage` (their weights are small next to the stack's, and the tied embedding
  then needs no transfer between the first and last stage): the embedding's gradient is one `jax.vjp`
  around the pipeline, fed the gradient of the first chunk's input.
  """
  cfg, sched = pipelined.model_cfg, pipelined.schedule
  stages, repeats, m_count = sched.stages, sched.repeats, sched.microbatches
  units = jax.tree.leaves(params["blocks"])[0].shape[0]
  rest = {name: value for name, value in params.items() if name != "blocks"}
  side_fields = {k: batch[k] for k in ("positions", "segment_ids", "targets", "loss_mask")}
  side = microbatches(side_fields, m_count, cfg.rules)

  def assemble(rest, blocks, graphdef=graphdef):
    return nnx.merge(graphdef, nnx.State({**rest, "blocks": blocks}))

  embed_key, unit_keys_MxX = None, None
  if dropout:
    embed_key, layers_key = jax.random.split(key)
    unit_keys_MxX = jax.random.split(layers_key, (m_count, units))
    unit_keys_MxX = jax.vmap(lambda k: to_stage_major(k, stages, repeats))(unit_keys_MxX)

  def embed(rest):
    x_BxLxD = assemble(rest, params["blocks"]).embed(batch["inputs"], batch["positions"], embed_key)
    return microbatches({"x": x_BxLxD}, m_count, cfg.rules, extra=("embed",))["x"]

  x_MxBxLxD, embed_pullback = jax.vjp(embed, rest)

  def chunk_fn(blocks, rest, x_BxLxD, side, keys):
    model = assemble(rest, blocks)
    y_BxLxD, aux_C = model.run_units(x_BxLxD, side["positions"], side["segment_ids"], keys)
    # Each MoE layer's share of the step's auxiliary loss: stage=1 averages over layers and microbatches.
    loss = sum((w * jnp.sum(aux_C[name]) for name, w in aux_loss_weights.items()), jnp.zeros((), jnp.float32))
    return y_BxLxD, loss / (units * microbatches_per_step), aux_C

  def head_fn(blocks, rest, y_BxLxD, side):
    model = assemble(rest, blocks, pipelined.head_graphdef)
    nll_sum, z_sum, _ = model.head_sums(model.final_norm(y_BxLxD), side["targets"], side["loss_mask"])
    return (nll_sum + z_loss_weight * z_sum) / total_tokens, {"nll_sum": nll_sum, "z_sum": z_sum}

  chunks = to_stage_major(params["blocks"], stages, repeats)
  d_chunks, d_head, dx_MxBxLxD, unit_stats, head_stats = run(
    sched, pipelined.mesh, chunk_fn, head_fn, chunks, rest, x_MxBxLxD, side, unit_keys_MxX
  )
  (d_embed,) = embed_pullback(dx_MxBxLxD)
  grads = {**jax.tree.map(jnp.add, d_head, d_embed), "blocks": from_stage_major(d_chunks, stages, repeats)}
  unit_stats = from_stage_major(unit_stats, stages, repeats)
  # As the stage=1 objective reports them for this accumulation microbatch: MoE scalars averaged over layers,
  # per-layer arrays kept, both averaged over the pipeline's microbatches.
  stats = {name: (v.mean(0) if v.ndim == 1 else v) / m_count for name, v in unit_stats.items()}
  return grads, {**head_stats, **stats}
