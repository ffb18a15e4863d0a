"""LoRA: adapters start as a no-op, add x A B * alpha / rank, train alone, merge into the base, resume, shard."""

import dataclasses
import functools
import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from model import ModelConfig, lora
from model.params import abstract_model, init_params
from settings import ConfigError
from settings.validate import lora_problem, validate
from storage.checkpoint import CheckpointError, check_lora_base, load_params
from tests.helpers import VOCAB, mesh_for, mini_run_args, packed_batch, small_config
from tests.test_checkpoint import ENV, RUN_STEPS, _losses, assert_sigkill_resume_is_exact
from trainer.experiment import build
from trainer.plan import plan

ALL_TARGETS = tuple(name for name, _, _ in lora.TARGETS.values())
# Each adapter's merged kernel, W + scale * A B, written out per kernel layout with the stacked layer axis X.
_MERGE_SPECS = {
  "lora_q": ("wq_DxNxH", "XDR,XRNH->XDNH"),
  "lora_k": ("wk_DxKxH", "XDR,XRKH->XDKH"),
  "lora_v": ("wv_DxKxH", "XDR,XRKH->XDKH"),
  "lora_o": ("wo_NxHxD", "XNHR,XRD->XNHD"),
  "lora_gate": ("w_gate_DxF", "XDR,XRF->XDF"),
  "lora_up": ("w_up_DxF", "XDR,XRF->XDF"),
  "lora_down": ("w_down_FxD", "XFR,XRD->XFD"),
}


def _model_cfg(**lora_fields) -> ModelConfig:
  cfg = ModelConfig(
    vocab_size=128, max_len=16, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64
  )
  return dataclasses.replace(cfg, **lora_fields)


# One adapter config for the model-level tests (one compilation each of init and forward); its dropout acts
# only when the forward is given a key.
_LORA = {"lora_rank": 4, "lora_alpha": 8.0, "lora_targets": ALL_TARGETS, "lora_dropout": 0.5}


@pytest.fixture(scope="module")
def tokens():
  rng = np.random.default_rng(0)
  tokens_BxL = rng.integers(0, 128, (2, 16))
  positions_BxL = np.tile(np.arange(16), (2, 1))
  return tokens_BxL, positions_BxL, np.ones((2, 16), np.int32)


@functools.cache
def _init(model_cfg: ModelConfig, seed: int) -> dict:
  return jax.device_get(jax.jit(lambda: init_params(model_cfg, seed))())


@functools.cache
def _forward(model_cfg: ModelConfig):
  graphdef = abstract_model(model_cfg)[0]
  return jax.jit(lambda params, batch, key: nnx.merge(graphdef, nnx.State(params))(*batch, dropout_key=key)[0])


def _logits(model_cfg: ModelConfig, params: dict, batch, dropout_key=None) -> np.ndarray:
  return np.asarray(_forward(model_cfg)(params, batch, dropout_key))


def _with_random_b(params: dict, seed: int) -> dict:
  """Non-zero B everywhere (a trained adapter), so the adapters change the output."""
  rng = np.random.default_rng(seed)

  def one(path, x):
    return rng.normal(0, 0.5, x.shape).astype(x.dtype) if lora.is_adapter(path) and path[-1].key == "b" else x

  return jax.tree_util.tree_map_with_path(one, params)


def _naive_merge(params: dict, scale: float) -> dict:
  """W + scale * A B for every adapted kernel with an explicit einsum per layout; adapters dropped."""
  adapters, base = lora.split(jax.device_get(params))
  merged = jax.tree.map(np.array, base)
  for group in ("attn", "mlp"):
    for name, pair in adapters["blocks"][group].items():
      kernel, spec = _MERGE_SPECS[name]
      w = merged["blocks"][group][kernel]
      merged["blocks"][group][kernel] = w + scale * np.einsum(spec, pair["a"], pair["b"])
  return merged


def test_a_new_adapter_leaves_the_base_model_unchanged(tokens):
  plain_cfg, lora_cfg = _model_cfg(), _model_cfg(**_LORA)
  plain, with_lora = _init(plain_cfg, 0), _init(lora_cfg, 0)
  adapters, base = lora.split(with_lora)
  # The adapters draw from a stream of their own: the base is the plain model's init, leaf for leaf.
  assert jax.tree.structure(base) == jax.tree.structure(plain)
  for a, b in zip(jax.tree.leaves(base), jax.tree.leaves(plain)):
    np.testing.assert_array_equal(a, b)
  assert set(adapters["blocks"]["attn"]) == {"lora_q", "lora_k", "lora_v", "lora_o"}
  assert set(adapters["blocks"]["mlp"]) == {"lora_gate", "lora_up", "lora_down"}
  a_q = np.asarray(adapters["blocks"]["attn"]["lora_q"]["a"])
  assert a_q.shape == (2, 32, 4) and not np.allclose(a_q[0], a_q[1])  # each layer draws its own A
  np.testing.assert_allclose(a_q.std(), 1 / np.sqrt(32), rtol=0.2)  # Kaiming: std 1/sqrt(fan_in)
  assert not np.any(np.asarray(adapters["blocks"]["attn"]["lora_o"]["b"]))  # B = 0
  np.testing.assert_array_equal(_logits(lora_cfg, with_lora, tokens), _logits(plain_cfg, plain, tokens))


def test_adapters_add_scaled_low_rank_terms_and_merge_into_the_kernels(tokens):
  lora_cfg = _model_cfg(**_LORA)
  params = _with_random_b(_init(lora_cfg, 0), seed=1)
  want = _naive_merge(params, scale=8.0 / 4)
  merged = lora.merge(params, 8.0 / 4)
  assert jax.tree.structure(merged) == jax.tree.structure(want)
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  got = _logits(lora_cfg, params, tokens)
  reference = _logits(_model_cfg(), want, tokens)
  assert np.abs(got - _logits(lora_cfg, _init(lora_cfg, 0), tokens)).max() > 0.1  # the adapters matter
  np.testing.assert_allclose(got, reference, rtol=1e-4, atol=1e-4)


def test_adapter_dropout_applies_in_training_only(tokens):
  lora_cfg = _model_cfg(**_LORA)
  params = _with_random_b(_init(lora_cfg, 0), seed=2)
  evaluation = _logits(lora_cfg, params, tokens)  # no key: no dropout, the merged model's logits
  np.testing.assert_allclose(evaluation, _logits(_model_cfg(), lora.merge(params, 2.0), tokens), rtol=1e-4, atol=1e-4)
  training = _logits(lora_cfg, params, tokens, dropout_key=jax.random.key(0))
  assert np.abs(training - evaluation).max() > 1e-2


@pytest.mark.fast
def test_only_targeted_projections_get_adapters():
  _, abstract, names = abstract_model(_model_cfg(lora_rank=2, lora_targets=("attn_q", "attn_v")))
  adapters, _ = lora.split(abstract)
  assert jax.tree.map(lambda x: x.shape, adapters) == {
    "blocks": {"attn": {"lora_q": {"a": (2, 32, 2), "b": (2, 2, 4, 8)}, "lora_v": {"a": (2, 32, 2), "b": (2, 2, 2, 8)}}}
  }
  # The adapters carry the logical names of the kernel they adapt, the rank axis unsharded.
  q_names = names["blocks"]["attn"]["lora_q"]
  assert tuple(q_names["a"]) == ("layers", "embed", None)
  assert tuple(q_names["b"]) == ("layers", None, "heads", "head_dim")
  assert lora.parse_targets("q, v") == ("attn_q", "attn_v")


@pytest.mark.parametrize(
  "rank, targets, experts, fragment",
  [
    (4, "q,x", 0, "config.lora.targets='q,x'"),
    (4, "", 0, "config.lora.targets=''"),
    (4, "q,up", 4, "MoE experts take no adapters"),
    (-1, "q", 0, "config.lora.rank=-1"),
  ],
)
def test_config_problems_name_the_key(rank, targets, experts, fragment):
  problem = lora_problem(rank, 16.0, 0.0, targets, experts)
  assert problem is not None and fragment in problem
  assert lora_problem(0, 16.0, 0.0, "nonsense", 4) is None  # off: nothing to check
  assert lora_problem(4, 16.0, 0.0, "q,k,v,o", 4) is None


# The trainer: adapters are the state, the base a frozen input.

_RANK = 4
_LORA_RUN = {"lora.rank": _RANK, "lora.alpha": 8.0, "lora.targets": "q,k,v,o,gate,up,down", "lora.dropout": 0.1}


def _run(cfg, batches: list[dict]):
  """LoRA steps from cfg.train.seed: (losses, state, frozen, experiment); the state's first params kept too."""
  exp = build(cfg, VOCAB, mesh_for(cfg))
  state, frozen = exp.init_state(), exp.load_frozen()
  first = jax.device_get(state.params)
  losses = []
  for batch in batches:
    state, metrics = exp.train_step(state, jax.device_put(batch, exp.batch_sharding), frozen)
    losses.append(float(metrics["loss"]))
  return np.array(losses), first, state, frozen, exp


@pytest.fixture(scope="module")
def batches():
  rng = np.random.default_rng(3)
  return [packed_batch(rng, 8, 16) for _ in range(3)]


@pytest.fixture(scope="module")
def single_device(batches):
  return _run(small_config(**_LORA_RUN), batches)


def test_only_the_adapters_train_and_only_they_have_optimizer_state(single_device, batches):
  losses, first, state, frozen, _ = single_device
  params = jax.device_get(state.params)
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  assert paths and all(lora.is_adapter(path) for path in paths)
  for before, after in zip(jax.tree.leaves(first), jax.tree.leaves(params)):
    assert np.abs(after - before).max() > 0  # every A and B moved (B from zero)
  # B starts at zero, so the first loss is the base model's; the base is the plain model's init of the same seed,
  # untouched by training.
  plain = build(small_config(), VOCAB, mesh_for(small_config()))
  plain_init = jax.device_get(plain.init_state().params)
  nll, tokens = plain.eval_step(plain_init, jax.device_put(batches[0], plain.batch_sharding), {})
  np.testing.assert_allclose(losses[0], float(nll) / float(tokens), rtol=1e-6)
  assert jax.tree.structure(plain_init) == jax.tree.structure(frozen["base"])
  for a, b in zip(jax.tree.leaves(jax.device_get(frozen["base"])), jax.tree.leaves(plain_init)):
    np.testing.assert_array_equal(a, b)
  # Adam's moments exist for the adapters only: every array leaf of the optimizer state is adapter-shaped.
  shapes = sorted(x.shape for x in jax.tree.leaves(params))
  moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
  assert moments == sorted(shapes * 2)  # mu and nu


def test_lora_on_a_mesh_with_fsdp_and_tensor_gives_the_losses_of_one_device(single_device, batches):
  want_losses, _, want_state, _, _ = single_device
  cfg = small_config(**_LORA_RUN, **{"mesh.fsdp": 2, "mesh.tensor": 2})
  losses, _, state, frozen, exp = _run(cfg, batches)
  assert exp.mesh.shape["fsdp"] == 2 and exp.mesh.shape["tensor"] == 2
  # The base is sharded like a full model's parameters: wq [layers, D, N, H] over fsdp (D) and tensor (N).
  wq = frozen["base"]["blocks"]["attn"]["wq_DxNxH"]
  assert wq.sharding.spec[1:3] == ("fsdp", "tensor")
  np.testing.assert_allclose(losses, want_losses, rtol=2e-5)
  for a, b in zip(jax.tree.leaves(jax.device_get(state.params)), jax.tree.leaves(jax.device_get(want_state.params))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_plan_reports_trainable_parameters_and_their_optimizer_state():
  d, q, kv, f = 32, 4 * 8, 2 * 8, 64  # small_config: d_model, query and kv widths, mlp width
  per_layer = _RANK * ((d + q) + 2 * (d + kv) + (q + d) + 3 * (d + f))  # A [in, R] + B [R, out] per target
  plain = small_config(**{"mesh.data": -1})
  exp = build(plain, plain.data.vocab_size, mesh_for(plain))  # the plan sizes the embedding by data.vocab_size
  plain_params = sum(x.size for x in jax.tree.leaves(exp.abstract_params))
  result = plan(small_config(**_LORA_RUN, **{"mesh.data": -1}))
  assert result["trainable_params"] == 2 * per_layer
  assert result["params"] == plain_params + 2 * per_layer
  # Adam keeps two fp32 moments per trained parameter (plus scalar step counts), replicated over `data`.
  assert 0 <= result["opt_state_bytes_per_device"] - 8 * 2 * per_layer <= 64
  assert result["params_bytes_per_device"] == 4 * (plain_params + 2 * per_layer)


@pytest.mark.fast
@pytest.mark.parametrize(
  "change, fragment",
  [
    ({"moe.num_experts": 4, "lora.targets": "q,up"}, "MoE experts take no adapters"),
    ({"checkpoint.init_optimizer_state": True}, "init_optimizer_state=True with LoRA"),
    ({"mesh.stage": 2, "mesh.data": 1}, "LoRA does not run under the pipeline"),
    ({"train.objective": "dpo"}, "with config.train.objective=dpo"),
  ],
)
def test_lora_config_errors_before_anything_is_built(change, fragment):
  """Static problems stop `validate` (before the backend starts), layout ones `build`, before any tracing."""
  cfg = small_config(**{**_LORA_RUN, **change})
  with pytest.raises(ConfigError, match=fragment):
    validate(cfg)
    build(cfg, VOCAB, mesh_for(cfg))


# A LoRA run of train.py: exact resume after SIGKILL, and its exports.

_LORA_ARGS = ["--config.lora.rank=4", "--config.lora.targets=q,v,o,up,down", "--config.lora.dropout=0.1"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, mini_run_cache):
  """A base run (3 steps of the mini model), then an uninterrupted LoRA run on it: (losses, LoRA run, base)."""
  root, cache = tmp_path_factory.mktemp("lora_run"), mini_run_cache
  base = root / "base"
  proc = subprocess.run([sys.executable, *mini_run_args(base, cache, steps=3, every=3)], env=ENV, capture_output=True,
                        text=True)  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  run = root / "run"
  args = mini_run_args(run, cache, steps=RUN_STEPS) + [*_LORA_ARGS, f"--config.checkpoint.init_from={base}"]
  proc = subprocess.run([sys.executable, *args], env=ENV, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"LoRA: the frozen base is {base}" in proc.stderr
  return _losses(run), run, base, cache


@pytest.mark.slow
def test_a_lora_run_resumes_exactly_after_sigkill(lora_run, tmp_path):
  want, _, base, cache = lora_run
  workdir = tmp_path / "run"
  args = mini_run_args(workdir, cache, steps=RUN_STEPS) + [*_LORA_ARGS, f"--config.checkpoint.init_from={base}"]
  assert_sigkill_resume_is_exact(workdir, args, want)


@pytest.mark.slow
def test_export_merges_the_adapters_or_writes_them_alone(lora_run, tmp_path):
  _, run, base, _ = lora_run
  cfg = json.loads((run / "config.json").read_text())
  assert cfg["checkpoint"]["init_from"] == str(base)  # the checkpoint's reference to its base
  for flag in ("--merge", "--adapters_only"):
    proc = subprocess.run(
      [sys.executable, "scripts/export_params.py", f"--run={run}", f"--out={tmp_path / flag[2:]}", flag],
      env=ENV, capture_output=True, text=True,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
  import ml_collections

  run_cfg = ml_collections.ConfigDict(cfg)
  vocab = 512  # the mini run's tokenizer
  make = lambda lora_cfg: ModelConfig.from_config(  # noqa: E731
    run_cfg.model, run_cfg.moe, vocab_size=vocab, max_len=run_cfg.data.seq_len, lora_cfg=lora_cfg
  )
  lora_cfg, plain_cfg = make(run_cfg.lora), make(None)
  adapters_shape, base_shape = lora.split(abstract_model(lora_cfg)[1])
  adapters, _ = load_params(str(run), adapters_shape)
  base_params, _ = load_params(str(base), base_shape)
  merged, _ = load_params(str(tmp_path / "merge"), abstract_model(plain_cfg)[1])  # a plain model's export
  alone, _ = load_params(str(tmp_path / "adapters_only"), adapters_shape)
  for a, b in zip(jax.tree.leaves(alone), jax.tree.leaves(adapters)):
    np.testing.assert_array_equal(a, b)
  described = json.loads((tmp_path / "adapters_only" / "lora.json").read_text())
  assert described == {"rank": 4, "alpha": 16.0, "targets": "q,v,o,up,down", "base": str(base)}
  rng = np.random.default_rng(4)
  batch = (rng.integers(0, vocab, (2, 32)), np.tile(np.arange(32), (2, 1)), np.ones((2, 32), np.int32))
  want = _logits(lora_cfg, lora.combine(adapters, base_params), batch)
  np.testing.assert_allclose(_logits(plain_cfg, merged, batch), want, rtol=1e-4, atol=1e-4)
  assert np.abs(want - _logits(plain_cfg, base_params, batch)).max() > 1e-3  # the adapters were trained

  # Without init_from the base is the random init of train.seed, which the merge rebuilds from the config.
  seeded = tmp_path / "seeded_run"
  shutil.copytree(run, seeded)
  (seeded / "config.json").write_text(json.dumps({**cfg, "checkpoint": {**cfg["checkpoint"], "init_from": ""}}))
  proc = subprocess.run(
    [sys.executable, "scripts/export_params.py", f"--run={seeded}", f"--out={tmp_path / 'seeded_merge'}"],
    env=ENV, capture_output=True, text=True,
  )  # fmt: skip
  assert proc.returncode == 0, proc.stderr[-3000:]
  seeded_merged, _ = load_params(str(tmp_path / "seeded_merge"), abstract_model(plain_cfg)[1])
  _, seed_base = lora.split(_init(lora_cfg, run_cfg.train.seed))
  want = _logits(lora_cfg, lora.combine(adapters, seed_base), batch)
  np.testing.assert_allclose(_logits(plain_cfg, seeded_merged, batch), want, rtol=1e-4, atol=1e-4)


def test_resuming_lora_adapters_on_another_base_is_an_error():
  saved = {"lora": {"rank": 4}, "checkpoint": {"init_from": "runs/base"}, "train": {"seed": 0}}
  check_lora_base(saved, saved, "ckpt/8")  # the same base: fine
  check_lora_base({**saved, "lora": {"rank": 0}}, {**saved, "checkpoint": {"init_from": ""}}, "ckpt/8")  # no LoRA
  with pytest.raises(CheckpointError, match=r"trained on runs/base, but this run's base is runs/other"):
    check_lora_base(saved, {**saved, "checkpoint": {"init_from": "runs/other"}}, "ckpt/8")
  random_base = {**saved, "checkpoint": {"init_from": ""}}
  with pytest.raises(CheckpointError, match=r"random init of train.seed=0, but this run's base is the random init of"):
    check_lora_base(random_base, {**random_base, "train": {"seed": 1}}, "ckpt/8")
