"""The model's contracts: causality, packed-document isolation, GQA/MHA equivalence, dtypes."""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from model import ModelConfig, Transformer


def make_model(**kw) -> Transformer:
  fields = dict(
    vocab_size=128, max_len=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
  )
  fields.update(kw)
  with nnx.use_eager_sharding(False):
    return Transformer(ModelConfig(**fields), nnx.Rngs(params=0))


def logits_of(model, tokens, positions=None, segment_ids=None):
  tokens = jnp.asarray(tokens)[None]
  length = tokens.shape[1]
  positions = jnp.arange(length)[None] if positions is None else jnp.asarray(positions)[None]
  segment_ids = jnp.ones_like(tokens) if segment_ids is None else jnp.asarray(segment_ids)[None]
  logits, _ = model(tokens, positions, segment_ids)
  return np.asarray(logits[0])


@pytest.mark.parametrize("position_type", ["rope", "learned", "sinusoidal"])
def test_changing_later_tokens_leaves_earlier_logits_unchanged(position_type):
  model = make_model(position_type=position_type)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 128, 24)
  t = 11
  changed = tokens.copy()
  changed[t + 1 :] = rng.integers(0, 128, len(tokens) - t - 1)
  a, b = logits_of(model, tokens), logits_of(model, changed)
  np.testing.assert_allclose(a[: t + 1], b[: t + 1], rtol=1e-5, atol=1e-5)
  assert np.abs(a[t + 1 :] - b[t + 1 :]).max() > 1e-3  # later positions do see the change


@pytest.mark.parametrize("position_type", ["rope", "learned", "sinusoidal"])
@pytest.mark.parametrize("norm_type,mlp_type", [("rmsnorm", "swiglu"), ("layernorm", "gelu")])
def test_packed_row_gives_each_document_its_own_logits(position_type, norm_type, mlp_type):
  model = make_model(position_type=position_type, norm_type=norm_type, mlp_type=mlp_type)
  rng = np.random.default_rng(1)
  docs = [rng.integers(0, 128, n) for n in (7, 12, 5)]
  packed = np.concatenate(docs)
  positions = np.concatenate([np.arange(len(d)) for d in docs])
  segments = np.concatenate([np.full(len(d), i + 1) for i, d in enumerate(docs)])
  packed_logits = logits_of(model, packed, positions, segments)
  start = 0
  for doc in docs:
    alone = logits_of(model, doc)
    np.testing.assert_allclose(packed_logits[start : start + len(doc)], alone, rtol=1e-5, atol=1e-5)
    start += len(doc)


def _naive_mha(x_LxD, wq, wk, wv, wo, positions):
  """Multi-head attention one head at a time, with numpy loops for the mask: an independent reference."""
  from model.layers import rope

  q = rope(jnp.einsum("LD,DNH->LNH", x_LxD, wq)[None], positions[None], 10_000.0)[0]
  k = rope(jnp.einsum("LD,DNH->LNH", x_LxD, wk)[None], positions[None], 10_000.0)[0]
  v = jnp.einsum("LD,DNH->LNH", x_LxD, wv)
  length, heads, dim = q.shape
  out = np.zeros((length, heads, dim), np.float32)
  for h in range(heads):
    for i in range(length):
      scores = np.array([float(q[i, h] @ k[j, h]) / np.sqrt(dim) for j in range(i + 1)])
      p = np.exp(scores - scores.max())
      p /= p.sum()
      out[i, h] = sum(p[j] * np.asarray(v[j, h]) for j in range(i + 1))
  return jnp.einsum("LNH,NHD->LD", out, wo)


@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_attention_matches_naive_multi_head_reference(num_kv_heads):
  """GQA/MQA is MHA whose kv heads are shared: it equals the naive MHA with each kv head repeated."""
  from model.attention import Attention

  cfg = ModelConfig(
    vocab_size=128, max_len=16, num_layers=1, d_model=32, num_heads=4, num_kv_heads=num_kv_heads, head_dim=8, mlp_dim=64
  )
  with nnx.use_eager_sharding(False):
    attn = Attention(cfg, nnx.Rngs(params=3))
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 10, 32))
  positions = jnp.arange(10)[None]
  got = attn(x, positions, jnp.ones((1, 10), jnp.int32))[0]
  repeat = 4 // num_kv_heads
  wk = jnp.repeat(attn.wk_DxKxH[...], repeat, axis=1)
  wv = jnp.repeat(attn.wv_DxKxH[...], repeat, axis=1)
  want = _naive_mha(x[0], attn.wq_DxNxH[...], wk, wv, attn.wo_NxHxD[...], positions[0])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.fast
def test_gqa_with_all_kv_heads_equals_mha_model():
  """num_kv_heads == num_heads is plain MHA: the same weights give the same logits whatever the grouping path."""
  gqa = make_model(num_kv_heads=2)
  mha = make_model(num_kv_heads=4)
  # Give the MHA model the GQA model's weights, each kv head repeated for the query heads that share it.
  _, gqa_params = nnx.split(gqa)
  graphdef, mha_params = nnx.split(mha)
  pure = gqa_params.to_pure_dict()
  for name in ("wk_DxKxH", "wv_DxKxH"):
    pure["blocks"]["attn"][name] = jnp.repeat(pure["blocks"]["attn"][name], 2, axis=2)
  mha = nnx.merge(graphdef, nnx.State(pure))
  tokens = np.random.default_rng(2).integers(0, 128, 20)
  np.testing.assert_allclose(logits_of(gqa, tokens), logits_of(mha, tokens), rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_stays_close_to_float32():
  """bf16 activations with fp32 weights: logits within 0.1 (absolute) and the loss within 1% of fp32."""
  from model import cross_entropy_sums

  f32 = make_model()
  graphdef, params = nnx.split(f32)
  bf16 = nnx.merge(nnx.graphdef(make_model(compute_dtype="bfloat16")), params)
  rng = np.random.default_rng(3)
  tokens = rng.integers(0, 128, 32)
  a, b = logits_of(f32, tokens), logits_of(bf16, tokens)
  assert b.dtype == np.float32  # logits come out in fp32 for the loss
  assert np.abs(a - b).max() < 0.1
  targets = jnp.asarray(np.roll(tokens, -1))[None]
  mask = jnp.ones((1, 32))
  loss_a = cross_entropy_sums(jnp.asarray(a)[None], targets, mask)[0] / 32
  loss_b = cross_entropy_sums(jnp.asarray(b)[None], targets, mask)[0] / 32
  assert abs(float(loss_a) - float(loss_b)) / float(loss_a) < 0.01


def test_untied_head_and_stacked_layer_axis():
  model = make_model(tie_embeddings=False, num_layers=3)
  _, state = nnx.split(model)
  specs = nnx.get_partition_spec(state).to_pure_dict()
  assert "head_DxV" in specs
  for spec in jax.tree.leaves(specs["blocks"]):
    assert spec[0] == "layers"  # every block parameter is stacked for the scan
  for leaf in jax.tree.leaves(state.to_pure_dict()["blocks"]):
    assert leaf.shape[0] == 3


@pytest.mark.fast
def test_cross_entropy_matches_formula_with_mask_and_z_loss():
  from model import cross_entropy_sums

  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 5, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 5))
  mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
  nll, z, n = cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
  log_z = np.log(np.exp(logits).sum(-1))
  want_nll = sum(mask[b, t] * (log_z[b, t] - logits[b, t, targets[b, t]]) for b in range(2) for t in range(5))
  np.testing.assert_allclose(float(nll), want_nll, rtol=1e-5)
  np.testing.assert_allclose(float(z), (mask * log_z**2).sum(), rtol=1e-5)
  assert float(n) == mask.sum()


def test_chunked_loss_equals_plain_loss_in_value_and_gradient():
  """loss_chunk=5 over 12 positions (the last chunk padded): the same sums and the same parameter gradients, the
  tied embedding's included (it gets gradients from both the lookup and the chunked head)."""
  rng = np.random.default_rng(7)
  tokens, targets = jnp.asarray(rng.integers(0, 128, (2, 12))), jnp.asarray(rng.integers(0, 128, (2, 12)))
  mask = jnp.asarray(rng.random((2, 12)) > 0.25, jnp.float32)
  positions, segments = jnp.tile(jnp.arange(12), (2, 1)), jnp.ones((2, 12), jnp.int32)
  graphdef, params = nnx.split(make_model(num_layers=1))
  results = []
  for chunk in (0, 5):
    chunked_graphdef = nnx.graphdef(make_model(num_layers=1, loss_chunk=chunk))

    def objective(params, graphdef=chunked_graphdef):
      sums, _ = nnx.merge(graphdef, params).loss_sums(tokens, positions, segments, targets, mask)
      return sums[0] + 0.5 * sums[1], sums

    results.append(jax.jit(jax.value_and_grad(objective, has_aux=True))(params))
  ((_, plain_sums), plain_grads), ((_, chunked_sums), chunked_grads) = results
  np.testing.assert_allclose(np.array(chunked_sums), np.array(plain_sums), rtol=1e-6)
  assert float(plain_sums[2]) == float(mask.sum())
  for got, want in zip(jax.tree.leaves(chunked_grads), jax.tree.leaves(plain_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def _saved_residuals(fn, *args) -> list[str]:
  """The shapes ("f32[2,12,32]") of what the backward pass of `fn` keeps from its forward, parameters excluded."""
  import contextlib
  import io

  from jax.ad_checkpoint import print_saved_residuals

  text = io.StringIO()
  with contextlib.redirect_stdout(text):
    print_saved_residuals(fn, *args)
  return [line.split(" ")[0] for line in text.getvalue().splitlines() if "from the argument" not in line]


def test_remat_policies_give_the_same_loss_and_gradients_as_none():
  """fp32, tight tolerance; and each policy keeps what it says: nothing of the [L, S] attention scores, and
  fewer activations the more it recomputes."""
  rng = np.random.default_rng(8)
  tokens, targets = jnp.asarray(rng.integers(0, 128, (2, 12))), jnp.asarray(rng.integers(0, 128, (2, 12)))
  mask = jnp.ones((2, 12))
  positions, segments = jnp.tile(jnp.arange(12), (2, 1)), jnp.ones((2, 12), jnp.int32)
  _, params = nnx.split(make_model(num_layers=1))
  results, kept = {}, {}
  for remat in ("none", "full", "save_nothing", "save_projections", "save_all_but_attention"):
    graphdef = nnx.graphdef(make_model(num_layers=1, remat=remat))

    def loss(params, graphdef=graphdef):
      (nll_sum, z_sum, _), _ = nnx.merge(graphdef, params).loss_sums(tokens, positions, segments, targets, mask)
      return nll_sum + 0.1 * z_sum

    if remat != "save_nothing":  # the very policy of "full": its residuals below show that
      results[remat] = jax.jit(jax.value_and_grad(loss))(params)
    shapes = _saved_residuals(loss, params)
    sizes = [np.prod([int(n) for n in re.findall(r"\d+", s[s.index("[") :])]) for s in shapes]
    # The xla attention's score-sized tensors are [B, K, G * L, S]: rows a multiple of L = 12, S = 12 columns.
    scores = [s for s in shapes if (m := re.search(r",(\d+),12\]$", s)) and int(m[1]) % 12 == 0]
    kept[remat] = int(sum(sizes)), scores
  want_loss, want_grads = results.pop("none")
  for remat, (got_loss, got_grads) in results.items():
    np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6, err_msg=remat)
    for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7, err_msg=remat)
  assert kept["none"][1], "without remat the attention scores [.., L, S] are kept"
  for remat in results:
    assert not kept[remat][1], f"{remat} keeps attention scores: {kept[remat][1]}"
  assert kept["full"][0] == kept["save_nothing"][0]
  assert kept["full"][0] < kept["save_projections"][0] < kept["save_all_but_attention"][0] < kept["none"][0]


@pytest.mark.parametrize("scan_unroll, remat", [(3, "none"), (2, "save_projections")])
def test_unrolled_layer_scan_gives_the_same_loss_and_gradients(scan_unroll, remat):
  """3 layers per scan iteration (all of them) or 2 (not a divisor of 3, under remat) against one per iteration."""
  rng = np.random.default_rng(9)
  tokens, targets = jnp.asarray(rng.integers(0, 128, (2, 12))), jnp.asarray(rng.integers(0, 128, (2, 12)))
  positions, segments, mask = jnp.tile(jnp.arange(12), (2, 1)), jnp.ones((2, 12), jnp.int32), jnp.ones((2, 12))
  _, params = nnx.split(make_model(num_layers=3))
  results = []
  for unroll in (1, scan_unroll):
    graphdef = nnx.graphdef(make_model(num_layers=3, scan_unroll=unroll, remat=remat))

    def loss(params, graphdef=graphdef):
      (nll_sum, _, _), _ = nnx.merge(graphdef, params).loss_sums(tokens, positions, segments, targets, mask)
      return nll_sum

    results.append(jax.jit(jax.value_and_grad(loss))(params))
  (want_loss, want_grads), (got_loss, got_grads) = results
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-6)
  for got, want in zip(jax.tree.leaves(got_grads), jax.tree.leaves(want_grads)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.fast
def test_host_offload_is_a_config_error_on_cpu():
  from settings import ConfigError
  from tests.helpers import VOCAB, mesh_for, small_config
  from trainer.experiment import build

  cfg = small_config(**{"model.remat": "offload_projections"})
  with pytest.raises(ConfigError, match=r"^config.model.remat='offload_projections' offloads to host memory[^\n]*$"):
    build(cfg, VOCAB, mesh_for(cfg))


def test_gelu_custom_backward_equals_autodiff_of_the_formula():
  """model.mlp.gelu keeps only its input for the backward; its gradient is autodiff's of jax.nn.gelu (tanh)."""
  from model.mlp import gelu

  x = jnp.linspace(-8.0, 8.0, 4001)
  np.testing.assert_array_equal(gelu(x), jax.nn.gelu(x, approximate=True))
  got = jax.vmap(jax.grad(gelu))(x)
  want = jax.vmap(jax.grad(lambda v: jax.nn.gelu(v, approximate=True)))(x)
  np.testing.assert_allclose(got, want, atol=2e-6, rtol=0)


@pytest.mark.parametrize(
  "spec, x_shape, w_shape",
  [
    ("BLD,DF->BLF", (2, 3, 4), (4, 5)),  # MLP, q/k/v as [D, N*H]
    ("BLD,DNH->BLNH", (2, 3, 4), (4, 5, 6)),  # q/k/v
    ("BLNH,NHD->BLD", (2, 3, 4, 5), (4, 5, 6)),  # attention output
    ("BLD,VD->BLV", (2, 3, 4), (7, 4)),  # tied head: the kernel's contracted dimension last
    ("BLD,DF->BLF", (2, 8, 16), (16, 2)),  # narrow output: the weight gradient from dy^T x, transposed
    ("BLD,VD->BLV", (2, 8, 2), (16, 2)),  # wide head: the weight gradient from x^T dy, transposed
    ("BLD,DF->BFL", (2, 3, 4), (4, 5)),  # no 2-D form: a plain einsum
  ],
)
def test_projection_matmul_equals_einsum_in_value_and_gradient(spec, x_shape, w_shape):
  """model.layers.matmul_einsum (one 2-D matmul where the spec allows) against jnp.einsum."""
  from model.layers import matmul_einsum

  kx, kw, kc = jax.random.split(jax.random.key(0), 3)
  x, w = jax.random.normal(kx, x_shape), jax.random.normal(kw, w_shape)
  cotangent = jax.random.normal(kc, jnp.einsum(spec, x, w).shape)
  got, got_vjp = jax.vjp(lambda x, w: matmul_einsum(spec, x, w, platform="cpu"), x, w)
  want, want_vjp = jax.vjp(lambda x, w: jnp.einsum(spec, x, w), x, w)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  for g, r in zip(got_vjp(cotangent), want_vjp(cotangent)):
    np.testing.assert_allclose(g, r, atol=1e-5, rtol=1e-5)


@pytest.mark.fast
@pytest.mark.parametrize("spec, w_shape", [("BLD,DF->BLF", (16, 24)), ("BLD,VD->BLV", (24, 16))])
def test_bf16_projection_accumulates_in_fp32(spec, w_shape):
  """bf16 inputs: the output and both gradients are the fp32 results rounded once to bf16 (every dot accumulates
  in fp32, whichever layout it runs in), within one bf16 rounding of the fp32 einsum of the same values."""
  from model.layers import matmul_einsum

  kx, kw, kc = jax.random.split(jax.random.key(1), 3)
  x = jax.random.normal(kx, (2, 8, 16), jnp.bfloat16)
  w = jax.random.normal(kw, w_shape, jnp.bfloat16)
  cotangent = jax.random.normal(kc, jnp.einsum(spec, x, w).shape, jnp.bfloat16)
  got, got_vjp = jax.vjp(lambda x, w: matmul_einsum(spec, x, w, platform="cpu"), x, w)
  f32 = jnp.float32
  want, want_vjp = jax.vjp(lambda x, w: jnp.einsum(spec, x, w), x.astype(f32), w.astype(f32))
  assert got.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(f32), want, rtol=2**-8, atol=1e-6)
  for g, r in zip(got_vjp(cotangent), want_vjp(cotangent.astype(f32))):
    assert g.dtype == jnp.bfloat16
    np.testing.assert_allclose(g.astype(f32), r, rtol=2**-8, atol=1e-6)


def test_bf16_rope_is_the_rotation_rounded_once_and_its_gradient_the_inverse_rotation():
  """RoPE of bf16 q or k turns each pair (x_i, x_{i + H/2}) by position x theta^(-2i/H), computed in fp32 and
  rounded once to bf16. Its gradient, in bf16 too, turns the cotangent back by the same angle (a rotation's
  transpose is its inverse). Reference: both rotations written out in float64."""
  from model.layers import rope

  kx, kc, kp = jax.random.split(jax.random.key(2), 3)
  x = jax.random.normal(kx, (2, 8, 3, 16), jnp.bfloat16)
  cotangent = jax.random.normal(kc, x.shape, jnp.bfloat16)
  positions = jax.random.randint(kp, (2, 8), 0, 100)
  got, rope_vjp = jax.vjp(lambda x: rope(x, positions, 10_000.0), x)
  (grad,) = rope_vjp(cotangent)

  half = x.shape[-1] // 2
  angle = np.asarray(positions, np.float64)[:, :, None, None] * 10_000.0 ** (-np.arange(half) / half)

  def turn(v, direction):
    v = np.asarray(v.astype(jnp.float32), np.float64)
    v1, v2, sin, cos = v[..., :half], v[..., half:], direction * np.sin(angle), np.cos(angle)
    return np.concatenate([v1 * cos - v2 * sin, v2 * cos + v1 * sin], axis=-1)

  assert got.dtype == grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(got.astype(jnp.float32), turn(x, 1), rtol=2**-8, atol=1e-4)
  np.testing.assert_allclose(grad.astype(jnp.float32), turn(cotangent, -1), rtol=2**-8, atol=1e-4)


def test_projections_of_one_input_keep_it_once_for_the_backward():
  """q, k and v read one activation: the backward of a layer scan keeps what a single projection would, not
  three stacked copies of the input."""
  from model.layers import matmul_einsum

  def saved_activations(projections: int) -> list[str]:
    def layer(h_BxLxD, w_PxDxF):
      x_BxLxD = jnp.tanh(h_BxLxD)
      return h_BxLxD + sum(matmul_einsum("BLD,DF->BLF", x_BxLxD, w_DxF, platform="cpu") for w_DxF in w_PxDxF), None

    def loss(h, w_LxPxDxF):
      return jnp.sum(jax.lax.scan(layer, h, w_LxPxDxF)[0])

    saved = _saved_residuals(loss, jnp.ones((2, 3, 4)), jnp.ones((5, projections, 4, 4)))
    # [layers, B, L, D] or a [layers, B * L, D] view: the activation-sized residuals.
    return [s for s in saved if math.prod(map(int, re.findall(r"\d+", s[s.index("[") :]))) == 5 * 24]

  assert len(saved_activations(3)) == len(saved_activations(1)), saved_activations(3)


def test_bf16_layer_scan_keeps_its_saved_activations_in_bf16():
  """On CPU, XLA computed a layer scan's stacked bf16 residuals in fp32 (whole fp32 stacks before the backward
  loop: twice the memory, and conversions each step). Kept as their bits, the compiled gradient of a bf16
  projection + GELU scan (fp32 weights cast per layer, as in the model) holds no fp32 array of the shape of a
  stacked activation."""
  from model.layers import matmul_einsum
  from model.mlp import gelu

  def layer(h_BxLxD, w_DxD):
    return gelu(matmul_einsum("BLD,DF->BLF", h_BxLxD, w_DxD.astype(jnp.bfloat16), platform="cpu")), None

  def loss(h, w_LxDxD):
    return jnp.sum(jax.lax.scan(layer, h, w_LxDxD)[0].astype(jnp.float32))

  h, w = jnp.ones((2, 8, 16), jnp.bfloat16), jnp.ones((4, 16, 16)) / 16
  hlo = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(h, w).compile().as_text()
  assert "bf16[4,2,8,16]" in hlo or "u16[4,2,8,16]" in hlo  # the activations are stacked
  assert "f32[4,2,8,16]" not in hlo
