"""The attention seam: every implementation that runs on CPU equals a naive per-head reference, values and
gradients, with packed segments, GQA, padding rows, and queries at the end of a longer key sequence."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model.attend import attend, resolve
from settings.validate import backend_problem


def _naive(q, k, v, q_seg, kv_seg, q_pos, kv_pos, window=0):
  """One head at a time, the mask from Python loops over the rule, softmax written out. `window` > 0: a key
  more than window - 1 positions behind the query is hidden (Mistral's sliding window)."""
  b, length, n, h = q.shape
  s, kv_heads = k.shape[1], k.shape[2]
  mask = np.zeros((b, length, s), bool)
  for r in range(b):
    for i in range(length):
      for j in range(s):
        mask[r, i, j] = q_seg[r, i] == kv_seg[r, j] != 0 and kv_pos[r, j] <= q_pos[r, i]
        if window and q_pos[r, i] - kv_pos[r, j] >= window:
          mask[r, i, j] = False
  heads = []
  for head in range(n):
    kv = head // (n // kv_heads)
    scores = jnp.einsum("blh,bsh->bls", q[:, :, head], k[:, :, kv]) / np.sqrt(h)
    w = jnp.where(mask, jnp.exp(scores - jax.lax.stop_gradient(scores.max())), 0.0)
    total = jnp.sum(w, -1, keepdims=True)
    heads.append(jnp.einsum("bls,bsh->blh", w, v[:, :, kv]) / jnp.maximum(total, 1e-30))
  return jnp.stack(heads, axis=2)


def _case(length: int, s: int, seed: int):
  """Two rows of packed documents over s keys, padding (segment 0) at the end of row 1; queries are the last
  `length` keys (a decoding step when length < s)."""
  rng = np.random.default_rng(seed)
  kv_seg = np.array([[1] * 5 + [2] * (s - 5), [1] * 4 + [2] * (s - 7) + [0] * 3], np.int32)
  kv_pos = np.zeros_like(kv_seg)
  for r in range(2):
    for j in range(1, s):
      kv_pos[r, j] = kv_pos[r, j - 1] + 1 if kv_seg[r, j] == kv_seg[r, j - 1] else 0
  q_seg, q_pos = kv_seg[:, s - length :], kv_pos[:, s - length :]
  n, kv_heads, h = 4, 2, 8
  q = jnp.asarray(rng.normal(size=(2, length, n, h)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, s, kv_heads, h)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, s, kv_heads, h)), jnp.float32)
  dout = jnp.asarray(rng.normal(size=(2, length, n, h)), jnp.float32)
  ids = dict(q_seg=q_seg, kv_seg=kv_seg, q_pos=q_pos, kv_pos=kv_pos)
  return q, k, v, dout, ids


def _value_and_grads(fn, q, k, v, dout):
  out, vjp = jax.vjp(fn, q, k, v)
  return out, vjp(dout)


@pytest.mark.parametrize(
  "length,s,window",
  [(13, 13, 0), (4, 13, 0), (13, 13, 3), (4, 13, 2)],
  ids=["train", "decode", "window", "window_decode"],
)
def test_cpu_implementations_match_naive_reference_values_and_gradients(length, s, window):
  q, k, v, dout, ids = _case(length, s, seed=length)

  def naive(q, k, v):
    return _naive(q, k, v, ids["q_seg"], ids["kv_seg"], ids["q_pos"], ids["kv_pos"], window)

  want_out, want_grads = _value_and_grads(naive, q, k, v, dout)
  results = {}
  # The CPU program's backward passes and residuals, and the generic ones a GPU or TPU program takes.
  for impl, block, platform in [
    ("xla", 512, "cpu"),
    ("chunked", 4, "cpu"),
    ("chunked", 512, "cpu"),
    ("xla", 512, "gpu"),
    ("chunked", 4, "tpu"),
  ]:

    def fn(q, k, v, impl=impl, block=block, platform=platform):
      return attend(
        q,
        k,
        v,
        q_segment_ids_BxL=jnp.asarray(ids["q_seg"]),
        kv_segment_ids_BxS=jnp.asarray(ids["kv_seg"]),
        q_positions_BxL=jnp.asarray(ids["q_pos"]),
        kv_positions_BxS=jnp.asarray(ids["kv_pos"]),
        impl=impl,
        block=block,
        sliding_window=window,
        platform=platform,
      )

    out, grads = _value_and_grads(jax.jit(fn), q, k, v, dout)
    where = f"{impl} block {block} for {platform}"
    np.testing.assert_allclose(out, want_out, rtol=1e-5, atol=1e-5, err_msg=where)
    for name, got, want in zip("qkv", grads, want_grads):
      assert np.isfinite(got).all(), f"{where}: NaN in d{name}"
      np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{where}: d{name}")
    if platform == "cpu":
      results[impl, block] = out, grads
  # Padding rows (row 1, segment 0) give zeros and pass no gradient back.
  padding = ids["q_seg"][1] == 0
  assert padding.any()
  for out, (dq, _, _) in results.values():
    assert not np.asarray(out)[1, padding].any() and not np.asarray(dq)[1, padding].any()
  for (out_a, grads_a), (out_b, grads_b) in zip(results.values(), list(results.values())[1:]):
    np.testing.assert_allclose(out_a, out_b, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_a, grads_b):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_backends_and_auto_choice():
  assert backend_problem("xla", "cpu") is None and backend_problem("chunked", "tpu") is None
  assert "GPU only" in backend_problem("cudnn", "cpu")
  assert "TPU only" in backend_problem("splash", "gpu")
  assert resolve("auto", "cpu", 1024, jnp.float32) == "xla"
  assert resolve("auto", "cpu", 1025, jnp.float32) == "chunked"
  assert resolve("auto", "gpu", 4096, jnp.bfloat16) == "cudnn"
  assert resolve("auto", "gpu", 256, jnp.float32) == "xla"
  assert resolve("auto", "tpu", 256, jnp.float32) == "splash"
  assert resolve("auto", "tpu", 64, jnp.float32) == "xla"  # splash needs multiples of its 128-key block


@pytest.mark.fast
def test_model_gives_the_same_logits_with_every_cpu_implementation():
  from tests.test_model import logits_of, make_model

  rng = np.random.default_rng(5)
  tokens = rng.integers(0, 128, 20)
  segments = np.array([1] * 8 + [2] * 9 + [0] * 3)
  positions = np.concatenate([np.arange(8), np.arange(9), np.zeros(3, int)])
  want = logits_of(make_model(attention="xla"), tokens, positions, segments)
  got = logits_of(make_model(attention="chunked", attention_block=8), tokens, positions, segments)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl,backend", [("cudnn", "GPU"), ("splash", "TPU")])
def test_accelerator_kernels_on_cpu_are_a_one_line_config_error(impl, backend):
  from settings import ConfigError
  from tests.helpers import VOCAB, mesh_for, small_config
  from trainer.experiment import build

  cfg = small_config(**{"model.attention": impl})
  with pytest.raises(ConfigError, match=rf"^config.model.attention='{impl}' runs on {backend} only[^\n]*$"):
    build(cfg, VOCAB, mesh_for(cfg))


@pytest.mark.fast
@pytest.mark.parametrize(
  "length,s,mesh,window",
  [(128, 128, False, 0), (128, 256, True, 0), (128, 128, False, 6)],
  ids=["train", "decode_on_mesh", "window"],
)
def test_splash_kernel_in_the_pallas_interpreter_matches_naive_reference(length, s, mesh, window):
  """The TPU kernel run by the Pallas interpreter on CPU, on its own block size (128): values and gradients;
  on a data=2 x tensor=2 mesh it runs per device under shard_map."""
  import contextlib

  from model.attend import _splash
  from parallel.rules import DEFAULT_RULES, parse_rules

  q, k, v, dout, ids = _case(length, s, seed=s)
  context = contextlib.nullcontext()
  if mesh:  # JAX's mesh context: the kernel runs under shard_map over it
    axes = ("stage", "data", "fsdp", "expert", "tensor")
    devices = jax.devices()[:4]
    layout = jax.make_mesh((1, 2, 1, 1, 2), axes, devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 5)
    context = jax.set_mesh(layout)

  def naive(q, k, v):
    return _naive(q, k, v, ids["q_seg"], ids["kv_seg"], ids["q_pos"], ids["kv_pos"], window)

  def splash(q, k, v):
    q_seg, kv_seg = jnp.asarray(ids["q_seg"]), jnp.asarray(ids["kv_seg"])
    scale = q.shape[-1] ** -0.5
    rules = parse_rules(DEFAULT_RULES)
    return _splash(q, k, v, q_seg, kv_seg, scale, sliding_window=window, interpret=True, rules=rules)

  want_out, want_grads = _value_and_grads(naive, q, k, v, dout)
  with context:
    out, grads = _value_and_grads(jax.jit(splash), q, k, v, dout)
  np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-5)
  for name, got, want in zip("qkv", grads, want_grads):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=f"d{name}")


@pytest.mark.fast
def test_chunked_gradient_never_holds_a_dense_mask():
  """Memory O(L x block): the gradient of the chunked kernel, with the ids as jitted inputs (as in training),
  holds no array as large as the [B, N, L, S] scores, mask included; the xla kernel, which does, is the control."""
  q, k, v, dout, ids = _case(64, 64, seed=3)

  def grads(impl):
    def loss(q, k, v, q_seg, kv_seg, q_pos, kv_pos):
      ids_kw = dict(q_segment_ids_BxL=q_seg, kv_segment_ids_BxS=kv_seg, q_positions_BxL=q_pos)

      def layer(x, _):  # as in the model: attention inside the layer scan
        return attend(x, k, v, **ids_kw, kv_positions_BxS=kv_pos, impl=impl, block=16, platform="cpu"), None

      return jnp.sum(jax.lax.scan(layer, q, None, length=2)[0] * dout)

    args = (q, k, v, ids["q_seg"], ids["kv_seg"], ids["q_pos"], ids["kv_pos"])
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).as_text()

  def largest_array(hlo_text):
    shapes = re.findall(r"tensor<([0-9x]+)x(?:f32|i1|i32)>", hlo_text)
    return max(np.prod([int(d) for d in s.split("x")]) for s in shapes)

  dense = q.shape[0] * q.shape[2] * q.shape[1] * k.shape[1]  # [B, N, L, S]
  assert largest_array(grads("xla")) >= dense
  assert largest_array(grads("chunked")) < dense
