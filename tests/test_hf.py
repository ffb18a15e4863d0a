"""Hugging Face import/export against transformers itself: for each supported family a small random model
(norm weights perturbed, so ones hide no mistake) is saved, imported, and kiln's fp32 logits must equal
transformers' eager fp32 logits; export gives back every tensor bit for bit, and a kiln-native model exported
loads in transformers with kiln's logits. Unsupported inputs are one-line errors."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open

from configs.base import base_config
from hf.config import export_family
from hf.convert import _params_dir, export_hf, import_hf
from model.config import ModelConfig
from model.params import abstract_model
from parallel.partition import with_shardings
from settings import ConfigError
from storage.checkpoint import CheckpointError, load_params
from storage.run import model_config

# The newest stack has no torch (compat.py says why); the pinned one always has both.
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

B, T, VOCAB = 2, 16, 256
_SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB)
LLAMA3_ROPE = {
  "rope_type": "llama3",
  "rope_theta": 500000.0,
  "factor": 8.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  # Short enough that at T=16 and head_dim 16 the frequencies fall in all three llama3 bands.
  "original_max_position_embeddings": 16,
}
FAMILIES = {
  # Llama 3.1-style scaling, tied embeddings (3.2), and attention biases on q, k, v and o.
  "llama": lambda: transformers.LlamaConfig(
    **_SMALL, num_key_value_heads=2, tie_word_embeddings=True, attention_bias=True, rope_parameters=LLAMA3_ROPE
  ),
  "mistral": lambda: transformers.MistralConfig(**_SMALL, num_key_value_heads=2, sliding_window=5),
  "qwen3": lambda: transformers.Qwen3Config(**_SMALL, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
  "mixtral": lambda: transformers.MixtralConfig(
    **_SMALL, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2
  ),
  "qwen3_moe": lambda: transformers.Qwen3MoeConfig(
    **_SMALL,
    num_key_value_heads=2,
    head_dim=16,
    num_experts=4,
    num_experts_per_tok=2,
    moe_intermediate_size=48,
    decoder_sparse_step=2,
    norm_topk_prob=False,
    tie_word_embeddings=False,
  ),
}


def _tokens() -> np.ndarray:
  return np.random.default_rng(0).integers(0, VOCAB, (B, T))


def _hf_logits(model, tokens: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    return model(torch.as_tensor(tokens)).logits.float().numpy()


def _run_params(run: str) -> tuple[ModelConfig, dict]:
  """The kiln model config and parameters of a run directory, loaded the way init_from loads them."""
  saved = json.load(open(os.path.join(run, "config.json")))
  cfg = ml_collections.ConfigDict(saved)
  params_dir = _params_dir(run)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  import orbax.checkpoint as ocp

  vocab = ocp.StandardCheckpointer().metadata(params_dir).item_metadata.tree["params"]["embed_VxD"].shape[0]
  model_cfg = model_config(cfg, vocab)
  _, abstract, _ = abstract_model(model_cfg)
  abstract = with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
  params, _ = load_params(run, abstract)
  return model_cfg, params


def _kiln_logits(model_cfg: ModelConfig, params: dict, tokens: np.ndarray) -> np.ndarray:
  graphdef, _, _ = abstract_model(model_cfg)

  @jax.jit
  def forward(params, tokens_BxT):
    model = nnx.merge(graphdef, nnx.State(params))
    positions_BxT = jnp.broadcast_to(jnp.arange(T), (B, T))
    return model(tokens_BxT, positions_BxT, jnp.ones((B, T), jnp.int32))[0]

  return np.asarray(forward(params, jnp.asarray(tokens)))


def _save_hf_model(family: str, hf_dir: str):
  """A small random `family` model saved to `hf_dir` (float32); returns the model."""
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(
    FAMILIES[family](), attn_implementation="eager", dtype=torch.float32
  )
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.5 * torch.randn_like(p))  # not ones: a misplaced norm weight must show in the logits
      elif "bias" in name:
        p.normal_(0.0, 0.1)
  model.eval()
  model.save_pretrained(hf_dir)
  return model


@pytest.fixture(scope="module", params=list(FAMILIES))
def imported(request, tmp_path_factory):
  """(family, HF directory, HF model, kiln run directory) for a small random model of each family."""
  family = request.param
  root = tmp_path_factory.mktemp(family)
  hf_dir, run = str(root / "hf"), str(root / "run")
  model = _save_hf_model(family, hf_dir)
  import_hf(hf_dir, run)
  return family, hf_dir, model, run


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> str:
  hf_dir = str(tmp_path_factory.mktemp("llama_only") / "hf")
  _save_hf_model("llama", hf_dir)
  return hf_dir


def test_imported_model_gives_transformers_logits(imported):
  family, _, model, run = imported
  model_cfg, params = _run_params(run)
  tokens = _tokens()
  want = _hf_logits(model, tokens)
  got = _kiln_logits(model_cfg, params, tokens)
  assert got.shape == want.shape == (B, T, VOCAB), family
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=family)


def test_imported_config_is_a_full_kiln_config(imported):
  family, _, model, run = imported
  saved = json.load(open(os.path.join(run, "config.json")))
  assert set(saved) >= set(base_config()), "config.json lacks config groups"
  assert saved["model"]["vocab_multiple"] == VOCAB  # no padded rows
  # RUN/config.py is that config for train.py, starting from the imported parameters.
  from settings.load import load_config_file
  from settings.validate import validate

  cfg = load_config_file(os.path.join(run, "config.py"))
  validate(cfg)
  assert cfg.checkpoint.init_from == os.path.abspath(run)
  assert cfg.model.to_dict() == saved["model"] and cfg.moe.to_dict() == saved["moe"]
  assert saved["model"]["qk_norm"] == family.startswith("qwen3")
  assert saved["model"]["sliding_window"] == (5 if family == "mistral" else 0)
  assert saved["model"]["tie_embeddings"] == (family == "llama")
  if family in ("mixtral", "qwen3_moe"):
    assert saved["moe"]["capacity_factor"] == 0 and saved["moe"]["num_experts"] == 4
    assert saved["moe"]["every"] == (2 if family == "qwen3_moe" else 1)
    assert saved["moe"]["renormalize_gates"] == (family == "mixtral")


def test_export_of_an_import_gives_back_every_tensor_exactly(imported, tmp_path):
  family, hf_dir, model, run = imported
  out = str(tmp_path / "export")
  export_hf(run, out)
  with safe_open(os.path.join(hf_dir, "model.safetensors"), "numpy") as want:
    with safe_open(os.path.join(out, "model.safetensors"), "numpy") as got:
      assert set(got.keys()) == set(want.keys()), family
      for name in want.keys():
        a, b = want.get_tensor(name), got.get_tensor(name)
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), f"{family}: {name}"
  exported = json.load(open(os.path.join(out, "config.json")))
  assert exported["architectures"] == json.load(open(os.path.join(hf_dir, "config.json")))["architectures"]
  assert os.path.isfile(os.path.join(out, "generation_config.json"))  # tokenizer-side files travel along
  original = json.load(open(os.path.join(hf_dir, "config.json")))
  for key in ("max_position_embeddings", "bos_token_id", "eos_token_id", "vocab_size", "num_key_value_heads"):
    assert exported[key] == original[key], (family, key)
  # The exported config.json means the same model to transformers.
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
  assert type(reloaded) is type(model)
  tokens = _tokens()
  np.testing.assert_array_equal(_hf_logits(reloaded.eval(), tokens), _hf_logits(model, tokens), err_msg=family)


def _kiln_run(tmp_path, **overrides) -> str:
  """A kiln-native run directory: base config + overrides, random parameters in `params/`."""
  import orbax.checkpoint as ocp

  cfg = base_config()
  cfg.model.update(num_layers=2, d_model=64, num_heads=4, num_kv_heads=2, mlp_dim=96, vocab_multiple=64)
  for key, value in overrides.items():
    group, name = key.split(".")
    cfg[group][name] = value
  cfg.data.seq_len = T
  model_cfg = model_config(cfg, 192)
  # Random weights straight from the shapes (no init to compile); norms near, not at, one.
  _, abstract, _ = abstract_model(model_cfg)
  rng = np.random.default_rng(1)

  def random_leaf(path, s):
    noise = rng.normal(size=s.shape).astype(np.float32)
    return 1.0 + 0.3 * noise if "norm" in jax.tree_util.keystr(path) else 0.1 * noise

  params = jax.tree_util.tree_map_with_path(random_leaf, abstract)
  run = str(tmp_path / "run")
  os.makedirs(run)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(os.path.join(run, "params")), {"params": params})
  with open(os.path.join(run, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort())
  return run


@pytest.mark.parametrize(
  "overrides,family,max_shard_bytes",
  [
    (
      {"model.tie_embeddings": False, "model.rope_scaling_type": "linear", "model.rope_scaling_factor": 2.0},
      "llama",
      1 << 16,
    ),
    (
      {
        "model.qk_norm": True,
        "moe.num_experts": 4,
        "moe.every": 2,
        "moe.expert_mlp_dim": 32,
        "moe.capacity_factor": 0.0,
      },
      "qwen3_moe",
      5 << 30,
    ),
  ],
  ids=["dense_sharded", "moe"],
)
def test_kiln_model_exported_loads_in_transformers_with_the_same_logits(tmp_path, overrides, family, max_shard_bytes):
  run = _kiln_run(tmp_path, **overrides)
  out = str(tmp_path / "hf")
  summary = export_hf(run, out, max_shard_bytes=max_shard_bytes)
  assert summary["family"] == family
  sharded = max_shard_bytes < (1 << 20)
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json")) == sharded
  model = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager", dtype=torch.float32)
  model.eval()
  model_cfg, params = _run_params(run)
  tokens = np.random.default_rng(2).integers(0, 192, (B, T))
  np.testing.assert_allclose(_hf_logits(model, tokens), _kiln_logits(model_cfg, params, tokens), atol=1e-4, rtol=1e-4)


def _write_hf_config(tmp_path, family: str, **changes) -> str:
  hf = FAMILIES[family]().to_dict()
  hf.update(changes)
  directory = tmp_path / f"hf_{family}"
  directory.mkdir()
  (directory / "config.json").write_text(json.dumps(hf))
  return str(directory)


@pytest.mark.parametrize(
  "family,changes,words",
  [
    ("llama", {"architectures": ["GPT2LMHeadModel"]}, "GPT2LMHeadModel"),
    ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu'"),
    ("llama", {"mlp_bias": True}, "mlp_bias"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "'yarn'"),
    ("llama", {"rope_parameters": {"rope_type": "dynamic", "rope_theta": 1e4, "factor": 4.0}}, "'dynamic'"),
    ("qwen3", {"use_sliding_window": True}, "use_sliding_window"),
    ("qwen3_moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
    ("qwen3_moe", {"decoder_sparse_step": 3}, "decoder_sparse_step"),
  ],
)
def test_unsupported_hugging_face_configs_are_one_line_errors(tmp_path, family, changes, words):
  hf_dir = _write_hf_config(tmp_path, family, **changes)
  with pytest.raises(ConfigError, match=r"^[^\n]*$") as error:
    import_hf(hf_dir, str(tmp_path / "run"))
  assert words in str(error.value)
  assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize(
  "field,value",
  [
    ("model.norm_type", "layernorm"),
    ("model.mlp_type", "gelu"),
    ("model.position_type", "learned"),
    ("model.attention_bias", True),  # q/k/v biases without the output bias
  ],
)
def test_kiln_models_without_hugging_face_equivalent_are_one_line_errors(field, value):
  cfg = base_config()
  group, name = field.split(".")
  cfg[group][name] = value
  with pytest.raises(ConfigError, match=rf"^config\.{field}=[^\n]*no Hugging Face equivalent[^\n]*$"):
    export_family(model_config(cfg, 128))


def test_bad_paths_are_one_line_errors(tmp_path):
  (tmp_path / "taken").mkdir()
  with pytest.raises(CheckpointError, match=r"^[^\n]*exists[^\n]*$"):
    import_hf(str(tmp_path), str(tmp_path / "taken"))  # never overwrites
  with pytest.raises(CheckpointError, match=r"^[^\n]*config.json does not exist[^\n]*$"):
    import_hf(str(tmp_path), str(tmp_path / "run"))
  no_weights = _write_hf_config(tmp_path, "llama")
  with pytest.raises(CheckpointError, match=r"^[^\n]*neither model.safetensors.index.json nor[^\n]*$"):
    import_hf(no_weights, str(tmp_path / "run"))
  with pytest.raises(CheckpointError, match=r"^[^\n]*config.json does not exist[^\n]*$"):
    export_hf(str(tmp_path), str(tmp_path / "out"))
  (tmp_path / "config.json").write_text(base_config().to_json())
  with pytest.raises(CheckpointError, match=r"^[^\n]*holds no checkpoints[^\n]*$"):
    export_hf(str(tmp_path), str(tmp_path / "out"))


def test_script_prints_one_error_line_and_exits_1(tmp_path):
  hf_dir = _write_hf_config(tmp_path, "llama", hidden_act="relu")
  script = os.path.join(os.path.dirname(os.path.dirname(__file__)), "scripts", "convert_hf.py")
  result = subprocess.run(
    [sys.executable, script, "--hf_dir", hf_dir, "--out", str(tmp_path / "run")],
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
  )
  assert result.returncode == 1
  lines = result.stderr.strip().splitlines()
  assert lines[-1].startswith("error: Hugging Face config hidden_act='relu'"), result.stderr


def test_bfloat16_import_and_export_round_to_nearest_even(llama_dir, tmp_path):
  run, out = str(tmp_path / "run"), str(tmp_path / "hf")
  import_hf(llama_dir, run, dtype="bfloat16")
  saved = json.load(open(os.path.join(run, "config.json")))
  assert saved["model"]["param_dtype"] == "bfloat16" and saved["model"]["allow_low_precision_params"]
  export_hf(run, out)  # keeps the stored dtype
  assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
  with safe_open(os.path.join(llama_dir, "model.safetensors"), "pt") as want:
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as got:
      for name in want.keys():
        # torch's own float32 -> bfloat16 conversion is the reference rounding.
        assert torch.equal(got.get_tensor(name), want.get_tensor(name).to(torch.bfloat16)), name


def test_weights_that_do_not_match_the_config_are_one_line_errors(llama_dir, tmp_path):
  from safetensors.numpy import load_file, save_file

  tensors = load_file(os.path.join(llama_dir, "model.safetensors"))
  config = open(os.path.join(llama_dir, "config.json")).read()
  cases = {
    "extra": ({**tensors, "model.layers.0.mlp.up_proj.bias": np.zeros(128, np.float32)}, "does not use"),
    "missing": ({k: v for k, v in tensors.items() if "layers.1.mlp.up_proj" not in k}, "has no tensor"),
    "shape": ({**tensors, "model.norm.weight": np.ones(32, np.float32)}, "has shape [32], the config implies [64]"),
  }
  for case, (weights, words) in cases.items():
    hf_dir = tmp_path / case
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text(config)
    save_file(weights, str(hf_dir / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"^[^\n]*$") as error:
      import_hf(str(hf_dir), str(tmp_path / f"run_{case}"))
    assert words in str(error.value), case
    assert not os.path.exists(tmp_path / f"run_{case}"), case


def test_greedy_generation_equals_transformers_generate(imported):
  """kiln's cached greedy decoding of the imported model, two prompts of different lengths in one batch, gives
  the tokens of transformers' own `generate(do_sample=False)`."""
  from generation import Decoder, Sampling, generate
  from generation.run import one_device_mesh
  from parallel.rules import DEFAULT_RULES, parse_rules

  family, _, model, run = imported
  model_cfg, params = _run_params(run)
  decoder = Decoder(model_cfg, VOCAB, one_device_mesh(), parse_rules(DEFAULT_RULES))
  prompts = [[3, 40, 7, 99, 250, 13, 8], [200, 5]]
  new = 6
  got = generate(decoder, params, prompts, max_new_tokens=new, sampling=Sampling(0.0), stop_ids=[])
  for prompt, completion in zip(prompts, got, strict=True):
    with torch.no_grad():
      out = model.generate(
        torch.as_tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False, eos_token_id=None,
        pad_token_id=0,
      )  # fmt: skip
    assert completion.tokens == out[0, len(prompt) :].tolist(), family
