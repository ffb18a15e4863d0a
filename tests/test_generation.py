"""Decoding against independent references: the full forward at every position, a naive greedy loop that re-runs
the whole sequence per token, sets of allowed ids computed in numpy, and the scripts against the model itself.

Models are tiny and fp32, with random weights larger than their init, so the next-token distributions are
peaked and greedy choices are not near-ties.
"""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx
from jax.sharding import AxisType, Mesh, PartitionSpec

from generation import Decoder, Sampling, beam_search, generate
from generation.run import load_run, one_device_mesh
from generation.sampling import allowed, sample
from model import ModelConfig
from model.params import abstract_model
from parallel.mesh import MESH_AXES
from parallel.rules import DEFAULT_RULES, parse_rules
from settings import ConfigError
from tests.helpers import small_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_VOCAB = 100  # ids 100..127 are embedding padding
PROMPTS = [[1, 17, 40, 9, 77, 3, 52], [1, 60], [1, 23, 88, 5]]
NEW = 6


def tiny_model_cfg(**changes) -> ModelConfig:
  # Untied: with random tied embeddings the likeliest next token is the current one, and greedy only repeats.
  base = dict(vocab_size=128, max_len=32, num_layers=2, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8)
  base["tie_embeddings"] = False
  return ModelConfig(**{**base, "mlp_dim": 64, **changes})


def random_params(abstract_params, seed: int) -> dict:
  """Random weights of the model's shapes (no init to compile): matrices N(0, 0.15), vectors (norm scales) near 1."""
  rng = np.random.default_rng(seed)

  def one(leaf):
    if len(leaf.shape) > 1 and leaf.shape[-1] > 1:
      return jnp.asarray(rng.normal(0, 0.15, leaf.shape), leaf.dtype)
    return jnp.asarray(1 + rng.normal(0, 0.1, leaf.shape), leaf.dtype)

  return jax.tree.map(one, abstract_params)


def make_decoder(model_cfg: ModelConfig):
  decoder = Decoder(model_cfg, TOKENIZER_VOCAB, one_device_mesh(), parse_rules(DEFAULT_RULES))
  return decoder, jax.device_put(random_params(decoder.abstract_params, 0), decoder.param_shardings)


@pytest.fixture(scope="module")
def dense():
  return make_decoder(tiny_model_cfg(num_kv_heads=1))


def full_logits(decoder, params, sequence) -> np.ndarray:
  """Logits [T, V] of one sequence by the plain forward (no cache): the row padded to max_len with segment 0, so
  one compiled forward serves every length."""
  length = decoder.model_cfg.max_len
  tokens = np.zeros((1, length), np.int32)
  tokens[0, : len(sequence)] = sequence
  segments = (np.arange(length) < len(sequence)).astype(np.int32)[None]
  return np.asarray(decoder.forward(params, tokens, segments))[0, : len(sequence)]


MOE = dict(num_experts=4, top_k=2, moe_every=2, capacity_factor=1.25, num_shared_experts=1)


@pytest.fixture(scope="module")
def moe():
  return make_decoder(tiny_model_cfg(**MOE, position_type="learned"))


@pytest.mark.parametrize("model", ["dense", "moe"])
def test_cached_decoding_equals_the_full_forward_at_every_position(model, request):
  """dense: rope, MQA; moe: a group of a dense and an MoE layer (moe_every 2, a shared expert), learned
  positions, GQA."""
  decoder, params = request.getfixturevalue(model)
  rng = np.random.default_rng(0)
  continuations = rng.integers(4, TOKENIZER_VOCAB, (len(PROMPTS), NEW)).astype(np.int32)
  tokens_BxP = np.zeros((len(PROMPTS), max(map(len, PROMPTS))), np.int32)
  for b, p in enumerate(PROMPTS):
    tokens_BxP[b, : len(p)] = p
  lengths_B = np.array([len(p) for p in PROMPTS], np.int32)
  greedy = Sampling(temperature=0.0)
  key = jax.random.PRNGKey(0)
  cache = decoder.new_cache(len(PROMPTS), tokens_BxP.shape[1] + NEW)
  _, logits_BxV, cache = decoder.prefill(params, tokens_BxP, lengths_B, cache, key, greedy)
  step_logits = [np.asarray(logits_BxV)]
  for t in range(NEW - 1):  # teacher forcing: feed the fixed continuation, not the model's choice
    _, logits_BxV, cache = decoder.step(params, continuations[:, t], lengths_B + t, cache, key, greedy)
    step_logits.append(np.asarray(logits_BxV))
  for b, prompt in enumerate(PROMPTS):
    reference_TxV = full_logits(decoder, params, list(prompt) + continuations[b].tolist())
    for t in range(NEW):
      np.testing.assert_allclose(step_logits[t][b], reference_TxV[len(prompt) - 1 + t], rtol=1e-5, atol=1e-5)
  if model != "dense":
    return  # the prefill's own positions: checked once, on the dense model (one compile less)
  # The prefill itself, at every prompt position (padding slots of short rows excluded).
  segments_BxP = (np.arange(tokens_BxP.shape[1]) < lengths_B[:, None]).astype(np.int32)
  positions_BxP = np.where(segments_BxP == 1, np.arange(tokens_BxP.shape[1]), 0)

  @jax.jit
  def prefill_logits(params, cache):
    model = nnx.merge(decoder.graphdef, nnx.State(params))
    h_BxPxD, _ = model.extend(jnp.asarray(tokens_BxP), jnp.asarray(positions_BxP), jnp.asarray(segments_BxP), cache)
    return model.logits(h_BxPxD)

  prefill_BxPxV = np.asarray(prefill_logits(params, decoder.new_cache(len(PROMPTS), tokens_BxP.shape[1])))
  for b, prompt in enumerate(PROMPTS):
    reference = full_logits(decoder, params, list(prompt))
    np.testing.assert_allclose(prefill_BxPxV[b, : len(prompt)], reference, rtol=1e-5, atol=1e-5)


def test_decoding_on_a_data_expert_tensor_mesh_equals_one_device(moe):
  decoder, params = moe
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(1, 2, 1, 2, 1, 2), MESH_AXES, axis_types=(AxisType.Auto,) * 6)
  sharded = Decoder(decoder.model_cfg, TOKENIZER_VOCAB, mesh, parse_rules(DEFAULT_RULES))
  sharded_params = jax.device_put(jax.device_get(params), sharded.param_shardings)
  cache = sharded.new_cache(4, 8)
  assert cache.k_XxBxSxKxH.sharding.spec == PartitionSpec(None, ("data", "expert"), None, "tensor", None)
  prompts = PROMPTS + [[1, 2]]
  settings = dict(max_new_tokens=NEW, sampling=Sampling(temperature=0.0), stop_ids=[])
  one = generate(decoder, params, prompts, **settings)
  assert [c.tokens for c in generate(sharded, sharded_params, prompts, **settings)] == [c.tokens for c in one]


def naive_greedy(decoder, params, prompt, steps, stop=()) -> list[int]:
  """Re-runs the full forward over the whole sequence for every new token; argmax over the real vocabulary."""
  sequence = list(prompt)
  for _ in range(steps):
    token = int(np.argmax(full_logits(decoder, params, sequence)[-1][:TOKENIZER_VOCAB]))
    if token in stop:
      break
    sequence.append(token)
  return sequence[len(prompt) :]


@pytest.mark.fast
def test_greedy_equals_a_naive_loop_and_beam_width_1_equals_greedy(dense):
  decoder, params = dense
  out = generate(decoder, params, PROMPTS, max_new_tokens=NEW, sampling=Sampling(temperature=0.0), stop_ids=[])
  for prompt, completion in zip(PROMPTS, out):
    assert completion.tokens == naive_greedy(decoder, params, prompt, NEW) and not completion.stopped
  beams = beam_search(decoder, params, PROMPTS, width=1, max_new_tokens=NEW, stop_ids=[TOKENIZER_VOCAB - 1])
  greedy_stopped = [naive_greedy(decoder, params, p, NEW, stop=(TOKENIZER_VOCAB - 1,)) for p in PROMPTS]
  assert [c.tokens for c in beams] == greedy_stopped


def naive_beam_search(decoder, params, prompt, width, steps, stop):
  """Beam search by re-running the full forward for every beam and step: the `width` best of all one-token
  extensions of the unfinished beams and the finished beams as they are. -> (tokens without the stop, score)."""
  beams = [(0.0, [], False)]
  for _ in range(steps):
    candidates = []
    for score, tokens, finished in beams:
      if finished:
        candidates.append((score, tokens, True))
        continue
      logits = full_logits(decoder, params, list(prompt) + tokens)[-1][:TOKENIZER_VOCAB].astype(np.float64)
      logprobs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
      candidates += [(score + logprobs[v], tokens + [v], v in stop) for v in range(TOKENIZER_VOCAB)]
    beams = sorted(candidates, key=lambda c: -c[0])[:width]
    if all(finished for _, _, finished in beams):
      break
  score, tokens, finished = beams[0]
  return (tokens[:-1] if finished else tokens), score


def test_beam_search_equals_a_naive_beam_search(dense):
  decoder, params = dense
  stop = [3, 5]
  beams = beam_search(decoder, params, PROMPTS, width=3, max_new_tokens=NEW, stop_ids=stop)
  for prompt, best in zip(PROMPTS, beams):
    tokens, score = naive_beam_search(decoder, params, prompt, 3, NEW, stop)
    assert best.tokens == tokens
    assert best.score == pytest.approx(score, abs=1e-4)
  assert any(b.stopped for b in beams), "some beam should end on a stop id"


@pytest.mark.fast
def test_stop_tokens_end_a_row_and_are_left_out(dense):
  decoder, params = dense
  greedy = Sampling(temperature=0.0)
  free = generate(decoder, params, PROMPTS, max_new_tokens=NEW, sampling=greedy, stop_ids=[])
  stop_id = free[0].tokens[2]
  seen = []
  out = generate(
    decoder,
    params,
    PROMPTS,
    max_new_tokens=NEW,
    sampling=greedy,
    stop_ids=[stop_id],
    on_token=lambda r, t: seen.append((r, t)),
  )
  for row, (full, completion) in enumerate(zip(free, out)):
    cut = full.tokens.index(stop_id) if stop_id in full.tokens else None
    assert completion.tokens == full.tokens[:cut]
    assert completion.stopped == (cut is not None)
    assert [t for r, t in seen if r == row] == completion.tokens  # streamed as produced, stop id not included
  assert out[0].stopped and len(out[0].tokens) <= 2


def reference_sets(logits, top_k, top_p):
  """The allowed ids by sorting in numpy: top-k by rank, then the smallest nucleus holding top_p."""
  order = np.argsort(-logits, kind="stable")
  kept = order[:top_k] if top_k else order
  probs = np.exp(logits[kept] - logits[kept].max())
  probs /= probs.sum()
  nucleus = []
  total = 0.0
  for token, p in zip(kept, probs):
    nucleus.append(int(token))
    total += p
    if total >= top_p:
      break
  return set(nucleus)


@pytest.mark.fast
@pytest.mark.parametrize("top_k,top_p", [(5, 1.0), (0, 0.6), (8, 0.7), (1, 1.0)])
def test_top_k_and_top_p_never_sample_outside_their_sets(top_k, top_p):
  v, vocab, draws = 40, 32, 4000
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 2.0, v).astype(np.float32)
  logits[vocab:] = 50.0  # padding ids: most likely of all, never allowed
  expected = reference_sets(logits[:vocab], top_k, top_p)
  got = np.asarray(allowed(jnp.asarray(logits[None, :vocab]), top_k, top_p))[0]
  assert set(np.flatnonzero(got).tolist()) == expected
  logits_BxV = jnp.broadcast_to(jnp.asarray(logits), (draws, v))
  sampled = np.asarray(sample(jax.random.PRNGKey(0), logits_BxV, Sampling(1.0, top_k, top_p), vocab))
  assert set(sampled.tolist()) <= expected
  assert set(sampled.tolist()) == expected or len(expected) > 6  # small sets: every member is drawn
  assert int(np.asarray(sample(None, logits_BxV[:1], Sampling(0.0), vocab))[0]) == int(np.argmax(logits[:vocab]))


def test_plain_sampling_is_seeded_and_skips_padding_ids(dense):
  decoder, params = dense
  settings = dict(max_new_tokens=NEW, sampling=Sampling(temperature=1.5), stop_ids=[])
  a = generate(decoder, params, PROMPTS, seed=3, **settings)
  b = generate(decoder, params, PROMPTS, seed=3, **settings)
  c = generate(decoder, params, PROMPTS, seed=4, **settings)
  assert [x.tokens for x in a] == [x.tokens for x in b] != [x.tokens for x in c]
  assert all(0 <= t < TOKENIZER_VOCAB for x in a + c for t in x.tokens)


# A run directory (export format) with a tokenizer.json, and the scripts on it


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """(run directory with checkpoints 3 and 5, an export of other weights, the export's params, ModelConfig)."""
  from tests.test_data import write_hf_tokenizer

  root = tmp_path_factory.mktemp("gen_run")
  run, export = root / "run", root / "export"
  cfg = small_config(**{"data.seq_len": 24, "model.vocab_multiple": 64, "model.tie_embeddings": False})
  for directory in (run, export):
    _, hf = write_hf_tokenizer(directory, config={"bos_token": "<s>", "eos_token": "</s>"})
    (directory / "config.json").write_text(cfg.to_json_best_effort(indent=2))
  vocab = -(-hf.get_vocab_size(with_added_tokens=True) // 64) * 64
  model_cfg = ModelConfig.from_config(cfg.model, cfg.moe, vocab_size=vocab, max_len=24)
  params = random_params(abstract_model(model_cfg)[1], 7)
  # Two checkpoints of a training run (the latest is the default, a step number picks another) and an export.
  items = {run / "checkpoints" / "3" / "state": 0.5, run / "checkpoints" / "5" / "state": 2.0, export / "params": 1.0}
  for path, scale in items.items():
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(str(path), {"params": jax.tree.map(lambda x, s=scale: x * s, params)})
  return run, export, params, model_cfg


def test_load_run_picks_latest_checkpoint_step_or_export(run_dir):
  run, export, params, _ = run_dir
  embed = params["embed_VxD"]
  for workdir, checkpoint, scale in ((run, None, 2.0), (run, "3", 0.5), (run, str(export), 1.0), (export, None, 1.0)):
    loaded = load_run(str(workdir), checkpoint)
    np.testing.assert_allclose(np.asarray(loaded.params["embed_VxD"]), embed * scale, rtol=1e-6)
  assert loaded.tokenizer.kind == "tokenizer.json" and loaded.decoder.vocab_size == loaded.tokenizer.vocab_size
  with pytest.raises(ValueError, match=r"--checkpoint=9: no such step .* available: \[3, 5\]"):
    load_run(str(run), "9")


def test_load_run_takes_the_embedding_rows_the_checkpoint_has(run_dir, tmp_path):
  """Weights padded otherwise than the config pads (converted from elsewhere): the checkpoint's rows count."""
  run, _, _, model_cfg = run_dir
  wide_cfg = dataclasses.replace(model_cfg, vocab_size=model_cfg.vocab_size + 64)
  wide = random_params(abstract_model(wide_cfg)[1], 1)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(str(tmp_path / "wide" / "params"), {"params": wide})
  loaded = load_run(str(run), str(tmp_path / "wide"))
  assert loaded.decoder.model_cfg.vocab_size == wide_cfg.vocab_size
  np.testing.assert_array_equal(np.asarray(loaded.params["head_DxV"]), np.asarray(wide["head_DxV"]))


def script(*args) -> subprocess.CompletedProcess:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
  return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def reference_model(params, model_cfg):
  """The Transformer of `model_cfg` holding `params`, its __call__ jitted."""
  graphdef, _, _ = abstract_model(model_cfg)
  return jax.jit(lambda *inputs: nnx.merge(graphdef, nnx.State(params))(*inputs))


def test_generate_script_streams_greedy_text_and_batches(run_dir, tmp_path):
  _, root, params, model_cfg = run_dir
  loaded = load_run(str(root))
  tok = loaded.tokenizer
  prompt = "def f(x):"
  ids = [tok.bos_id, *tok.encode(prompt)]
  expected = generate(
    loaded.decoder, loaded.params, [ids], max_new_tokens=5, sampling=Sampling(0.0), stop_ids=[tok.eos_id]
  )[0]
  result = script(
    "scripts/generate.py", f"--workdir={root}", f"--prompt={prompt}", "--temperature=0",
    "--max_new_tokens=5",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  assert result.stdout == prompt + tok.decode(expected.tokens) + "\n"
  prompts_file = tmp_path / "prompts.txt"
  prompts_file.write_text("class A:\nreturn x\n")
  result = script(
    "scripts/generate.py", f"--workdir={root}", f"--prompts_file={prompts_file}", "--beam_width=2",
    "--max_new_tokens=3",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  assert result.stdout.count("=== completion") == 2 and "class A:" in result.stdout and "return x" in result.stdout
  with pytest.raises(ConfigError, match=r"nothing/config.json: no such file; pass --workdir a run directory"):
    load_run(str(tmp_path / "nothing"))


def test_score_script_logits_equal_the_model_forward_and_losses(run_dir, tmp_path):
  run, root, params, model_cfg = run_dir
  tok = load_run(str(root)).tokenizer
  model = reference_model(params, model_cfg)
  tokens = np.random.default_rng(0).integers(0, tok.vocab_size, (2, 10)).astype(np.int64)
  np.save(tmp_path / "ids.npy", tokens)
  text = "def f(x):\n    return x * 2\n"
  (tmp_path / "text.txt").write_text(text)
  out = tmp_path / "logits.npy"
  result = script(
    "scripts/score.py", f"--workdir={run}", f"--checkpoint={root}", f"--tokens={tmp_path / 'ids.npy'}",
    f"--logits_out={out}",
  )  # fmt: skip
  assert result.returncode == 0, result.stderr
  positions = jnp.broadcast_to(jnp.arange(10), (2, 10))
  reference = np.asarray(model(jnp.asarray(tokens, jnp.int32), positions, jnp.ones((2, 10), jnp.int32))[0])
  logits = np.load(out)
  assert logits.dtype == np.float32 and logits.shape == (2, 10, tok.vocab_size)
  np.testing.assert_allclose(logits, reference[..., : tok.vocab_size], rtol=1e-4, atol=1e-4)

  result = script(
    "scripts/score.py", f"--workdir={root}", f"--checkpoint={root}", f"--text_file={tmp_path / 'text.txt'}"
  )
  assert result.returncode == 0, result.stderr
  lines = result.stdout.strip().splitlines()
  ids = [tok.bos_id, *tok.encode(text)]
  assert len(ids) - 1 <= 24, "the reference below scores one window"
  row = jnp.asarray([ids[:-1]], jnp.int32)
  ref_logits = np.asarray(model(row, jnp.arange(len(ids) - 1)[None], jnp.ones_like(row))[0][0])[:, : tok.vocab_size]
  ref_losses = -np.asarray(jax.nn.log_softmax(ref_logits, axis=-1))[np.arange(len(ids) - 1), ids[1:]]
  per_token = [line.split("\t") for line in lines[:-1]]
  assert [int(p[1]) for p in per_token] == ids[1:]
  np.testing.assert_allclose([float(p[3]) for p in per_token], ref_losses, atol=2e-4)
  summary = lines[-1].split()
  assert summary[1] == str(len(ids) - 1)
  assert float(summary[5]) == pytest.approx(float(np.exp(ref_losses.mean())), rel=1e-3)
  result = script("scripts/score.py", f"--workdir={root}", f"--tokens={tmp_path / 'ids.npy'}")
  assert result.returncode == 1 and result.stderr == "error: --tokens needs --logits_out OUT.npy, where the logits go\n"


def test_text_stream_prints_whole_characters_that_add_up_to_the_text(tmp_path):
  from data import Tokenizer
  from generation.stream import TextStream
  from tests.test_data import write_hf_tokenizer

  tok = Tokenizer(write_hf_tokenizer(tmp_path, config={"bos_token": "<s>", "eos_token": "</s>"})[0])
  text = "héllo wörld 日本語 🙂 def f(x):\n\treturn x"
  ids = tok.encode(text)
  assert len(ids) > len(text) // 2, "characters must span several byte-level tokens"
  stream = TextStream(tok)
  pieces = [stream.push(i) for i in ids]
  assert "".join(pieces) + stream.flush() == text
  assert not any("\ufffd" in piece for piece in pieces)


def test_export_params_keeps_a_tokenizer_json_and_decodes_like_the_run(run_dir, tmp_path):
  from scripts.export_params import export  # one import per session: the script defines absl flags

  run, _, _, _ = run_dir
  out = tmp_path / "out"
  export(str(run), str(out))
  for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
    assert (out / name).read_bytes() == (run / name).read_bytes(), name
  assert not (out / "tokenizer.model").exists()
  exported, original = load_run(str(out)), load_run(str(run))
  assert exported.tokenizer.eos_id == original.tokenizer.eos_id
  for a, b in zip(jax.tree.leaves(exported.params), jax.tree.leaves(original.params), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_greedy_decoding_of_an_imported_mistral_equals_transformers(tmp_path):
  """A random Hugging Face Mistral with a sliding window shorter than prompt + completion, imported by hf/: the
  cached greedy completion equals argmax over transformers' own full forward, token by token."""
  torch = pytest.importorskip("torch")  # the newest stack has none (compat.py says why)
  transformers = pytest.importorskip("transformers")

  from hf.convert import import_hf
  from tests.test_data import write_hf_tokenizer

  hf_dir, run = tmp_path / "hf", tmp_path / "run"
  config = transformers.MistralConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=384, sliding_window=5,
  )  # fmt: skip
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for p in model.parameters():
      p.mul_(8.0)  # peaked distributions: no near-ties for argmax
  model.eval().save_pretrained(hf_dir)
  write_hf_tokenizer(hf_dir, config={"bos_token": "<s>", "eos_token": "</s>"})
  import_hf(str(hf_dir), str(run))
  loaded = load_run(str(run))
  vocab = loaded.tokenizer.vocab_size
  prompts = [[1, 40, 7, 99, 250, 13, 8], [1, 300, 5]]
  out = generate(loaded.decoder, loaded.params, prompts, max_new_tokens=8, sampling=Sampling(0.0), stop_ids=[])
  for prompt, completion in zip(prompts, out):
    sequence = list(prompt)
    for _ in range(8):
      with torch.no_grad():
        logits = model(torch.as_tensor([sequence])).logits[0, -1, :vocab]
      sequence.append(int(torch.argmax(logits)))
    assert completion.tokens == sequence[len(prompt) :]
    assert len(set(completion.tokens)) > 2, "a completion that only repeats would test little"
