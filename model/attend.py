"""The attention seam: every attention kernel behind one function, `attend`.

The caller owns the projections and RoPE; `attend` sees queries, keys and values with the segment ids and
positions of both. Query l may attend key s when they share a segment, that segment is not 0 (0 is padding,
never attended), and kv_positions[s] <= q_positions[l]; with a sliding window W > 0 also
q_positions[l] - kv_positions[s] < W (Mistral: each query sees itself and the W - 1 positions before).
Causality and the window come from positions rather than indices, so the same function serves training on
packed rows (L == S), queries at the end of a KV cache (L < S) and pipeline stages. A query that may attend
no key (a padding row) gives zeros, in values and gradients.

Implementations (`impl`, config `model.attention`):
- `xla`: one [B, K, G * L, S] fp32 score tensor; the [B, L, S] mask is built once per call from the ids; its own
  backward (`jax.custom_vjp`) keeps the unnormalised probabilities and takes the softmax correction from the output.
- `chunked`: online softmax over blocks of `block` keys with its own backward (`jax.custom_vjp`) that
  recomputes each block's scores: memory O(L x block), never a dense [L, S] mask; runs on any backend.
- `cudnn`: `jax.nn.dot_product_attention(implementation="cudnn")` with the mask as its `mask`; GPU only.
- `splash`: the Pallas TPU splash kernel with segment ids; TPU only. It takes causality (and the window) from indices
  (query l sits at key index S - L + l), which equals the position rule for packed rows and for a cache.
- `auto`: splash on TPU (xla when the keys are not a multiple of splash's block, `SPLASH_BLOCK`); on GPU cudnn for
  16-bit inputs (cuDNN's flash kernel has no fp32), else as on CPU; on CPU xla up to
  `AUTO_CHUNKED_ABOVE` keys and chunked beyond.
"""

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from model.layers import as_residual, from_residual, transposed_copy
from parallel import rules as sharding_rules

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")
AUTO_CHUNKED_ABOVE = 1024
BACKENDS = {"cudnn": "gpu", "splash": "tpu"}
SPLASH_BLOCK = 128  # the splash kernel's default query and key block: sequence lengths must be multiples of it
# A finite "minus infinity" for masked scores: exp of it is 0, and it minus itself is 0 (no NaN on empty rows).
_MASKED = -1e30


def resolve(impl: str, backend: str, kv_length: int, dtype) -> str:
  """The implementation `impl` stands for on `backend` (only `auto` depends on the backend and shapes)."""
  if impl != "auto":
    return impl
  if backend == "tpu":
    return "splash" if kv_length % SPLASH_BLOCK == 0 else "xla"
  if backend == "gpu" and jnp.dtype(dtype).itemsize == 2:
    return "cudnn"
  return "chunked" if kv_length > AUTO_CHUNKED_ABOVE else "xla"


def attend(
  q_BxLxNxH: jax.Array,
  k_BxSxKxH: jax.Array,
  v_BxSxKxH: jax.Array,
  *,
  q_segment_ids_BxL: jax.Array,
  kv_segment_ids_BxS: jax.Array,
  q_positions_BxL: jax.Array,
  kv_positions_BxS: jax.Array,
  impl: str = "auto",
  block: int = 512,
  sliding_window: int = 0,
  rules=None,
  platform: str,
) -> jax.Array:
  """Softmax(q k^T / sqrt(H)) v over the keys each query may see (module docstring); GQA when K < N.
  `sliding_window` > 0 limits each query to keys less than that many positions behind it. `rules`: the
  logical-axis rules a kernel under `shard_map` (splash) splits its inputs by, on the mesh of JAX's context.
  `platform`: the target's (cpu | gpu | tpu), which decides what `auto` stands for and how residuals are kept."""
  n, k = q_BxLxNxH.shape[2], k_BxSxKxH.shape[2]
  assert n % k == 0, f"{n} query heads do not group over {k} kv heads"
  impl = resolve(impl, platform, k_BxSxKxH.shape[1], q_BxLxNxH.dtype)
  assert BACKENDS.get(impl, platform) == platform, f"{impl} on {platform}: settings.validate.check_backend refuses it"
  scale = q_BxLxNxH.shape[-1] ** -0.5
  ids = (q_segment_ids_BxL, kv_segment_ids_BxS, q_positions_BxL, kv_positions_BxS)
  if impl == "chunked":
    return _chunked(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, ids, block, scale, sliding_window, platform)
  if impl == "splash":
    return _splash(
      q_BxLxNxH,
      k_BxSxKxH,
      v_BxSxKxH,
      q_segment_ids_BxL,
      kv_segment_ids_BxS,
      scale,
      sliding_window=sliding_window,
      rules=rules,
    )
  allowed_BxLxS = _allowed(*ids, sliding_window)
  if impl == "cudnn":
    out_BxLxNxH = jax.nn.dot_product_attention(
      q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask=allowed_BxLxS[:, None], scale=scale, implementation="cudnn"
    )
  else:
    out_BxLxNxH = _xla(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxLxS, scale, platform)
  # Padding rows: the softmax of an all-masked row is uniform, not zero.
  return jnp.where(jnp.any(allowed_BxLxS, axis=-1)[:, :, None, None], out_BxLxNxH, 0).astype(q_BxLxNxH.dtype)


def _allowed(
  q_segment_ids_BxL, kv_segment_ids_BxS, q_positions_BxL, kv_positions_BxS, sliding_window: int = 0
) -> jax.Array:
  """[B, L, S] True where query l may attend key s."""
  same_BxLxS = q_segment_ids_BxL[:, :, None] == kv_segment_ids_BxS[:, None, :]
  behind_BxLxS = q_positions_BxL[:, :, None] - kv_positions_BxS[:, None, :]
  causal_BxLxS = behind_BxLxS >= 0
  if sliding_window > 0:
    causal_BxLxS = causal_BxLxS & (behind_BxLxS < sliding_window)
  return same_BxLxS & causal_BxLxS & (kv_segment_ids_BxS != 0)[:, None, :]


def _group(q_BxLxNxH: jax.Array, kv_heads: int) -> jax.Array:
  b, length, n, h = q_BxLxNxH.shape
  return q_BxLxNxH.reshape(b, length, kv_heads, n // kv_heads, h)


def _heads(x_BxLxNxH: jax.Array, kv_heads: int) -> jax.Array:
  """[B, L, N, H] -> [B, K, G * L, H]: each kv head's queries (all G of them) as the rows of one matrix."""
  b, length, n, h = x_BxLxNxH.shape
  x_BxKxGxLxH = jnp.transpose(_group(x_BxLxNxH, kv_heads), (0, 2, 3, 1, 4))
  return x_BxKxGxLxH.reshape(b, kv_heads, (n // kv_heads) * length, h)


def _unheads(x_BxKxGLxH: jax.Array, length: int) -> jax.Array:
  """[B, K, G * L, H] -> [B, L, N, H], the inverse of `_heads`."""
  b, kv_heads, gl, h = x_BxKxGLxH.shape
  x_BxKxGxLxH = x_BxKxGLxH.reshape(b, kv_heads, gl // length, length, h)
  return jnp.transpose(x_BxKxGxLxH, (0, 3, 1, 2, 4)).reshape(b, length, -1, h)


def _swap_minor(x: jax.Array, platform: str) -> jax.Array:
  """[..., m, n] -> [..., n, m], written out for 16-bit inputs, which XLA:CPU multiplies at the bf16 rate only in
  [m, k] x [k, n] form (see `model/layers.py: _matmul_row_major`); a bare transpose would fold into the dot.
  fp32 keeps the bare transpose: there the transposed-lhs dot, which XLA:CPU runs on Eigen, measured faster on
  bench_peer's layer than a copy followed by an NN dot. Other compilers choose the layout themselves: a bare
  transpose for every platform but the CPU."""
  if platform == "cpu" and x.dtype != jnp.float32:
    return transposed_copy(x)
  return jnp.swapaxes(x, -1, -2)


def _head_dot(a_BxKxMxC: jax.Array, b_BxKxCxN: jax.Array) -> jax.Array:
  """Per (batch, kv head): [M, C] @ [C, N], accumulated in fp32."""
  dims = (((3,), (2,)), ((0, 1), (0, 1)))
  return jax.lax.dot_general(a_BxKxMxC, b_BxKxCxN, dims, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _xla(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxLxS, scale: float, platform: str) -> jax.Array:
  """Dense attention with its own backward, every product a row-major [M, C] x [C, N] matmul per (batch, kv head)
  over head-major copies of q, k and v (the G query heads of a kv head stacked as rows). XLA's own layout choice
  for the einsum form transposed the [L, S] tensors (three extra passes over the largest arrays), and autodiff
  of the softmax made six passes over them. The forward normalises the [.., L, H] output rather than the
  probabilities; the backward takes the softmax correction from that output (rowsum(dout * out), as flash
  attention does)."""
  return _xla_fwd(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxLxS, scale, platform)[0]


def _xla_fwd(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, allowed_BxLxS, scale, platform):
  b, length, n, _ = q_BxLxNxH.shape
  kv_heads = k_BxSxKxH.shape[2]
  q_BxKxGLxH = _heads(q_BxLxNxH, kv_heads)
  k_BxKxHxS = jnp.transpose(k_BxSxKxH, (0, 2, 3, 1))
  v_BxKxSxH = jnp.transpose(v_BxSxKxH, (0, 2, 1, 3))
  logits_BxKxGLxS = checkpoint_name(_head_dot(q_BxKxGLxH, k_BxKxHxS) * scale, "attention_scores")
  allowed_Bx1xGLxS = jnp.broadcast_to(
    allowed_BxLxS[:, None, None], (b, 1, n // kv_heads, *allowed_BxLxS.shape[1:])
  ).reshape(b, 1, -1, allowed_BxLxS.shape[2])
  logits_BxKxGLxS = jnp.where(allowed_Bx1xGLxS, logits_BxKxGLxS, _MASKED)
  max_BxKxGLx1 = jnp.max(logits_BxKxGLxS, axis=-1, keepdims=True)
  # Unnormalised probabilities; a padding row (every key masked) gets exp(0) everywhere, which `attend` zeroes.
  exp_BxKxGLxS = checkpoint_name(jnp.exp(logits_BxKxGLxS - max_BxKxGLx1), "attention_probs")
  sum_BxKxGLx1 = jnp.sum(exp_BxKxGLxS, axis=-1, keepdims=True)
  out_BxKxGLxH = _head_dot(exp_BxKxGLxS.astype(v_BxSxKxH.dtype), v_BxKxSxH) / sum_BxKxGLx1
  out_BxKxGLxH = out_BxKxGLxH.astype(q_BxLxNxH.dtype)
  residuals = (q_BxKxGLxH, k_BxKxHxS, v_BxKxSxH, out_BxKxGLxH, exp_BxKxGLxS, sum_BxKxGLx1)
  return _unheads(out_BxKxGLxH, length), tuple(as_residual(x, platform) for x in residuals)


def _xla_bwd(scale, platform, residuals, dout_BxLxNxH):
  q_BxKxGLxH, k_BxKxHxS, v_BxKxSxH, out_BxKxGLxH, exp_BxKxGLxS, sum_BxKxGLx1 = map(from_residual, residuals)
  length, dt = dout_BxLxNxH.shape[1], q_BxKxGLxH.dtype
  dout_BxKxGLxH = _heads(dout_BxLxNxH, k_BxKxHxS.shape[1])
  # D = rowsum(dprobs * probs) = rowsum(dout * out): the softmax backward's correction, one number per query.
  d_BxKxGLx1 = jnp.sum(dout_BxKxGLxH.astype(jnp.float32) * out_BxKxGLxH.astype(jnp.float32), axis=-1, keepdims=True)
  dprobs_BxKxGLxS = _head_dot(dout_BxKxGLxH, _swap_minor(v_BxKxSxH, platform))
  dlogits_BxKxGLxS = (exp_BxKxGLxS * ((dprobs_BxKxGLxS - d_BxKxGLx1) * (scale / sum_BxKxGLx1))).astype(dt)
  dq_BxKxGLxH = _head_dot(dlogits_BxKxGLxS, _swap_minor(k_BxKxHxS, platform))
  # dk^T and dv^T ([H, S] per head) read the [GL, S] tensors as they lie; only the small q and dout turn.
  dk_BxKxHxS = _head_dot(_swap_minor(q_BxKxGLxH, platform), dlogits_BxKxGLxS)
  # probs = exp / sum: the division moves onto dout's side of the product.
  dv_BxKxHxS = _head_dot(_swap_minor((dout_BxKxGLxH / sum_BxKxGLx1).astype(dt), platform), exp_BxKxGLxS.astype(dt))
  return (
    _unheads(dq_BxKxGLxH, length).astype(dt),
    jnp.transpose(dk_BxKxHxS, (0, 3, 1, 2)).astype(k_BxKxHxS.dtype),
    jnp.transpose(dv_BxKxHxS, (0, 3, 1, 2)).astype(v_BxKxSxH.dtype),
    None,
  )


_xla.defvjp(_xla_fwd, _xla_bwd)


def _key_blocks(x_BxSx___, block: int, fill) -> jax.Array:
  """[B, S, ...] -> [S / block, B, block, ...], the key axis padded with `fill` to a multiple of `block`."""
  b, s = x_BxSx___.shape[:2]
  pad = -s % block
  x = jnp.pad(x_BxSx___, [(0, 0), (0, pad)] + [(0, 0)] * (x_BxSx___.ndim - 2), constant_values=fill)
  return jnp.moveaxis(x.reshape(b, (s + pad) // block, block, *x.shape[2:]), 1, 0)


def _chunk_inputs(k_BxSxKxH, v_BxSxKxH, ids, block: int):
  q_seg_BxL, kv_seg_BxS, q_pos_BxL, kv_pos_BxS = ids
  # Padded keys get segment 0, which no query attends.
  blocks = (
    _key_blocks(k_BxSxKxH, block, 0),
    _key_blocks(v_BxSxKxH, block, 0),
    _key_blocks(kv_seg_BxS, block, 0),
    _key_blocks(kv_pos_BxS, block, 0),
  )
  return blocks, q_seg_BxL, q_pos_BxL


def _tied(block_xs, carry):
  """One key block's (k, v, segment ids, positions) and the scan's carry, tied together. A block's mask depends
  on the ids alone, which differentiation treats as known, unlike q, k, v and the cotangents; JAX's partial
  evaluation then computed every block's mask ahead of the scan (forward and backward) and kept them all,
  [blocks, B, K, G, L, C] booleans: a dense L x S mask per layer, which breaks the kernel's O(L x block) memory.
  Tied to the carry through an optimization barrier, the mask is computed in the scan, block by block."""
  return jax.lax.optimization_barrier((block_xs, carry))


def _block_scores(q_BxLxKxGxH, k_BxCxKxH, q_seg_BxL, kv_seg_BxC, q_pos_BxL, kv_pos_BxC, scale, window):
  """Scores of one key block (C keys), fp32, and where they are allowed."""
  s_BxKxGxLxC = jnp.einsum("BLKGH,BCKH->BKGLC", q_BxLxKxGxH, k_BxCxKxH, preferred_element_type=jnp.float32)
  allowed_Bx1x1xLxC = _allowed(q_seg_BxL, kv_seg_BxC, q_pos_BxL, kv_pos_BxC, window)[:, None, None]
  return s_BxKxGxLxC * scale, allowed_Bx1x1xLxC


def online_softmax(q_BxLxKxGxH, k_BxSxKxH, v_BxSxKxH, ids, carry, *, block: int, scale: float, window: int):
  """Online softmax over these keys, `block` at a time: the carry (running max, sum, unnormalised output; see
  `softmax_start`) updated with them. The forward of the chunked kernel, and of each block of the ring
  (parallel/context.py), whose keys arrive one device's chunk at a time."""
  blocks, q_seg_BxL, q_pos_BxL = _chunk_inputs(k_BxSxKxH, v_BxSxKxH, ids, min(block, k_BxSxKxH.shape[1]))

  def step(carry, xs):
    (k_BxCxKxH, v_BxCxKxH, kv_seg_BxC, kv_pos_BxC), carry = _tied(xs, carry)
    max_BxKxGxL, sum_BxKxGxL, acc_BxKxGxLxH = carry
    s_BxKxGxLxC, allowed = _block_scores(
      q_BxLxKxGxH, k_BxCxKxH, q_seg_BxL, kv_seg_BxC, q_pos_BxL, kv_pos_BxC, scale, window
    )
    new_max_BxKxGxL = jnp.maximum(max_BxKxGxL, jnp.max(jnp.where(allowed, s_BxKxGxLxC, _MASKED), axis=-1))
    p_BxKxGxLxC = jnp.where(allowed, jnp.exp(s_BxKxGxLxC - new_max_BxKxGxL[..., None]), 0.0)
    rescale_BxKxGxL = jnp.exp(max_BxKxGxL - new_max_BxKxGxL)
    sum_BxKxGxL = sum_BxKxGxL * rescale_BxKxGxL + jnp.sum(p_BxKxGxLxC, axis=-1)
    pv_BxKxGxLxH = jnp.einsum(
      "BKGLC,BCKH->BKGLH", p_BxKxGxLxC.astype(v_BxCxKxH.dtype), v_BxCxKxH, preferred_element_type=jnp.float32
    )
    acc_BxKxGxLxH = acc_BxKxGxLxH * rescale_BxKxGxL[..., None] + pv_BxKxGxLxH
    return (new_max_BxKxGxL, sum_BxKxGxL, acc_BxKxGxLxH), None

  return jax.lax.scan(step, carry, blocks)[0]


def softmax_start(q_BxLxKxGxH: jax.Array):
  """The carry of `online_softmax` before any key: max, sum [B, K, G, L] and the output [B, K, G, L, H], fp32."""
  b, length, kv_heads, g, h = q_BxLxKxGxH.shape
  return (
    jnp.full((b, kv_heads, g, length), _MASKED, jnp.float32),
    jnp.zeros((b, kv_heads, g, length), jnp.float32),
    jnp.zeros((b, kv_heads, g, length, h), jnp.float32),
  )


def softmax_finish(carry, dtype):
  """(output [B, L, N, H] in `dtype`, log-sum-exp [B, K, G, L]) of a finished `online_softmax`; a query that saw
  no key gets zeros in both."""
  max_BxKxGxL, sum_BxKxGxL, acc_BxKxGxLxH = carry
  b, kv_heads, g, length, h = acc_BxKxGxLxH.shape
  seen_BxKxGxL = sum_BxKxGxL > 0  # False on padding rows: no key was allowed
  safe_sum_BxKxGxL = jnp.where(seen_BxKxGxL, sum_BxKxGxL, 1.0)
  out_BxKxGxLxH = jnp.where(seen_BxKxGxL[..., None], acc_BxKxGxLxH / safe_sum_BxKxGxL[..., None], 0.0)
  lse_BxKxGxL = jnp.where(seen_BxKxGxL, max_BxKxGxL + jnp.log(safe_sum_BxKxGxL), 0.0)
  out_BxLxNxH = jnp.transpose(out_BxKxGxLxH, (0, 3, 1, 2, 4)).reshape(b, length, kv_heads * g, h).astype(dtype)
  return out_BxLxNxH, lse_BxKxGxL


def softmax_grads(
  q_BxLxKxGxH, dout_BxLxKxGxH, d_BxKxGxL, lse_BxKxGxL, k_BxSxKxH, v_BxSxKxH, ids, *, block, scale, window
):
  """The backward of `online_softmax` over these keys, given the whole softmax's log-sum-exp and
  D = rowsum(dout * out): (dq [B, L, K, G, H], dk, dv [B, S, K, H]), fp32. Each block's scores are recomputed."""
  b, s, kv_heads, h = k_BxSxKxH.shape
  blocks, q_seg_BxL, q_pos_BxL = _chunk_inputs(k_BxSxKxH, v_BxSxKxH, ids, min(block, s))
  dt = q_BxLxKxGxH.dtype

  def step(dq_BxLxKxGxH, xs):
    (k_BxCxKxH, v_BxCxKxH, kv_seg_BxC, kv_pos_BxC), dq_BxLxKxGxH = _tied(xs, dq_BxLxKxGxH)
    s_BxKxGxLxC, allowed = _block_scores(
      q_BxLxKxGxH, k_BxCxKxH, q_seg_BxL, kv_seg_BxC, q_pos_BxL, kv_pos_BxC, scale, window
    )
    p_BxKxGxLxC = jnp.where(allowed, jnp.exp(s_BxKxGxLxC - lse_BxKxGxL[..., None]), 0.0)
    dv_BxCxKxH = jnp.einsum(
      "BKGLC,BLKGH->BCKH", p_BxKxGxLxC.astype(dt), dout_BxLxKxGxH, preferred_element_type=jnp.float32
    )
    dp_BxKxGxLxC = jnp.einsum("BLKGH,BCKH->BKGLC", dout_BxLxKxGxH, v_BxCxKxH, preferred_element_type=jnp.float32)
    ds_BxKxGxLxC = (p_BxKxGxLxC * (dp_BxKxGxLxC - d_BxKxGxL[..., None]) * scale).astype(dt)
    dq_BxLxKxGxH += jnp.einsum("BKGLC,BCKH->BLKGH", ds_BxKxGxLxC, k_BxCxKxH, preferred_element_type=jnp.float32)
    dk_BxCxKxH = jnp.einsum("BKGLC,BLKGH->BCKH", ds_BxKxGxLxC, q_BxLxKxGxH, preferred_element_type=jnp.float32)
    return dq_BxLxKxGxH, (dk_BxCxKxH, dv_BxCxKxH)

  dq_BxLxKxGxH, (dk_XxBxCxKxH, dv_XxBxCxKxH) = jax.lax.scan(step, jnp.zeros(q_BxLxKxGxH.shape, jnp.float32), blocks)

  def unblock(x_XxBxCxKxH):
    return jnp.moveaxis(x_XxBxCxKxH, 0, 1).reshape(b, -1, kv_heads, h)[:, :s]

  return dq_BxLxKxGxH, unblock(dk_XxBxCxKxH), unblock(dv_XxBxCxKxH)


def softmax_correction(dout_BxLxKxGxH, out_BxLxKxGxH) -> jax.Array:
  """D = rowsum(dout * out): the softmax backward's correction term, one number per query and head [B, K, G, L]."""
  return jnp.einsum("BLKGH,BLKGH->BKGL", dout_BxLxKxGxH.astype(jnp.float32), out_BxLxKxGxH.astype(jnp.float32))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7))
def _chunked(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, ids, block: int, scale: float, window: int, platform: str) -> jax.Array:
  return _chunked_fwd(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, ids, block, scale, window, platform)[0]


def _chunked_fwd(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, ids, block, scale, window, platform):
  q_BxLxKxGxH = _group(q_BxLxNxH, k_BxSxKxH.shape[2])
  carry = online_softmax(
    q_BxLxKxGxH, k_BxSxKxH, v_BxSxKxH, ids, softmax_start(q_BxLxKxGxH), block=block, scale=scale, window=window
  )
  out_BxLxNxH, lse_BxKxGxL = softmax_finish(carry, q_BxLxNxH.dtype)
  kept = tuple(as_residual(x, platform) for x in (q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, out_BxLxNxH))
  return out_BxLxNxH, (kept, ids, lse_BxKxGxL)


def _chunked_bwd(block, scale, window, platform, residuals, dout_BxLxNxH):
  kept, ids, lse_BxKxGxL = residuals
  q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, out_BxLxNxH = map(from_residual, kept)
  kv_heads = k_BxSxKxH.shape[2]
  q_BxLxKxGxH = _group(q_BxLxNxH, kv_heads)
  dout_BxLxKxGxH = _group(dout_BxLxNxH, kv_heads)
  d_BxKxGxL = softmax_correction(dout_BxLxKxGxH, _group(out_BxLxNxH, kv_heads))
  dq_BxLxKxGxH, dk_BxSxKxH, dv_BxSxKxH = softmax_grads(
    q_BxLxKxGxH, dout_BxLxKxGxH, d_BxKxGxL, lse_BxKxGxL, k_BxSxKxH, v_BxSxKxH, ids,
    block=block, scale=scale, window=window,
  )  # fmt: skip
  dt = q_BxLxNxH.dtype
  dq_BxLxNxH = dq_BxLxKxGxH.reshape(q_BxLxNxH.shape).astype(dt)
  return dq_BxLxNxH, dk_BxSxKxH.astype(k_BxSxKxH.dtype), dv_BxSxKxH.astype(v_BxSxKxH.dtype), (None,) * len(ids)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def _splash(
  q_BxLxNxH,
  k_BxSxKxH,
  v_BxSxKxH,
  q_segment_ids_BxL,
  kv_segment_ids_BxS,
  scale: float,
  *,
  sliding_window: int = 0,
  interpret: bool = False,
  rules=None,
) -> jax.Array:
  """Pallas splash attention (TPU): one kernel per batch row, under `shard_map` on the mesh of JAX's context.

  `interpret` runs the kernel in the Pallas interpreter, on any backend: how the tests check it on CPU."""
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
  from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

  q_BxNxLxH = jnp.transpose(q_BxLxNxH * jnp.asarray(scale, q_BxLxNxH.dtype), (0, 2, 1, 3))
  k_BxKxSxH, v_BxKxSxH = jnp.transpose(k_BxSxKxH, (0, 2, 1, 3)), jnp.transpose(v_BxSxKxH, (0, 2, 1, 3))

  def per_device(q_BxNxLxH, k_BxKxSxH, v_BxKxSxH, q_seg_BxL, kv_seg_BxS):
    (length, s), heads = (q_BxNxLxH.shape[2], k_BxKxSxH.shape[2]), q_BxNxLxH.shape[1]
    if sliding_window > 0:  # causal and at most sliding_window - 1 keys behind, by index
      causal = splash_mask.LocalMask((length, s), window_size=(sliding_window - 1, 0), offset=s - length)
    else:
      causal = splash_mask.CausalMask((length, s), offset=s - length)
    mask = splash_mask.MultiHeadMask([causal] * heads)
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, interpret=interpret)
    segment_ids = splash.SegmentIds(q=q_seg_BxL, kv=kv_seg_BxS)
    out_BxNxLxH = jax.vmap(kernel)(q_BxNxLxH, k_BxKxSxH, v_BxKxSxH, segment_ids=segment_ids)
    # The kernel lets segment 0 see segment 0; padding rows must give zeros.
    return jnp.where((q_seg_BxL != 0)[:, None, :, None], out_BxNxLxH, 0).astype(q_BxNxLxH.dtype)

  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    rules = sharding_rules.parse_rules(sharding_rules.DEFAULT_RULES) if rules is None else rules
    q_spec = sharding_rules.logical_to_spec(("batch", "heads", None, None), rules, mesh)
    kv_spec = sharding_rules.logical_to_spec(("batch", "kv_heads", None, None), rules, mesh)
    ids_spec = sharding_rules.logical_to_spec(("batch", None), rules, mesh)
    # check_vma=False: the Pallas call inside does not declare how its outputs vary over the mesh axes.
    per_device = jax.shard_map(
      per_device,
      mesh=mesh,
      in_specs=(q_spec, kv_spec, kv_spec, ids_spec, ids_spec),
      out_specs=q_spec,
      check_vma=False,
    )
  out_BxNxLxH = per_device(q_BxNxLxH, k_BxKxSxH, v_BxKxSxH, q_segment_ids_BxL, kv_segment_ids_BxS)
  return jnp.transpose(out_BxNxLxH, (0, 2, 1, 3))
