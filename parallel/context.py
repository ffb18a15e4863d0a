"""Context parallelism: each sequence split over the `context` mesh axis (config `mesh.context`).

Activations carry the logical axis `length`, which the rules map to `context`; parameters are laid out as before.
Everything but attention works on its own tokens. Attention needs every earlier key of the sequence, which
`model.context_parallel` brings in one of two ways, both inside `shard_map` over the whole mesh:
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
  one device, on the mesh of JAX's context. `rules` lay out the inputs (batch, length, heads) on that mesh."""
  mesh = jax.sharding.get_abstract_mesh()
  devices = dict(mesh.shape)[AXIS]
  q_spec = logical_to_spec(("batch", "length", "heads", None), rules, mesh)
  kv_spec = logical_to_spec(("batch", "length", "kv_heads", None), rules, mesh)
  ids_spec = logical_to_spec(("batch", "length"), rules, mesh)
  assert ids_spec[1] == AXIS, f"length must map to {AXIS} alone (settings.validate checks it), got {ids_spec}"
  scale = q_BxLxNxH.shape[-1] ** -0.5
  if strategy == "ring":
    per_device = functools.partial(
      _ring, devices=devices, block=block, scale=scale, window=sliding_window, platform=platform
    )
  else:
    assert strategy == "all_gather", strategy
    impl = attend_lib.resolve(impl, platform, q_BxLxNxH.shape[1], q_BxLxNxH.dtype)
    impl = "chunked" if impl == "splash" else impl  # only `auto` gets here with splash: settings refuse it
    per_device = functools.partial(_gathered, impl=impl, block=block, window=sliding_window, platform=platform)
  # check_vma=False: the custom backward of the ring and the kernels inside do not declare how their values vary
  # over the mesh axes; every input and output is split as its spec says.
  per_device = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec),
    out_specs=q_spec,
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
  """A device's share [B, 2M, ...] as its two chunks (the early one, the late one)."""
  m = x.shape[1] // 2
  return x[:, :m], x[:, m:]


def _pass_on(tree, devices: int):
  """Each device's arrays to the next device of the ring (device d receives d - 1's)."""
  ring = [(d, (d + 1) % devices) for d in range(devices)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, AXIS, ring), tree)


def _any_allowed(q_ids, kv_ids, window: int) -> jax.Array:
  """Whether any query of one chunk may attend any key of another (on this device's rows)."""
  (q_seg, q_pos), (kv_seg, kv_pos) = q_ids, kv_ids
  return jnp.any(attend_lib._allowed(q_seg, kv_seg, q_pos, kv_pos, window))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _ring(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg_BxL, pos_BxL, devices, block, scale, window, platform):
  return _ring_fwd(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg_BxL, pos_BxL, devices, block, scale, window, platform)[0]


def _ring_fwd(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, seg_BxL, pos_BxL, devices, block, scale, window, platform):
  kv_heads = k_BxLxKxH.shape[2]
  q_chunks = _halves(attend_lib._group(q_BxLxNxH, kv_heads))
  q_ids = list(zip(_halves(seg_BxL), _halves(pos_BxL)))
  carries = [attend_lib.softmax_start(q) for q in q_chunks]
  travelling = (k_BxLxKxH, v_BxLxKxH, seg_BxL, pos_BxL)
  softmax = functools.partial(attend_lib.online_softmax, block=block, scale=scale, window=window)
  for step in range(devices):
    # Issued before this step's compute, which does not depend on it: XLA may overlap the two.
    arriving = _pass_on(travelling, devices) if step < devices - 1 else None
    k, v, seg, pos = travelling
    for k_c, v_c, seg_c, pos_c in zip(_halves(k), _halves(v), _halves(seg), _halves(pos)):
      for a, (q_c, (q_seg, q_pos)) in enumerate(zip(q_chunks, q_ids)):
        ids = (q_seg, seg_c, q_pos, pos_c)
        carries[a] = jax.lax.cond(
          _any_allowed((q_seg, q_pos), (seg_c, pos_c), window),
          lambda carry, q_c=q_c, k_c=k_c, v_c=v_c, ids=ids: softmax(q_c, k_c, v_c, ids, carry),
          lambda carry: carry,
          carries[a],
        )
    travelling = arriving
  outs, lses = zip(*(attend_lib.softmax_finish(c, q_BxLxNxH.dtype) for c in carries))
  out_BxLxNxH = jnp.concatenate(outs, axis=1)
  kept = (q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, out_BxLxNxH, seg_BxL, pos_BxL, lses)
  return out_BxLxNxH, kept


def _ring_bwd(devices, block, scale, window, platform, kept, dout_BxLxNxH):
  q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, out_BxLxNxH, seg_BxL, pos_BxL, lses = kept
  kv_heads = k_BxLxKxH.shape[2]
  group = functools.partial(attend_lib._group, kv_heads=kv_heads)
  q_chunks, dout_chunks = _halves(group(q_BxLxNxH)), _halves(group(dout_BxLxNxH))
  d_chunks = [attend_lib.softmax_correction(do, o) for do, o in zip(dout_chunks, _halves(group(out_BxLxNxH)))]
  q_ids = list(zip(_halves(seg_BxL), _halves(pos_BxL)))
  grads = functools.partial(attend_lib.softmax_grads, block=block, scale=scale, window=window)
  dq_chunks = [jnp.zeros(q.shape, jnp.float32) for q in q_chunks]
  travelling = (k_BxLxKxH, v_BxLxKxH, seg_BxL, pos_BxL)
  # dk and dv travel with their chunk and gather every device's share; after `devices` passes they are home.
  dkv = (jnp.zeros(k_BxLxKxH.shape, jnp.float32), jnp.zeros(v_BxLxKxH.shape, jnp.float32))
  for step in range(devices):
    arriving = _pass_on(travelling, devices) if step < devices - 1 else None
    k, v, seg, pos = travelling
    dk_halves, dv_halves = list(_halves(dkv[0])), list(_halves(dkv[1]))
    for c, (k_c, v_c, seg_c, pos_c) in enumerate(zip(_halves(k), _halves(v), _halves(seg), _halves(pos))):
      for a in range(2):
        q_seg, q_pos = q_ids[a]
        ids = (q_seg, seg_c, q_pos, pos_c)

        def compute(_, a=a, k_c=k_c, v_c=v_c, ids=ids):
          return grads(q_chunks[a], dout_chunks[a], d_chunks[a], lses[a], k_c, v_c, ids)

        def skip(_, a=a, k_c=k_c):
          zeros = jnp.zeros(k_c.shape, jnp.float32)
          return jnp.zeros(q_chunks[a].shape, jnp.float32), zeros, zeros

        dq, dk, dv = jax.lax.cond(_any_allowed(q_ids[a], (seg_c, pos_c), window), compute, skip, None)
        dq_chunks[a] = dq_chunks[a] + dq
        dk_halves[c], dv_halves[c] = dk_halves[c] + dk, dv_halves[c] + dv
    dkv = _pass_on((jnp.concatenate(dk_halves, axis=1), jnp.concatenate(dv_halves, axis=1)), devices)
    travelling = arriving
  dq_BxLxNxH = jnp.concatenate(dq_chunks, axis=1).reshape(q_BxLxNxH.shape).astype(q_BxLxNxH.dtype)
  return dq_BxLxNxH, dkv[0].astype(k_BxLxKxH.dtype), dkv[1].astype(v_BxLxKxH.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)
