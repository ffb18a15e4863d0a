"""Context parallelism: each sequence split over the `context` mesh axis (config `mesh.context`).

Activations carry the logical axis `length`, which the rules map to `context`; parameters are laid out as before.
Everything but attention works on its own tokens. Attention needs every earlier key of the sequence, which
`model.context_parallel` brings in one of two ways, both inside `shard_map` over the whole mesh (inside the
pipeline's stages, over every axis but the already manual `stage`):
- `all_gather`: each device gathers the keys and values (and their segment ids and positions) of the whole
  sequence and runs the local kernel (`model.attention`: xla, chunked or cudnn) on its own queries. One
  collective per layer and K/V of the whole sequence on every device (bytes L x K x H x 2 per layer).
- `ring`: the key/value chunks travel round the ring (`ppermute`), C steps for C devices; each step merges one
  chunk into the queries' online softmax (the chunked kernel's block math, `model.attend.online_softmax`),
  and the next chunk's transfer is issued before this chunk's compute so XLA can overlap them. The backward sends
  the chunks round again with their dk and dv accumulating. K/V memory stays one chunk per device.

Load balance. A causal mask gives the last queries of a sequence the most keys. The sequence is cut into 2C
chunks and device d holds chunks d and 2C-1-d (`balanced_order`): every device then holds one early and one late
chunk, and attends the same number of (query chunk, key chunk) pairs (`attended_chunk_pairs`). The batch (tokens,
positions, segment ids, targets, loss mask: every [B, L, ...] array) is permuted once per step (`balance`); masks
come from positions and segment ids, never from indices, and the loss is a sum over tokens, so the result is one
device's. The ring skips (`lax.cond`) each (query chunk, key chunk) pair in which no query may attend any key, read
from the ids themselves: exact for any positions, and for packed rows (causality by index) it is exactly the
pairs above the diagonal, balanced by the layout.

Not here: splash takes causality from indices, which the permuted layout breaks (settings refuse it; `auto`
stands for chunked on TPU under context > 1). The ring runs its own block math whatever `model.attention` says:
cudnn and splash return no log-sum-exp for the merge. Decoding (a KV cache) never splits its sequence.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from model import attend as attend_lib
from parallel.rules import logical_to_spec

STRATEGIES = ("all_gather", "ring")
AXIS = "context"


def size() -> int:
  """Devices along `context` in the mesh of JAX's context (1 without a mesh, or a mesh without the axis)."""
  mesh = jax.sharding.get_abstract_mesh()
  return 1 if mesh.empty else dict(mesh.shape).get(AXIS, 1)


def balanced_order(length: int, devices: int) -> np.ndarray:
  """Token indices of the load-balanced layout: position j of the permuted sequence holds token order[j]. The
  sequence is cut into 2 x `devices` chunks; device d's share (the d-th 1/devices of the permuted sequence) is
  chunk d followed by chunk 2 x devices - 1 - d."""
  assert length % (2 * devices) == 0, f"{length} tokens do not cut into 2 x {devices} chunks"
  chunks = np.arange(length).reshape(2, devices, length // (2 * devices))
  return np.stack([chunks[0], chunks[1, ::-1]], axis=1).reshape(length)


def balance(batch: dict, devices: int) -> dict:
  """Every [B, L, ...] array of the batch (L the length of `inputs`) in the `balanced_order` of its L axis; the
  rest as is. A reshape, a reversal and a transpose: no gather."""
  if devices == 1:
    return batch
  length = batch["inputs"].shape[1]

  def one(x):
    if x.ndim < 2 or x.shape[1] != length:
      return x
    b, rest = x.shape[0], x.shape[2:]
    x_Bx2xCxM = x.reshape(b, 2, devices, length // (2 * devices), *rest)
    x_BxCx2xM = jnp.stack([x_Bx2xCxM[:, 0], jnp.flip(x_Bx2xCxM[:, 1], axis=1)], axis=2)
    return x_BxCx2xM.reshape(x.shape)

  return jax.tree.map(one, batch)


def attended_chunk_pairs(length: int, devices: int, order: np.ndarray | None = None) -> np.ndarray:
  """[devices] (query chunk, key chunk) pairs with at least one attended key that each device computes, counted
  from the causal mask of one packed row of `length` tokens (key index <= query index) in the layout `order`
  (default `balanced_order`); chunks are the 2 x `devices` pieces of the permuted sequence, as the ring cuts
  them."""
  order = balanced_order(length, devices) if order is None else order
  chunk = length // (2 * devices)
  causal_LxL = order[:, None] >= order[None, :]  # query at permuted index l may see key at permuted index s
  pairs_QxK = causal_LxL.reshape(2 * devices, chunk, 2 * devices, chunk).any(axis=(1, 3))
  return pairs_QxK.reshape(devices, 2, 2 * devices).sum(axis=(1, 2))


def resolve(impl: str, platform: str, length: int, dtype, devices: int, strategy: str) -> str:
  """The kernel that computes attention on each device: `model.attend.resolve`'s with the sequence whole
  (`devices` = 1); under context > 1 the ring's own block math (chunked's) or, for all_gather, the local kernel
  with chunked for `auto`'s splash (splash takes causality from indices; settings refuse an explicit one)."""
  resolved = attend_lib.resolve(impl, platform, length, dtype)
  if devices == 1:
    return resolved
  return "chunked" if strategy == "ring" or resolved == "splash" else resolved


def attend(
  q_BxLxNxH: jax.Array,
  k_BxLxKxH: jax.Array,
  v_BxLxKxH: jax.Array,
  *,
  segment_ids_BxL: jax.Array,
  positions_BxL: jax.Array,
  strategy: str,
  impl: str,
  block: int,
  sliding_window: int,
  rules,
  platform: str,
) -> jax.Array:
  """Self-attention of a sequence split over `context` (module docstring): what `model.attend.attend` computes on
  one device, on the mesh of JAX's context. `rules` lay out the inputs (batch, length, heads) on that mesh.

  Inside the pipeline's stages (parallel/pipeline.py) `stage` is already manual: the shard_map here makes the other
  axes manual, and the ring passes its chunks by all-gather (`_pass_on`)."""
  mesh = jax.sharding.get_abstract_mesh()
  devices = dict(mesh.shape)[AXIS]
  outer_manual = frozenset(mesh.manual_axes)
  q_spec = logical_to_spec(("batch", "length", "heads", None), rules, mesh)
  kv_spec = logical_to_spec(("batch", "length", "kv_heads", None), rules, mesh)
  ids_spec = logical_to_spec(("batch", "length"), rules, mesh)
  assert ids_spec[1] == AXIS, f"length must map to {AXIS} alone (settings.validate checks it), got {ids_spec}"
  scale = q_BxLxNxH.shape[-1] ** -0.5
  if strategy == "ring":
    per_device = functools.partial(
      _ring,
      devices=devices,
      block=block,
      scale=scale,
      window=sliding_window,
      platform=platform,
      in_branch=bool(outer_manual),
    )
  else:
    assert strategy == "all_gather", strategy
    impl = resolve(impl, platform, q_BxLxNxH.shape[1], q_BxLxNxH.dtype, devices, strategy)
    per_device = functools.partial(_gathered, impl=impl, block=block, window=sliding_window, platform=platform)
  # check_vma=False: the custom backward of the ring and the kernels inside do not declare how their values vary
  # over the mesh axes; every input and output is split as its spec says.
  per_device = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec),
    out_specs=q_spec,
    axis_names=frozenset(mesh.axis_names) - outer_manual,
    check_vma=False,
  )
  return per_device(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, segment_ids_BxL, positions_BxL)


def _gathered(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg_BxL, pos_BxL, *, impl, block, window, platform):
  """One device's queries against the whole sequence's keys, gathered over `context`: the local kernel."""
  gather = functools.partial(jax.lax.all_gather, axis_name=AXIS, axis=1, tiled=True)
  return attend_lib.attend(
    q_BxLxNxH,
    gather(k_BxLxKxH),
    gather(v_BxLxKxH),
    q_segment_ids_BxL=seg_BxL,
    kv_segment_ids_BxS=gather(seg_BxL),
    q_positions_BxL=pos_BxL,
    kv_positions_BxS=gather(pos_BxL),
    impl=impl,
    block=block,
    sliding_window=window,
    platform=platform,
  )


def _halves(x):
  """A device's share [B, 2M, ...] as its two chunks, stacked: [2, B, M, ...] (the early one, the late one)."""
  b, two_m = x.shape[:2]
  return jnp.moveaxis(x.reshape(b, 2, two_m // 2, *x.shape[2:]), 1, 0)


def _whole(x_2xBxMx___):
  """The inverse of `_halves`: [2, B, M, ...] -> [B, 2M, ...]."""
  x = jnp.moveaxis(x_2xBxMx___, 0, 1)
  return x.reshape(x.shape[0], -1, *x.shape[3:])


def _pass_on(tree, devices: int, in_branch: bool):
  """Each device's arrays to the next device of the ring (device d receives d - 1's).

  `in_branch`: the ring runs inside the pipeline's `lax.switch`, whose stages take different branches at the same
  tick. XLA runs a collective-permute as one rendezvous of every device of the program, so one there waits forever
  for the other stages; an all-gather's groups are this stage's `context` devices alone. Each device gathers the
  C chunks and keeps d - 1's: C - 1 chunks received where the permute receives one (the same for C = 2), and C
  chunks held for the moment of the transfer."""
  if in_branch:
    source = (jax.lax.axis_index(AXIS) - 1) % devices
    return jax.tree.map(lambda x: jax.lax.all_gather(x, AXIS)[source], tree)
  ring = [(d, (d + 1) % devices) for d in range(devices)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, AXIS, ring), tree)


# The (query chunk, key chunk) pairs of one ring step: each device holds two chunks of queries and receives two of
# keys. One loop over them, and one over the ring's steps: the program holds one pair's code, whatever the ring.
_PAIRS = np.array([(a, c) for a in range(2) for c in range(2)], np.int32)


def _pair_ids(q_ids, kv_ids, a, c):
  """(q segment ids, kv segment ids, q positions, kv positions) of query chunk a and key chunk c."""
  (q_seg_2xBxM, q_pos_2xBxM), (kv_seg_2xBxM, kv_pos_2xBxM) = q_ids, kv_ids
  return q_seg_2xBxM[a], kv_seg_2xBxM[c], q_pos_2xBxM[a], kv_pos_2xBxM[c]


def _tied_ids(ids, carry):
  """A pair's ids tied to the loop's carry (`model.attend._tied`): ids alone are what differentiation treats as
  known, so JAX's partial evaluation would otherwise split the ring into an ids-only loop run ahead and keep that
  loop's every per-pair value (masks, and score-sized fills of -inf and 0): 3.4 GiB at seq 16k on 8 devices."""
  return attend_lib._tied(ids, carry)


def _any_allowed(ids, window: int) -> jax.Array:
  """Whether any query of one chunk may attend any key of another (on this device's rows)."""
  return jnp.any(attend_lib._allowed(*ids, window))


def _ring_steps(visit, carry, travelling, devices: int, in_branch: bool):
  """`carry = visit(carry, travelling)` for each of the ring's chunks in turn: the chunk for the next step is
  sent on before this one is visited (nothing in the visit waits for it), so XLA may overlap the two."""

  def step(state, _):
    carry, travelling = state
    arriving = _pass_on(travelling, devices, in_branch)
    return (visit(carry, travelling), arriving), None

  (carry, travelling), _ = jax.lax.scan(step, (carry, travelling), None, length=devices - 1)
  return visit(carry, travelling)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _ring(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg_BxL, pos_BxL, devices, block, scale, window, platform, in_branch):
  args = (devices, block, scale, window, platform, in_branch)
  return _ring_fwd(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg_BxL, pos_BxL, *args)[0]


def _ring_fwd(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg_BxL, pos_BxL, devices, block, scale, window, platform, in_branch):
  q_2xBxMxKxGxH = _halves(attend_lib._group(q_BxLxNxH, k_BxLxKxH.shape[2]))
  q_ids = (_halves(seg_BxL), _halves(pos_BxL))
  softmax = functools.partial(attend_lib.online_softmax, block=block, scale=scale, window=window)

  def visit(carries, travelling):
    travelling, carries = attend_lib._tied(travelling, carries)  # see `_tied_ids`
    k_2xBxMxKxH, v_2xBxMxKxH, seg_2xBxM, pos_2xBxM = map(_halves, travelling)

    def pair(carries, ac):
      a, c = ac[0], ac[1]
      ids, carries = _tied_ids(_pair_ids(q_ids, (seg_2xBxM, pos_2xBxM), a, c), carries)
      carry = jax.tree.map(lambda x: x[a], carries)
      carry = jax.lax.cond(
        _any_allowed(ids, window),
        lambda carry: softmax(q_2xBxMxKxGxH[a], k_2xBxMxKxH[c], v_2xBxMxKxH[c], ids, carry),
        lambda carry: carry,
        carry,
      )
      return jax.tree.map(lambda x, y: x.at[a].set(y), carries, carry), None

    return jax.lax.scan(pair, carries, _PAIRS)[0]

  start = attend_lib.softmax_start(q_2xBxMxKxGxH[0])
  carries = jax.tree.map(lambda x: jnp.stack([x, x]), start)
  carries = _ring_steps(visit, carries, (k_BxLxKxH, v_BxLxKxH, seg_BxL, pos_BxL), devices, in_branch)
  out_2xBxMxNxH, lse_2xBxKxGxM = jax.vmap(lambda c: attend_lib.softmax_finish(c, q_BxLxNxH.dtype))(carries)
  out_BxLxNxH = _whole(out_2xBxMxNxH)
  return out_BxLxNxH, (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, out_BxLxNxH, seg_BxL, pos_BxL, lse_2xBxKxGxM)


def _ring_bwd(devices, block, scale, window, platform, in_branch, kept, dout_BxLxNxH):
  q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, out_BxLxNxH, seg_BxL, pos_BxL, lse_2xBxKxGxM = kept
  group = functools.partial(attend_lib._group, kv_heads=k_BxLxKxH.shape[2])
  q_2xBxMxKxGxH, dout_2xBxMxKxGxH = _halves(group(q_BxLxNxH)), _halves(group(dout_BxLxNxH))
  d_2xBxKxGxM = jax.vmap(attend_lib.softmax_correction)(dout_2xBxMxKxGxH, _halves(group(out_BxLxNxH)))
  q_ids = (_halves(seg_BxL), _halves(pos_BxL))
  grads = functools.partial(attend_lib.softmax_grads, block=block, scale=scale, window=window)

  def visit(carry, travelling):
    """This chunk's share of every gradient; its dk and dv travel with it (after `devices` passes, home)."""
    travelling, (dq_2xBxMxKxGxH, dkv) = attend_lib._tied(travelling, carry)
    k_2xBxMxKxH, v_2xBxMxKxH, seg_2xBxM, pos_2xBxM = map(_halves, travelling)

    def pair(grads_so_far, ac):
      a, c = ac[0], ac[1]
      ids, grads_so_far = _tied_ids(_pair_ids(q_ids, (seg_2xBxM, pos_2xBxM), a, c), grads_so_far)
      dq_2xBxMxKxGxH, dk_2xBxMxKxH, dv_2xBxMxKxH = grads_so_far

      def compute(_):
        args = (q_2xBxMxKxGxH[a], dout_2xBxMxKxGxH[a], d_2xBxKxGxM[a], lse_2xBxKxGxM[a])
        return grads(*args, k_2xBxMxKxH[c], v_2xBxMxKxH[c], ids)

      def skip(_):
        zeros = jnp.zeros(k_2xBxMxKxH.shape[1:], jnp.float32)
        return jnp.zeros(q_2xBxMxKxGxH.shape[1:], jnp.float32), zeros, zeros

      dq, dk, dv = jax.lax.cond(_any_allowed(ids, window), compute, skip, None)
      return (dq_2xBxMxKxGxH.at[a].add(dq), dk_2xBxMxKxH.at[c].add(dk), dv_2xBxMxKxH.at[c].add(dv)), None

    dq_2xBxMxKxGxH, dk_2xBxMxKxH, dv_2xBxMxKxH = jax.lax.scan(pair, (dq_2xBxMxKxGxH, *map(_halves, dkv)), _PAIRS)[0]
    return dq_2xBxMxKxGxH, _pass_on((_whole(dk_2xBxMxKxH), _whole(dv_2xBxMxKxH)), devices, in_branch)

  dkv = (jnp.zeros(k_BxLxKxH.shape, jnp.float32), jnp.zeros(v_BxLxKxH.shape, jnp.float32))
  carry = (jnp.zeros(q_2xBxMxKxGxH.shape, jnp.float32), dkv)
  dq_2xBxMxKxGxH, (dk_BxLxKxH, dv_BxLxKxH) = _ring_steps(
    visit, carry, (k_BxLxKxH, v_BxLxKxH, seg_BxL, pos_BxL), devices, in_branch
  )
  dq_BxLxNxH = _whole(dq_2xBxMxKxGxH).reshape(q_BxLxNxH.shape).astype(q_BxLxNxH.dtype)
  return dq_BxLxNxH, dk_BxLxKxH.astype(k_BxLxKxH.dtype), dv_BxLxKxH.astype(v_BxLxKxH.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
