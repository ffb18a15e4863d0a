"""Compression: weight-only int8/int4 quantization (qwix QArrays) against a numpy reference and against the
full-precision model; pruning (magnitude, Wanda, 2:4) and fine-tuning that keeps pruned weights at zero."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from model import quant
from model import sparsity as sp


def _numpy_quantize(w: np.ndarray, reduce_axes: tuple[int, ...], bound: float, lo: int, hi: int):
  """Symmetric absmax quantization: scale = max |w| over `reduce_axes` / bound; q = round(w / scale) clipped.
  Also where w / scale lies on a rounding boundary (x.5, e.g. the absmax itself at 127.5): there the last bit of
  the division decides, and either neighbour is right."""
  scale = np.abs(w).max(axis=reduce_axes, keepdims=True) / bound
  ratio = w / scale
  return np.clip(np.round(ratio), lo, hi), scale, np.abs(np.abs(ratio) % 1 - 0.5) < 1e-4


def _assert_integers(got: np.ndarray, want: np.ndarray, tie: np.ndarray) -> None:
  np.testing.assert_array_equal(got[~tie], want[~tie])
  assert np.abs(got[tie] - want[tie]).max(initial=0) <= 1


@pytest.mark.fast
def test_int8_and_int4_quantize_dequantize_match_numpy():
  """A stacked kernel [layers, D, N, H] (input D): int8 has one scale per layer and output channel (N, H); int4 one
  per group of 16 inputs as well. The integers equal numpy's round(w / scale) and dequantizing gives q * scale."""
  rng = np.random.default_rng(0)
  w = rng.standard_normal((2, 64, 4, 8)).astype(np.float32)

  q8 = quant.quantize_kernel(jnp.asarray(w), "wq_DxNxH", "int8")
  want_q, want_scale, tie = _numpy_quantize(w, (1,), 127.5, -128, 127)
  assert q8.qvalue.dtype == jnp.int8 and q8.scale.shape == (2, 1, 4, 8)
  _assert_integers(np.asarray(q8.qvalue, np.float64), want_q, tie)
  np.testing.assert_allclose(np.asarray(q8.scale), want_scale, rtol=1e-6)
  np.testing.assert_allclose(
    np.asarray(quant.dequantize(q8, jnp.float32)), np.asarray(q8.qvalue) * want_scale, rtol=1e-6
  )

  q4 = quant.quantize_kernel(jnp.asarray(w), "wq_DxNxH", "int4", group_size=16)
  grouped = w.reshape(2, 4, 16, 4, 8)  # D = 4 groups x 16 inputs
  want_q, want_scale, tie = _numpy_quantize(grouped, (2,), 7.5, -8, 7)
  assert q4.qvalue.dtype == jnp.int4 and q4.scale.shape == (2, 4, 4, 8)
  got_q = np.asarray(q4.qvalue.astype(jnp.int8), np.float64).reshape(grouped.shape)
  _assert_integers(got_q, want_q, tie)
  np.testing.assert_allclose(np.asarray(q4.scale), want_scale.reshape(2, 4, 4, 8), rtol=1e-6)
  want = (got_q * want_scale).reshape(w.shape)
  np.testing.assert_allclose(np.asarray(quant.dequantize(q4, jnp.float32)), want, rtol=1e-6)
  # int8 is within half a step of the weight; int4 the same at its coarser step.
  assert np.abs(np.asarray(quant.dequantize(q8, jnp.float32)) - w).max() <= np.abs(w).max() / 127.5 / 2 + 1e-6

  with pytest.raises(ValueError, match="does not split into groups of 24"):
    quant.quantize_kernel(jnp.asarray(w), "wq_DxNxH", "int4", group_size=24)


@pytest.mark.fast
def test_two_four_pruning_keeps_exactly_two_of_every_four_inputs():
  """2:4 on a [layers, F, D] kernel (input F): along the input axis every group of 4 has exactly 2 non-zeros,
  the 2 of highest |W| * ||X||; wanda at 50% keeps half of each output's weights."""
  rng = np.random.default_rng(1)
  w = rng.standard_normal((2, 32, 8)).astype(np.float32)
  norm = rng.uniform(0.1, 5.0, (2, 32)).astype(np.float32)
  pruned = np.asarray(
    sp.prune_params({"w_down_FxD": jnp.asarray(w)}, "2:4", 0.5, {("w_down_FxD",): norm})["w_down_FxD"]
  )
  groups = pruned.reshape(2, 8, 4, 8)
  assert ((groups != 0).sum(axis=2) == 2).all()
  score = (np.abs(w) * norm[:, :, None]).reshape(2, 8, 4, 8)
  kept = np.sort(score, axis=2)[:, :, 2:, :]  # naive: the two largest scores of each group
  np.testing.assert_array_equal(np.sort(np.where(groups != 0, score, 0), axis=2)[:, :, 2:, :], kept)

  wanda = np.asarray(
    sp.prune_params({"w_down_FxD": jnp.asarray(w)}, "wanda", 0.5, {("w_down_FxD",): norm})["w_down_FxD"]
  )
  assert ((wanda != 0).sum(axis=1) == 16).all()


# An imported Hugging Face model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory):
  """(model config, fp32 params, decoder) of a small random Llama imported from transformers; its norm weights
  are perturbed (tests/test_hf.py), so input features differ in scale as in trained models."""
  pytest.importorskip("torch")
  pytest.importorskip("transformers")
  from generation import Decoder
  from generation.run import one_device_mesh
  from hf.convert import import_hf
  from parallel.rules import DEFAULT_RULES, parse_rules
  from tests.test_hf import VOCAB, _run_params, _save_hf_model

  root = tmp_path_factory.mktemp("hf_llama")
  _save_hf_model("llama", str(root / "hf"))
  import_hf(str(root / "hf"), str(root / "run"))
  model_cfg, params = _run_params(str(root / "run"))
  decoder = Decoder(model_cfg, VOCAB, one_device_mesh(), parse_rules(DEFAULT_RULES))
  return model_cfg, params, decoder


def _mean_loss(decoder, params, tokens: np.ndarray) -> float:
  logits = np.asarray(decoder.forward(params, tokens), np.float64)[:, :-1]
  logz = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
  target = np.take_along_axis(logits, tokens[:, 1:, None], axis=-1)[..., 0]
  return float((logz - target).mean())


def test_quantized_generation_agrees_with_full_precision(hf_llama):
  """int8 and int4 (groups of 16) weights of an imported Llama: greedy tokens agree with fp32 at most positions,
  the loss on text the fp32 model wrote (its greedy continuations) rises little, and the device holds fewer bytes."""
  from generation import Sampling, generate

  _, params, decoder = hf_llama
  prompts = [[int(t) for t in row] for row in np.random.default_rng(2).integers(1, 256, (4, 4))]
  greedy = dict(max_new_tokens=12, sampling=Sampling(0.0), stop_ids=[])
  want = np.array([c.tokens for c in generate(decoder, params, prompts, **greedy)])
  text = np.concatenate([np.array(prompts), want], axis=1)  # text the fp32 model writes: it predicts it well
  loss = _mean_loss(decoder, params, text)
  figures = {}
  for mode in ("int8", "int4"):
    q = quant.quantize_params(params, mode, group_size=16)
    got = np.array([c.tokens for c in generate(decoder, q, prompts, **greedy)])
    figures[mode] = ((got == want).mean(), _mean_loss(decoder, q, text) - loss, quant.bytes_per_device(q))
  print(f"fp32 loss {loss:.4f} bytes {quant.bytes_per_device(params)}; (agreement, loss rise, bytes): {figures}")
  assert figures["int8"][0] >= 0.9 and figures["int8"][1] < 0.01 * loss
  assert figures["int4"][0] >= 0.6 and figures["int4"][1] < 0.05 * loss
  assert figures["int4"][2] < figures["int8"][2] < quant.bytes_per_device(params)


# A trained mini run ----------------------------------------------------------------------------------------------

_TRAINED = {"train.steps": 200, "checkpoint.every_steps": 200, "train.eval_every": 200, "train.log_every": 50,
            "model.dropout_rate": 0.0, "mesh.data": -1, "train.global_batch_size": 8}  # fmt: skip


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, mini_run_cache):
  """A mini run (2 layers, d_model 32) trained 200 steps: held-out loss 6.23 at init, about 4.6 at the end."""
  from tests.helpers import mini_run_config
  from trainer.loop import train

  workdir = str(tmp_path_factory.mktemp("compression") / "run")
  train(mini_run_config(mini_run_cache, **_TRAINED), workdir)
  return workdir


def _rescaled_inputs(params: dict, rng: np.random.Generator) -> dict:
  """The same function with input features of different scales, as trained LLMs have (outlier features): each
  norm's scale multiplied per feature by s (log-uniform in [1/30, 30]) and the rows of the projections it feeds
  divided by s."""
  out = jax.tree.map(np.array, params)
  blocks = out["blocks"]
  feeds = {"attn_norm": ("attn", ("wq_DxNxH", "wk_DxKxH", "wv_DxKxH")), "mlp_norm": ("mlp", ("w_gate_DxF", "w_up_DxF"))}
  for norm, (module, kernels) in feeds.items():
    s = np.exp(rng.uniform(np.log(1 / 30), np.log(30), blocks[norm]["scale"].shape)).astype(np.float32)
    blocks[norm]["scale"] = blocks[norm]["scale"] * s
    for name in kernels:
      w = blocks[module][name]
      blocks[module][name] = w / s.reshape(s.shape + (1,) * (w.ndim - 2))
  return out


def test_wanda_at_half_loses_less_than_magnitude_where_input_scales_differ(trained_run):
  """On the trained run made to have input features of different scales by a rescaling that leaves its function
  unchanged (`_rescaled_inputs`), 50% Wanda loses less held-out loss than 50% magnitude. Wanda's score
  |W| * ||X|| does not see the rescaling (its pruned model keeps the loss of pruning the original); |W| does."""
  from model.params import abstract_model
  from parallel.partition import with_shardings
  from scripts.prune import eval_loss, pruned_params, run_batches
  from storage.run import open_run

  run = open_run(trained_run)
  graphdef, abstract, _ = abstract_model(run.model_cfg)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  params = run.load_params(with_shardings(abstract, jax.tree.map(lambda _: device, abstract)))
  held_out, calibration = run_batches(run, 4)
  rescaled = _rescaled_inputs(params, np.random.default_rng(0))
  loss = eval_loss(graphdef, params, held_out)
  assert abs(eval_loss(graphdef, rescaled, held_out) - loss) < 1e-4  # the same model
  after = {m: eval_loss(graphdef, pruned_params(graphdef, rescaled, m, 0.5, calibration), held_out)
           for m in ("magnitude", "wanda")}  # fmt: skip
  wanda_original = eval_loss(graphdef, pruned_params(graphdef, params, "wanda", 0.5, calibration), held_out)
  print(f"held-out loss {loss:.4f}; 50% pruned: {after}, Wanda on the original {wanda_original:.4f}")
  assert abs(after["wanda"] - wanda_original) < 1e-3
  assert loss < after["wanda"] < after["magnitude"] - 0.05


def test_two_four_run_fine_tuned_keeps_pruned_weights_zero(trained_run, tmp_path, mini_run_cache):
  """scripts/prune.py --method 2:4 on the trained run writes a run that checkpoint.init_from takes; fine-tuning it
  with train.keep_sparsity keeps every pruned weight at zero while the others train."""
  from generation.run import load_run
  from scripts.prune import prune
  from tests.helpers import mini_run_config
  from trainer.loop import train

  figures = prune(trained_run, str(tmp_path / "2:4"), "2:4", 0.5, calibration_batches=4)
  assert figures["sparsity"] == 0.5 and figures["eval_loss_after"] > figures["eval_loss_before"]
  assert json.loads((tmp_path / "2:4" / "prune.json").read_text())["method"] == "2:4"
  pruned = load_run(str(tmp_path / "2:4")).params
  overrides = {**_TRAINED, "train.steps": 3, "checkpoint.every_steps": 3, "train.eval_every": 3,
               "checkpoint.init_from": str(tmp_path / "2:4"), "train.keep_sparsity": True}  # fmt: skip
  train(mini_run_config(mini_run_cache, **overrides), str(tmp_path / "tuned"))
  tuned = load_run(str(tmp_path / "tuned")).params
  for path, before in jax.tree_util.tree_leaves_with_path(pruned):
    after = tuned
    for key in path:
      after = after[key.key]
    before, after = np.asarray(before), np.asarray(after)
    if path[-1].key in quant.PROJECTIONS:
      assert (after[before == 0] == 0).all(), path
      assert (after[before != 0] != before[before != 0]).mean() > 0.9, path  # the kept weights trained


def test_quantized_run_and_export_load_with_fewer_bytes(trained_run, tmp_path):
  """--quantize on loading the trained run, and a quantized export loaded back: the same QArrays, fewer bytes on
  the device than fp32, and held-out scoring close to fp32's."""
  from generation.run import load_run
  from scripts.export_params import export
  from storage.checkpoint import CheckpointError, load_params

  full = load_run(trained_run)
  int8 = load_run(trained_run, quantize="int8")
  export(trained_run, str(tmp_path / "int4"), quantize="int4", group_size=16)
  int4 = load_run(str(tmp_path / "int4"))
  assert int4.quantize == "int4"
  same = jax.tree.map(np.array_equal, int4.params, quant.quantize_params(full.params, "int4", 16))
  assert all(jax.tree.leaves(same))
  assert int4.params_bytes_per_device < int8.params_bytes_per_device < full.params_bytes_per_device
  tokens = np.random.default_rng(0).integers(0, full.tokenizer.vocab_size, (2, 32))
  want = np.asarray(full.decoder.forward(full.params, tokens))
  for loaded in (int8, int4):
    got = np.asarray(loaded.decoder.forward(loaded.params, tokens))
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.8, loaded.quantize
  # Training never starts from the quantized weights: init_from refuses the export in one line.
  with pytest.raises(CheckpointError, match="is an export quantized to int4"):
    load_params(str(tmp_path / "int4"), full.params)


# QLoRA: a LoRA run whose frozen base is held quantized ------------------------------------------------------------

_QLORA = {"lora.rank": 4, "lora.alpha": 8.0, "lora.targets": "q,k,v,o,gate,up,down", "lora.base_quant": "nf4",
          "lora.base_group_size": 8}  # fmt: skip


def test_qlora_trains_adapters_on_a_sharded_quantized_base():
  """An nf4 base on fsdp=2 x tensor=2: the base's kernels are QArrays sharded as the kernels are, the first loss
  is the dequantized base model's, repeated steps on one batch lower the loss, and Adam holds moments of the
  adapters only."""
  from tests.helpers import VOCAB, mesh_for, packed_batch, small_config
  from trainer.experiment import build

  cfg = small_config(**_QLORA, **{"mesh.fsdp": 2, "mesh.tensor": 2})
  exp = build(cfg, VOCAB, mesh_for(cfg))
  state, frozen = exp.init_state(), exp.load_frozen()
  wq = frozen["base"]["blocks"]["attn"]["wq_DxNxH"]
  assert quant.is_quantized(wq) and wq.qvalue.dtype == jnp.uint4
  assert wq.qvalue.sharding.spec[1:3] == ("fsdp", "tensor")
  batch = jax.device_put(packed_batch(np.random.default_rng(0), 8, 16), exp.batch_sharding)
  losses = []
  for _ in range(4):
    state, metrics = exp.train_step(state, batch, frozen)
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses

  plain_cfg = small_config(**{"mesh.fsdp": 2, "mesh.tensor": 2})
  plain = build(plain_cfg, VOCAB, mesh_for(plain_cfg))
  base = jax.device_put(quant.dequantize_params(frozen["base"]), plain.shardings.params)
  nll, tokens = plain.eval_step(base, jax.device_put(batch, plain.batch_sharding), {})
  np.testing.assert_allclose(losses[0], float(nll) / float(tokens), rtol=1e-5)
  shapes = sorted(x.shape for x in jax.tree.leaves(state.params))
  assert all(
    str(getattr(p[-2], "key", "")).startswith("lora_") for p, _ in jax.tree_util.tree_leaves_with_path(state.params)
  )
  assert sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim > 0) == sorted(shapes * 2)


def test_qlora_run_resumes_exactly(trained_run, tmp_path, mini_run_cache):
  """An int4 QLoRA run on the trained run, stopped after its checkpoint at step 3 and resumed, logs the losses of
  the uninterrupted run."""
  from tests.helpers import mini_run_config
  from trainer.loop import train

  overrides = {**_TRAINED, **_QLORA, "lora.base_quant": "int4", "checkpoint.init_from": trained_run,
               "train.steps": 6, "checkpoint.every_steps": 3, "train.eval_every": 6, "train.log_every": 1}  # fmt: skip

  def losses(workdir):
    lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}

  train(mini_run_config(mini_run_cache, **overrides), str(tmp_path / "whole"))
  train(mini_run_config(mini_run_cache, **{**overrides, "train.steps": 3}), str(tmp_path / "resumed"))
  train(mini_run_config(mini_run_cache, **overrides), str(tmp_path / "resumed"))
  want, got = losses(tmp_path / "whole"), losses(tmp_path / "resumed")
  assert sorted(got) == list(range(1, 7)) and got == want
  assert want[6] < want[1]


# Quantized training (model.quant) ----------------------------------------------------------------------------------


@pytest.mark.fast
def test_int8_training_dot_matches_numpy():
  """model.quant=int8's matmul: x quantized per token and w per output channel (absmax / 127.5), an integer
  matmul, then both scales: numpy's same computation, for both kernel layouts."""
  rng = np.random.default_rng(5)
  x, w = rng.standard_normal((6, 32)).astype(np.float32), rng.standard_normal((32, 8)).astype(np.float32)
  qx, sx, tie_x = _numpy_quantize(x, (1,), 127.5, -128, 127)
  qw, sw, tie_w = _numpy_quantize(w, (0,), 127.5, -128, 127)
  want = (qx @ qw) * sx * sw
  # A value on a rounding boundary (each row's and column's absmax, at +-127.5) may round either way: one step of
  # it may move the output by its scale times the other operand.
  slack = ((tie_x * sx) @ np.abs(qw * sw) + np.abs(qx * sx) @ (tie_w * sw)) * 1.01 + 1e-5 * np.abs(want)
  for got in (quant.qt_dot("int8", jnp.asarray(x), jnp.asarray(w), True),
              quant.qt_dot("int8", jnp.asarray(x), jnp.asarray(w.T), False)):  # fmt: skip
    assert (np.abs(np.asarray(got) - want) <= slack).all()
  assert np.abs(want - x @ w).max() > slack.max()  # the slack is far below the quantization's own error


def test_quantized_training_tracks_the_full_precision_losses():
  """model.quant=fp8 (e4m3 forward, e5m2 gradients; int8 shares its path, `test_int8_training_dot_matches_numpy`):
  three steps on one batch give losses within 0.01 of compute_dtype's (fp32), falling; an unknown mode is a
  one-line error."""
  from settings import ConfigError
  from settings.validate import validate
  from tests.helpers import packed_batch, run_steps, small_config

  batch = packed_batch(np.random.default_rng(0), 8, 16)
  want, _, _ = run_steps(small_config(), [batch] * 3)
  got, _, _ = run_steps(small_config(**{"model.quant": "fp8"}), [batch] * 3)
  np.testing.assert_allclose(got, want, atol=0.01)
  assert got[-1] < got[0] - 0.1, got
  with pytest.raises(ConfigError, match="config.model.quant='int4' must be int8, fp8"):
    validate(small_config(**{"model.quant": "int4"}))
