"""Pipeline schedules as tables: which stage runs which chunk of which microbatch, forward or backward, at each tick.

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
The runner that executes a table inside the jitted step is parallel/pipeline.py.
"""

import dataclasses

import jax
import numpy as np

SCHEDULES = ("gpipe", "circular", "1f1b")
IDLE, FORWARD, BACKWARD = 0, 1, 2
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
