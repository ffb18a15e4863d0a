"""Pipeline parallelism: schedules as tables, and one runner that executes any table inside the jitted step.

Shape letters (as in model/, where S is the key length; here S is stages): T ticks, S stages, M microbatches,
R repeats (chunks per stage), C units per chunk, X units in the stack, K buffer slots, B batch (of one
microbatch), L length, D model dim.

The stack of X units is cut into S * R chunks of C units. Chunk k = r * S + s lives on stage s as its r-th
repeat, so with R > 1 (circular) each stage holds R non-contiguous chunks and a microbatch goes round the ring
of stages R times. A schedule is a table of ticks x stages: at each tick a stage idles, runs one chunk forward
for one microbatch, or runs one chunk backward for one microbatch (every action takes one tick). The table is
built by playing each stage's program (its ordered list of actions: all forwards then all backwards for gpipe
and circular, one forward and one backward alternating for 1f1b) against the data dependencies, with a
message sent at tick t usable at tick t + 1. The same pass assigns buffer slots: an activation stays in its
stage's stash from its arrival to its backward, a gradient from its arrival to its use; the number of slots
is the schedule's activation memory.

The runner (`run`) is a `lax.scan` over ticks inside `jax.shard_map` over the `stage` mesh axis (the data,
fsdp, expert and tensor axes stay automatic inside). At every tick each stage reads its row of the table,
stores the activation and gradient that arrived, runs its action under `lax.switch`, and passes activations
to stage s + 1 and gradients to stage s - 1 with `lax.ppermute` (a ring, so circular's last stage feeds stage
0). The backward of a chunk is `jax.vjp` of that chunk's forward, recomputed from the stashed input (so a
stash slot holds one [B, L, D] input, not every intermediate of the chunk); the last chunk's backward also
runs the head and loss, so its gradient starts there. No autodiff runs through the tick loop.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from parallel import rules as sharding_rules

SCHEDULES = ("gpipe", "circular", "1f1b")
IDLE, FORWARD, BACKWARD = 0, 1, 2
# Inside the stages the logits keep their whole vocabulary: XLA's SPMD partitioner (jax 0.10.2) aborts on the
# loss's target-logit gather over a vocab-sharded axis inside a partly manual shard_map (a CHECK failure in
# ExpandDeviceGroupsWithIota). With tensor > 1 this costs one all-gather of each microbatch's logits.
_RULES_INSIDE = {"vocab": ()}
_COLUMNS = ("op", "microbatch", "repeat", "x_slot", "g_slot", "recv_x_slot", "recv_g_slot")


@dataclasses.dataclass(frozen=True)
class Schedule:
  """A pipeline schedule as a table. Each column is an int32 array [T, S]:

  op: IDLE, FORWARD or BACKWARD; microbatch, repeat: which microbatch and which of the stage's chunks;
  x_slot: the stash slot holding the chunk's input (read by forward and backward);
  g_slot: the slot holding the gradient of the chunk's output (backward; the last chunk's comes from the loss);
  recv_x_slot, recv_g_slot: where this tick's incoming activation and gradient are stored.
  Slot index `stash_slots` (`grad_slots`) is a scratch slot for "nothing to keep".
  """

  name: str
  stages: int
  microbatches: int
  repeats: int
  table: dict[str, np.ndarray]
  stash_slots: int  # peak activations (chunk inputs) one stage keeps
  grad_slots: int  # peak gradients in flight one stage keeps

  @property
  def ticks(self) -> int:
    return self.table["op"].shape[0]

  @property
  def bubble_fraction(self) -> float:
    """Fraction of stage-ticks spent idle."""
    return float(np.mean(self.table["op"] == IDLE))


def bubble_formula(schedule: str, stages: int, microbatches: int, repeats: int = 1) -> float:
  """The textbook bubble: (S - 1) / (M + S - 1) for gpipe and 1f1b, (S - 1) / (R * M + S - 1) for circular."""
  work = microbatches * (repeats if schedule == "circular" else 1)
  return (stages - 1) / (work + stages - 1)


def _programs(name: str, stages: int, microbatches: int, repeats: int) -> list[list[tuple[int, int, int]]]:
  """Each stage's actions in order, as (op, microbatch, repeat)."""
  m_count = microbatches
  programs = []
  for s in range(stages):
    if name == "1f1b":
      warmup = min(stages - 1 - s, m_count)
      prog = [(FORWARD, m, 0) for m in range(warmup)]
      for i in range(m_count - warmup):
        prog += [(FORWARD, warmup + i, 0), (BACKWARD, i, 0)]
      prog += [(BACKWARD, m, 0) for m in range(m_count - warmup, m_count)]
    else:  # gpipe (R = 1) and circular: every forward, repeat by repeat, then every backward in reverse
      prog = [(FORWARD, m, r) for r in range(repeats) for m in range(m_count)]
      prog += [(BACKWARD, m, r) for r in reversed(range(repeats)) for m in range(m_count)]
    programs.append(prog)
  return programs


def _dependency(op: int, m: int, r: int, s: int, stages: int, repeats: int):
  """The action (stage, op, microbatch, repeat) whose result this one needs, or None."""
  last_chunk = s == stages - 1 and r == repeats - 1
  if op == FORWARD:
    if s > 0:
      return (s - 1, FORWARD, m, r)
    return (stages - 1, FORWARD, m, r - 1) if r > 0 else None
  if last_chunk:  # the loss: needs only this chunk's own forward (its input is stashed)
    return (s, FORWARD, m, r)
  if s < stages - 1:
    return (s + 1, BACKWARD, m, r)
  return (0, BACKWARD, m, r + 1)


def _allocate(intervals: dict) -> tuple[dict, int]:
  """Slots for live intervals {key: (first tick, last tick)}; a slot is reused only after its last reader."""
  slots, free_at = {}, []  # free_at[k]: last tick slot k is in use
  for key, (start, end) in sorted(intervals.items(), key=lambda kv: kv[1]):
    k = next((k for k, busy in enumerate(free_at) if busy < start), len(free_at))
    if k == len(free_at):
      free_at.append(end)
    free_at[k] = end
    slots[key] = k
  return slots, len(free_at)


def make_schedule(name: str, stages: int, microbatches: int, repeats: int = 1) -> Schedule:
  """Builds the table of `name` (gpipe | circular | 1f1b) for S stages, M microbatches and R repeats."""
  assert name in SCHEDULES, name
  assert name == "circular" or repeats == 1, "only the circular schedule has repeats"
  programs = _programs(name, stages, microbatches, repeats)
  done: dict[tuple, int] = {}  # (stage, op, m, r) -> tick it ran
  rows = []
  position = [0] * stages
  while any(position[s] < len(programs[s]) for s in range(stages)):
    t = len(rows)
    row = [None] * stages
    for s in range(stages):
      if position[s] == len(programs[s]):
        continue
      op, m, r = programs[s][position[s]]
      dep = _dependency(op, m, r, s, stages, repeats)
      if dep is None or done.get(dep, t) < t:
        row[s] = (op, m, r)
    for s, action in enumerate(row):
      if action is not None:
        done[(s, *action)] = t
        position[s] += 1
    rows.append(row)
    assert t < 4 * stages * microbatches * repeats + 4 * stages, "schedule does not progress"

  # Buffer lifetimes per stage: activation of (m, r) from its arrival to its backward, gradient likewise.
  x_life = [{} for _ in range(stages)]
  g_life = [{} for _ in range(stages)]
  for (s, op, m, r), t in done.items():
    if op == FORWARD:
      arrival = t if s == 0 and r == 0 else done[_dependency(op, m, r, s, stages, repeats)] + 1
      x_life[s][m, r] = (arrival, done[(s, BACKWARD, m, r)])
    elif not (s == stages - 1 and r == repeats - 1):
      g_life[s][m, r] = (done[_dependency(op, m, r, s, stages, repeats)] + 1, t)
  x_slots, x_counts = zip(*(_allocate(life) for life in x_life))
  g_slots, g_counts = zip(*(_allocate(life) for life in g_life))
  stash_slots, grad_slots = max(x_counts), max(g_counts)

  ticks = len(rows)
  table = {c: np.zeros((ticks, stages), np.int32) for c in _COLUMNS}
  table["x_slot"][:] = stash_slots
  table["recv_x_slot"][:] = stash_slots
  table["g_slot"][:] = grad_slots
  table["recv_g_slot"][:] = grad_slots
  for t, row in enumerate(rows):
    for s, action in enumerate(row):
      if action is None:
        continue
      op, m, r = action
      table["op"][t, s], table["microbatch"][t, s], table["repeat"][t, s] = op, m, r
      table["x_slot"][t, s] = x_slots[s][m, r]
      if op == BACKWARD and (m, r) in g_life[s]:
        table["g_slot"][t, s] = g_slots[s][m, r]
  for s in range(stages):
    for (m, r), (arrival, _) in x_life[s].items():
      if not (s == 0 and r == 0):  # those come from the embedding at the forward's own tick
        table["recv_x_slot"][arrival, s] = x_slots[s][m, r]
    for (m, r), (arrival, _) in g_life[s].items():
      table["recv_g_slot"][arrival, s] = g_slots[s][m, r]
  return Schedule(name, stages, microbatches, repeats, table, stash_slots, grad_slots)


def to_stage_major(tree, stages: int, repeats: int):
  """Reorders the stacked unit axis from layer order (chunk k = r * S + s) to stage order (stage s's R chunks
  together), so that splitting it evenly over `stage` gives each stage its chunks. Identity when R = 1."""

  def one(x_X):
    x = x_X.reshape(repeats, stages, -1, *x_X.shape[1:]).swapaxes(0, 1)
    return x.reshape(x_X.shape)

  return tree if repeats == 1 else jax.tree.map(one, tree)


def from_stage_major(tree, stages: int, repeats: int):
  """The inverse of `to_stage_major`."""

  def one(x_X):
    x = x_X.reshape(stages, repeats, -1, *x_X.shape[1:]).swapaxes(0, 1)
    return x.reshape(x_X.shape)

  return tree if repeats == 1 else jax.tree.map(one, tree)


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
  rules = sharding_rules.active_rules()

  def body(chunks, head_params, x_MxBxLxD, side, keys):
    # Inside, `stage` is manual: activation constraints must name the mesh as the tracer sees it.
    with sharding_rules.activate(jax.sharding.get_abstract_mesh(), {**rules, **_RULES_INSIDE}):
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


def _run_local(sched: Schedule, chunk_fn, head_fn, chunks, head_params, x_MxBxLxD, side, keys):
  """One stage's view of `run`: `chunks` holds this stage's R chunks, [R * C, ...]."""
  s_count, r_count = sched.stages, sched.repeats
  stage = jax.lax.axis_index("stage")
  units = jax.tree.leaves(chunks)[0].shape[0]
  c_units = units // r_count
  row_TxS = {c: jnp.asarray(v) for c, v in sched.table.items()}
  x_shape, x_dtype = x_MxBxLxD.shape[1:], x_MxBxLxD.dtype
  zeros_x = jnp.zeros(x_shape, x_dtype)

  def take_chunk(tree, r):
    return jax.tree.map(lambda a: jax.lax.dynamic_slice_in_dim(a, r * c_units, c_units), tree)

  def add_chunk(total, part, r):
    def one(a, b):
      current = jax.lax.dynamic_slice_in_dim(a, r * c_units, c_units)
      return jax.lax.dynamic_update_slice_in_dim(a, current + b.astype(a.dtype), r * c_units, 0)

    return jax.tree.map(one, total, part)

  def micro(m):
    return jax.tree.map(lambda a: a[m], side), (None if keys is None else keys[m])

  def chunk_keys(keys_X, r):
    return None if keys_X is None else jax.lax.dynamic_slice_in_dim(keys_X, r * c_units, c_units)

  def is_last(r):
    return (stage == s_count - 1) & (r == r_count - 1)

  def forward(carry, m, r, x_slot, g_slot):
    side_m, keys_m = micro(m)
    x = carry["stash"][x_slot]
    y, _, _ = chunk_fn(take_chunk(chunks, r), head_params, x, side_m, chunk_keys(keys_m, r))
    return carry, y.astype(x_dtype), zeros_x

  def backward(carry, m, r, x_slot, g_slot):
    side_m, keys_m = micro(m)
    last = is_last(r)

    def objective(p, hp, x):
      y, loss, stats = chunk_fn(p, hp, x, side_m, chunk_keys(keys_m, r))
      head_loss, head_stats = jax.lax.cond(last, head_fn, _zero_head(head_fn), p, hp, y, side_m)
      return (y, loss + head_loss), (stats, head_stats)

    (y, _), pullback, (stats, head_stats) = jax.vjp(
      objective, take_chunk(chunks, r), head_params, carry["stash"][x_slot], has_aux=True
    )
    dy = jnp.where(last, jnp.zeros_like(y), carry["grads_in"][g_slot].astype(y.dtype))
    d_chunk, d_head, dx = pullback((dy, jnp.ones((), jnp.float32)))
    carry = dict(carry)
    carry["chunk_grads"] = add_chunk(carry["chunk_grads"], d_chunk, r)
    carry["head_grads"] = jax.tree.map(jnp.add, carry["head_grads"], d_head)
    carry["unit_stats"] = add_chunk(carry["unit_stats"], stats, r)
    carry["head_stats"] = jax.tree.map(jnp.add, carry["head_stats"], head_stats)
    first = (stage == 0) & (r == 0)
    carry["dx_M"] = carry["dx_M"].at[m].add(jnp.where(first, dx, jnp.zeros_like(dx)).astype(x_dtype))
    return carry, zeros_x, dx.astype(x_dtype)

  def idle(carry, m, r, x_slot, g_slot):
    return carry, zeros_x, zeros_x

  def tick(carry, t):
    row = {c: v[t, stage] for c, v in row_TxS.items()}
    m, r = row["microbatch"], row["repeat"]
    carry = dict(carry)
    x_in, g_in = carry.pop("x_in"), carry.pop("g_in")
    stash = carry["stash"].at[row["recv_x_slot"]].set(x_in)
    # The first chunk's input is the embedding, written at its forward's own tick.
    from_embedding = (row["op"] == FORWARD) & (stage == 0) & (r == 0)
    stash = stash.at[row["x_slot"]].set(jnp.where(from_embedding, x_MxBxLxD[m], stash[row["x_slot"]]))
    carry["stash"] = stash
    carry["grads_in"] = carry["grads_in"].at[row["recv_g_slot"]].set(g_in)
    # The last chunk's forward has nothing to send: its backward recomputes it together with the loss.
    op = jnp.where((row["op"] == FORWARD) & is_last(r), IDLE, row["op"])
    carry, y, dx = jax.lax.switch(op, (idle, forward, backward), carry, m, r, row["x_slot"], row["g_slot"])
    ring_up = [(s, (s + 1) % s_count) for s in range(s_count)]
    ring_down = [(s, (s - 1) % s_count) for s in range(s_count)]
    carry["x_in"] = jax.lax.ppermute(y, "stage", ring_up)
    carry["g_in"] = jax.lax.ppermute(dx, "stage", ring_down)
    return carry, None

  side_0, keys_0 = micro(0)
  _, _, stats_shape = jax.eval_shape(
    lambda: chunk_fn(take_chunk(chunks, 0), head_params, zeros_x, side_0, chunk_keys(keys_0, 0))
  )
  _, head_stats_shape = jax.eval_shape(lambda: head_fn(take_chunk(chunks, 0), head_params, zeros_x, side_0))
  zeros = lambda shapes: jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), shapes)  # noqa: E731
  unit_stats_shape = jax.tree.map(lambda a: jax.ShapeDtypeStruct((units, *a.shape[1:]), a.dtype), stats_shape)
  carry = {
    "stash": jnp.zeros((sched.stash_slots + 1, *x_shape), x_dtype),  # + 1: the scratch slot
    "grads_in": jnp.zeros((sched.grad_slots + 1, *x_shape), x_dtype),
    "x_in": zeros_x,
    "g_in": zeros_x,
    "chunk_grads": jax.tree.map(jnp.zeros_like, chunks),
    "head_grads": jax.tree.map(jnp.zeros_like, head_params),
    "dx_M": jnp.zeros_like(x_MxBxLxD),
    "unit_stats": zeros(unit_stats_shape),
    "head_stats": zeros(head_stats_shape),
  }
  carry, _ = jax.lax.scan(tick, carry, jnp.arange(sched.ticks))
  # Each gradient and statistic outside the stages was made on one stage, zeros elsewhere: sum over `stage`.
  head_grads = jax.lax.psum(carry["head_grads"], "stage")
  # In fp32: XLA:CPU's AllReducePromotion aborts on a bf16 all-reduce made here ("Invalid binary instruction").
  dx_M = jax.lax.psum(carry["dx_M"].astype(jnp.float32), "stage").astype(x_dtype)
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
