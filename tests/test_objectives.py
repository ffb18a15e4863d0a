"""Fine-tuning objectives (sft, dpo, distill): their data, their losses against formulas, their training runs."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data import chat
from data.packing import to_model_inputs
from data.preference import load_preferences
from data.sft import load_conversations
from objectives import distill, dpo
from objectives.losses import model_logits


class ByteTokenizer:
  """One id per UTF-8 byte (4 + byte) and the specials of a kiln tokenizer: the reference encoding is obvious."""

  bos_id, eos_id, pad_id, vocab_size = 2, 3, 0, 260

  def encode(self, text: str) -> list[int]:
    return [4 + b for b in text.encode()]

  def decode(self, ids) -> str:
    return bytes(int(i) - 4 for i in ids if i >= 4).decode()


TOKENIZER = ByteTokenizer()

SFT_LINES = [
  {"prompt": "2+2?", "response": "4"},
  {"system": "Be terse.", "prompt": "Capital of Peru?", "response": "Lima."},
  {
    "messages": [
      {"role": "user", "content": "Hi"},
      {"role": "assistant", "content": "Hello!"},
      {"role": "user", "content": "Bye"},
      {"role": "assistant", "content": "Goodbye."},
    ]
  },
  {"prompt": "Name a colour.", "response": "Red"},
  {"prompt": "Count to three.", "response": "One, two, three."},
]


def _write_jsonl(path, lines) -> str:
  path.write_text("".join(json.dumps(line) + "\n" for line in lines))
  return str(path)


def _data_cfg(files: str, seq_len: int = 64, template: str = "chatml"):
  from configs.base import base_config

  cfg = base_config().data
  cfg.files, cfg.seq_len, cfg.chat_template = files, seq_len, template
  return cfg


def _expected_weights(text_pieces: list[tuple[str, str]]) -> tuple[list[int], list[float]]:
  """Reference: bytes of each (text, who) piece; weight 1 on the assistant's content and its end marker."""
  tokens, weights = [], []
  for text, who in text_pieces:
    ids = TOKENIZER.encode(text)
    tokens += ids
    weights += [1.0 if who == "assistant" else 0.0] * len(ids)
  return tokens, weights


def test_chatml_trains_only_on_assistant_turns(tmp_path):
  files = _write_jsonl(tmp_path / "sft.jsonl", SFT_LINES[1:3])
  conversations = load_conversations(_data_cfg(files), TOKENIZER)
  want_1 = _expected_weights(
    [
      ("<|im_start|>system\n", "markup"),
      ("Be terse.<|im_end|>\n", "system"),
      ("<|im_start|>user\n", "markup"),
      ("Capital of Peru?<|im_end|>\n", "user"),
      ("<|im_start|>assistant\n", "markup"),
      ("Lima.<|im_end|>\n", "assistant"),
    ]
  )
  want_2 = _expected_weights(
    [
      ("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "markup"),
      ("Hello!<|im_end|>\n", "assistant"),
      ("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n", "markup"),
      ("Goodbye.<|im_end|>\n", "assistant"),
    ]
  )
  for doc, (tokens, weights) in enumerate([want_1, want_2]):
    n = int(conversations.doc_length[doc])
    np.testing.assert_array_equal(conversations.tokens(doc, 0, n), tokens)
    np.testing.assert_array_equal(conversations.weights(doc, 0, n), weights)


def test_llama3_and_custom_templates_render_turns():
  messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]
  llama3 = chat.render(messages, chat.turn_format("llama3"))
  assert "".join(t for t, _ in llama3) == (
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nYo<|eot_id|>"
  )
  assert [t for t, trained in llama3 if trained] == ["Yo<|eot_id|>"]
  custom = chat.render(messages, chat.turn_format("[{role}] {content}</s>"))
  assert [t for t, trained in custom if trained] == ["Yo</s>"]
  assert chat.template_problem("no placeholder") is not None
  assert chat.template_problem("{role}: {content} {oops}") is not None


def test_packed_conversations_stay_apart_with_the_right_mask(tmp_path):
  more = [{"prompt": f"Repeat {i} times.", "response": "ok " * i} for i in range(1, 11)]
  files = _write_jsonl(tmp_path / "sft.jsonl", SFT_LINES + more)
  conversations = load_conversations(_data_cfg(files, seq_len=127), TOKENIZER)
  documents = np.arange(len(conversations))
  rows = conversations.packed_rows(documents, 128, TOKENIZER, seed=3, shuffle=True)
  seen = []
  for r in range(rows.rows_per_epoch):
    row = rows[r]
    for segment in range(1, int(row["segment_ids"].max()) + 1):
      where = np.flatnonzero(row["segment_ids"] == segment)
      assert np.all(np.diff(where) == 1), "a conversation is contiguous in its row"
      np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))  # positions restart
      tokens = row["tokens"][where]
      assert tokens[0] == TOKENIZER.bos_id and tokens[-1] == TOKENIZER.eos_id
      doc = next(d for d in documents if np.array_equal(conversations.tokens(d, 0, len(tokens) - 2), tokens[1:-1]))
      seen.append(doc)
      body_weights = conversations.weights(doc, 0, len(tokens) - 2)
      np.testing.assert_array_equal(row["loss_weights"][where], [0.0, *body_weights, body_weights[-1]])
  assert sorted(seen) == documents.tolist(), "every conversation once per epoch, some cut to fit the row"
  assert rows.truncated == 1
  # The batch: a target weighs its own weight only inside its conversation, nothing across a boundary.
  stacked = {k: np.stack([rows[r][k] for r in range(rows.rows_per_epoch)]) for k in rows[0]}
  batch = to_model_inputs(stacked)
  for b in range(rows.rows_per_epoch):
    for i in range(127):
      same = stacked["segment_ids"][b, i] == stacked["segment_ids"][b, i + 1] != 0
      want = stacked["loss_weights"][b, i + 1] if same else 0.0
      assert batch["loss_mask"][b, i] == want


def test_preference_rows_hold_chosen_then_rejected(tmp_path):
  lines = [
    {"prompt": "Sky?", "chosen": "Blue.", "rejected": "Green."},
    {"messages": [{"role": "user", "content": "1+1"}], "chosen": "2", "rejected": "3"},
  ]
  pairs = load_preferences(_data_cfg(_write_jsonl(tmp_path / "dpo.jsonl", lines)), TOKENIZER)
  rows = pairs.packed_rows(np.arange(2), 256, TOKENIZER, seed=0, shuffle=False)
  assert rows.truncated == 0
  row = rows[0]
  fmt = chat.turn_format("chatml")
  for segment, reply in [(1, "Blue."), (2, "Green.")]:
    where = row["segment_ids"] == segment
    text = TOKENIZER.decode(row["tokens"][where])
    assert text == "".join(t for t, _ in chat.render([{"role": "user", "content": "Sky?"}], fmt)) + "".join(
      t for t, _ in chat.render([{"role": "assistant", "content": reply}], fmt)
    )
    trained = TOKENIZER.decode(row["tokens"][where & (row["loss_weights"] > 0)])
    assert trained == reply + "<|im_end|>\n"  # the EOS (weighted, decoded to nothing) closes the reply


@pytest.mark.fast
def test_dpo_loss_is_its_formula_on_hand_made_logprobs():
  rng = np.random.default_rng(0)
  pc, pr, rc, rr = (rng.normal(-20, 5, size=6) for _ in range(4))
  beta = 0.3
  terms = dpo.dpo_terms(*(jnp.asarray(x) for x in (pc, pr, rc, rr)), beta)
  for i in range(6):
    z = beta * ((pc[i] - rc[i]) - (pr[i] - rr[i]))
    assert float(terms["loss"][i]) == pytest.approx(-math.log(1 / (1 + math.exp(-z))), rel=1e-5)
    assert float(terms["margin"][i]) == pytest.approx(z, rel=1e-5)
    assert float(terms["chosen_reward"][i]) == pytest.approx(beta * (pc[i] - rc[i]), rel=1e-5)
  # Summing a row's log-probabilities per side: segment 1 chosen, 2 rejected, weighted by the mask.
  logp = jnp.asarray([[-1.0, -2.0, -3.0, -4.0, -5.0, 0.0]])
  mask = jnp.asarray([[0.0, 1.0, 1.0, 0.0, 1.0, 0.0]])
  segments = jnp.asarray([[1, 1, 1, 2, 2, 0]])
  chosen, rejected = dpo.pair_logprobs(logp, mask, segments)
  assert float(chosen[0]) == -5.0 and float(rejected[0]) == -5.0


@pytest.mark.fast
def test_distill_kl_is_the_kl_divergence():
  rng = np.random.default_rng(1)
  student, teacher = rng.normal(size=(2, 3, 7)), rng.normal(size=(2, 3, 7))
  mask = np.array([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
  t = 2.0
  want = 0.0
  for b in range(2):
    for i in range(3):
      p = np.exp(teacher[b, i] / t) / np.exp(teacher[b, i] / t).sum()
      q = np.exp(student[b, i] / t) / np.exp(student[b, i] / t).sum()
      want += mask[b, i] * float(np.sum(p * np.log(p / q)))
  got = distill.distill_kl_sums(jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(mask), t)
  assert float(got) == pytest.approx(want, rel=1e-5)
  assert float(distill.distill_kl_sums(jnp.asarray(student), jnp.asarray(student), jnp.asarray(mask), t)) == (
    pytest.approx(0.0, abs=1e-6)
  )


# Training with each objective: tiny models, batches built by the data code above.

PREFERENCES = [{"prompt": f"Q{i}", "chosen": f"y{i}", "rejected": f"n{i} n{i}"} for i in range(8)]


def _objective_config(objective: str, layout: dict | None = None, **extra):
  from tests.helpers import small_config

  overrides = {"model.d_model": 64, "model.num_kv_heads": 4, "data.seq_len": 63, "train.objective": objective}
  return small_config(**{**overrides, **(layout or {}), **extra})


def _sft_batches(tmp_path, count: int = 2) -> list[dict]:
  files = _write_jsonl(tmp_path / "sft.jsonl", SFT_LINES + [{"prompt": f"n{i}", "response": "m" * i} for i in range(9)])
  conversations = load_conversations(_data_cfg(files, seq_len=63, template="plain"), TOKENIZER)
  rows = conversations.packed_rows(np.arange(len(conversations)), 64, TOKENIZER, seed=0, shuffle=True)
  return [to_model_inputs({k: np.stack([rows[8 * s + r][k] for r in range(8)]) for k in rows[0]}) for s in range(count)]


def _dpo_batches(tmp_path, count: int = 2) -> list[dict]:
  pairs = load_preferences(_data_cfg(_write_jsonl(tmp_path / "dpo.jsonl", PREFERENCES), template="plain"), TOKENIZER)
  rows = pairs.packed_rows(np.arange(len(pairs)), 64, TOKENIZER, seed=0, shuffle=True)
  assert rows.truncated == 0
  return [to_model_inputs({k: np.stack([rows[8 * s + r][k] for r in range(8)]) for k in rows[0]}) for s in range(count)]


def _teacher_run(tmp_path) -> str:
  """A teacher as scripts/export_params.py writes one (params/ and config.json): 3 layers, a wider MLP and larger
  initial weights than the student (a peaked distribution, far from the student's near-uniform one)."""
  import orbax.checkpoint as ocp

  from model import ModelConfig
  from model.config import padded_vocab_size
  from model.params import init_params

  run = tmp_path / "teacher"
  if not run.exists():
    teacher = _objective_config("lm", **{"model.num_layers": 3, "model.mlp_dim": 128, "model.init_std": 0.5})
    vocab = padded_vocab_size(TOKENIZER.vocab_size, teacher.model.vocab_multiple)
    model_cfg = ModelConfig.from_config(teacher.model, teacher.moe, vocab_size=vocab, max_len=teacher.data.seq_len)
    run.mkdir()
    (run / "config.json").write_text(teacher.to_json())
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(run / "params", {"params": init_params(model_cfg, 7)})
  return str(run)


def _train(cfg, batches: list[dict], steps_per_batch: int = 1, devices=None):
  """(per-step metrics on the host, experiment) of a run from the config's initial parameters."""
  from tests.helpers import mesh_for
  from trainer.experiment import build

  exp = build(cfg, TOKENIZER.vocab_size, mesh_for(cfg, devices))
  state, frozen = exp.init_state(), exp.load_frozen()  # dpo: the initial parameters; distill: the teacher
  history = []
  for batch in batches:
    for _ in range(steps_per_batch):
      state, metrics = exp.train_step(state, jax.device_put(batch, exp.batch_sharding), frozen)
      history.append({k: float(v) for k, v in jax.device_get(metrics).items() if np.ndim(v) == 0})
  return history, exp, state, frozen


STEPS = 5  # on one batch: enough to see each objective move
MESH_LAYOUT = {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.grad_accum": 2}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
  return tmp_path_factory.mktemp("objectives")


def _run_objective(objective: str, workspace, layout: dict | None = None):
  extra = {"distill.teacher": _teacher_run(workspace), "distill.alpha": 1.0} if objective == "distill" else {}
  extra |= {"dpo.beta": 0.5} if objective == "dpo" else {}
  batches = _dpo_batches(workspace, count=1) if objective == "dpo" else _sft_batches(workspace, count=1)
  return _train(_objective_config(objective, layout, **extra), batches, steps_per_batch=STEPS) + (batches,)


@pytest.fixture(scope="module")
def single_device_runs(workspace):
  return {objective: _run_objective(objective, workspace) for objective in ("sft", "dpo", "distill")}


def test_dpo_steps_raise_the_chosen_over_rejected_margin(single_device_runs):
  history, exp, state, frozen, batches = single_device_runs["dpo"]
  assert history[0]["dpo_margin"] == pytest.approx(0.0, abs=1e-6)  # the policy starts as the reference
  assert history[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)
  assert history[-1]["dpo_margin"] > history[0]["dpo_margin"] + 0.2
  assert history[-1]["dpo_chosen_reward"] > history[-1]["dpo_rejected_reward"]
  assert history[-1]["dpo_accuracy"] > 0.5
  assert history[-1]["loss"] < history[0]["loss"]
  # Evaluation against a naive reference: per row, log-softmax of each model's logits summed over the weighted
  # targets of segment 1 (chosen) and 2 (rejected), then the DPO formula, summed over the 8 pairs.
  batch = batches[0]
  loss_sum, pairs = exp.eval_step(state.params, jax.device_put(batch, exp.batch_sharding), frozen)
  logits_of = jax.jit(lambda params: model_logits(exp.graphdef, params, batch)[0])
  policy, reference = np.asarray(logits_of(state.params), np.float64), np.asarray(logits_of(frozen["reference"]))
  want = 0.0
  for b in range(8):
    sums = {}
    for name, logits in (("p", policy), ("r", reference.astype(np.float64))):
      for segment in (1, 2):
        total = 0.0
        for i in np.flatnonzero((batch["segment_ids"][b] == segment) & (batch["loss_mask"][b] > 0)):
          row = logits[b, i] - logits[b, i].max()
          total += batch["loss_mask"][b, i] * (row[batch["targets"][b, i]] - np.log(np.exp(row).sum()))
        sums[name, segment] = total
    z = 0.5 * ((sums["p", 1] - sums["r", 1]) - (sums["p", 2] - sums["r", 2]))
    want += np.log1p(np.exp(-z))
  assert float(pairs) == 8.0
  assert float(loss_sum) == pytest.approx(want, rel=1e-4)
  assert float(loss_sum) / 8 < history[0]["loss"]


def test_distill_loss_is_zero_against_itself_and_falls(single_device_runs):
  history, exp, state, frozen, batches = single_device_runs["distill"]
  assert history[-1]["loss"] < history[0]["loss"] * 0.95
  assert history[-1]["distill_kl"] == pytest.approx(history[-1]["loss"] / 2.0**2, rel=1e-5)  # alpha 1, T 2
  # The student as its own teacher: the same distribution, zero KL.
  loss_fn = distill.make_distill_loss(exp.graphdef, exp.graphdef, temperature=2.0, alpha=1.0, vocab_size=260)
  batch = {k: jnp.asarray(v) for k, v in batches[0].items()}
  params = jax.device_get(state.params)
  (loss_sum, _, tokens), _ = jax.jit(loss_fn)(params, {"teacher": params}, batch, None)
  assert float(tokens) > 0 and float(loss_sum) == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("objective", ["sft", "dpo", "distill"])
def test_objective_on_a_mesh_gives_the_single_device_losses(objective, single_device_runs, workspace):
  want = single_device_runs[objective][0]
  got, exp, _, _, _ = _run_objective(objective, workspace, MESH_LAYOUT)
  assert exp.mesh.devices.size == 8 and exp.mesh.shape["tensor"] == 2
  # Five steps at lr 1e-2 on one batch amplify float reassociation (Adam divides by tiny moments): 5e-4.
  for name in want[0]:
    np.testing.assert_allclose([h[name] for h in got], [h[name] for h in want], rtol=5e-4, atol=1e-6, err_msg=name)


def test_packed_row_logits_equal_each_conversation_alone(single_device_runs, tmp_path):
  """Packing is invisible to the model: no conversation attends to another in its row."""
  _, exp, state, _, _ = single_device_runs["sft"]
  files = _write_jsonl(tmp_path / "sft.jsonl", [SFT_LINES[0], {"prompt": "Hi", "response": "Yo"}])
  conversations = load_conversations(_data_cfg(files, seq_len=63, template="plain"), TOKENIZER)
  row = conversations.packed_rows(np.arange(2), 64, TOKENIZER, seed=0, shuffle=False)[0]
  assert row["segment_ids"].max() == 2, "the test needs a row with both conversations"
  params = jax.device_get(state.params)
  logits_of = jax.jit(lambda params, batch: model_logits(exp.graphdef, params, batch)[0])
  packed = to_model_inputs({k: v[None] for k, v in row.items()})
  logits = logits_of(params, packed)
  for segment in (1, 2):
    where = np.flatnonzero(packed["segment_ids"][0] == segment)
    # The conversation alone at the start of an otherwise empty row (segment 0: padding).
    alone = {k: np.zeros_like(v) for k, v in packed.items()}
    for k in ("inputs", "positions"):
      alone[k][0, : len(where)] = packed[k][0, where]
    alone["segment_ids"][0, : len(where)] = 1
    np.testing.assert_allclose(logits[0, where], logits_of(params, alone)[0, : len(where)], rtol=1e-5, atol=1e-5)


def test_sft_run_resumes_exactly(tmp_path):
  """train() on examples/sft.jsonl: checkpoints at steps 2 and 4; with the last one gone, the run resumes at 2
  and logs the same losses for steps 3 and 4 (the row cursor and the packing are pure functions of the row)."""
  import shutil

  from configs.base import base_config
  from data.tokenizer import load_tokenizer
  from tests.helpers import small_config
  from trainer.loop import train

  # A small sentencepiece tokenizer trained on the examples' own text.
  corpus = tmp_path / "text.txt"
  corpus.write_text(open("examples/sft.jsonl").read() + open("examples/dpo.jsonl").read())
  tokenizer_cfg = base_config().data
  tokenizer_cfg.files, tokenizer_cfg.vocab_size, tokenizer_cfg.cache_dir = str(corpus), 400, str(tmp_path / "cache")
  tokenizer_cfg.eval_fraction = 0.0
  tokenizer = load_tokenizer(tokenizer_cfg, None)
  cfg = small_config(
    **{
      "train.objective": "sft",
      "data.files": "examples/sft.jsonl",
      "data.tokenizer": tokenizer.model_path,
      "data.cache_dir": str(tmp_path / "cache"),
      "data.seq_len": 63,
      "data.eval_fraction": 0.2,
      "train.steps": 4,
      "train.log_every": 1,
      "train.eval_every": 2,
      "train.eval_batches": 1,
      "checkpoint.every_steps": 2,
      "checkpoint.async_save": False,
      "mesh.data": -1,  # the 8 emulated devices
    }
  )
  workdir = tmp_path / "run"
  train(cfg, str(workdir))
  shutil.rmtree(workdir / "checkpoints" / "4")
  # Moved aside, so the resumed run writes its own lines for steps 3 and 4 rather than keep the recorded ones.
  (workdir / "metrics.jsonl").rename(tmp_path / "first.jsonl")
  train(cfg, str(workdir))
  records = [json.loads(line) for name in (tmp_path / "first.jsonl", workdir / "metrics.jsonl") for line in open(name)]
  losses = [(r["step"], r["loss"]) for r in records if "loss" in r]
  assert [step for step, _ in losses] == [1, 2, 3, 4, 3, 4]
  np.testing.assert_allclose([loss for _, loss in losses[4:]], [loss for _, loss in losses[2:4]], rtol=1e-6)
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  assert [step for step, _ in evals] == [0, 2, 4, 4]
  assert evals[-1][1] == pytest.approx(evals[-2][1], rel=1e-6)


def test_fine_tuning_takes_the_tokenizer_of_the_run_it_builds_on(tmp_path):
  from objectives.frozen import tokenizer_data_cfg
  from settings import ConfigError
  from tests.helpers import small_config

  teacher = tmp_path / "teacher"
  (teacher / "checkpoints" / "8").mkdir(parents=True)
  (teacher / "tokenizer.model").write_bytes(b"teacher's")
  distill = small_config(**{"train.objective": "distill", "distill.teacher": str(teacher / "checkpoints" / "8")})
  assert tokenizer_data_cfg(distill).tokenizer == str(teacher / "checkpoints" / "8" / "../.." / "tokenizer.model")
  other = tmp_path / "other.model"
  other.write_bytes(b"another")
  distill.data.tokenizer = str(other)
  with pytest.raises(ConfigError, match="not the teacher's tokenizer"):
    tokenizer_data_cfg(distill)
  # sft from scratch: the chat JSONL has no text to train a tokenizer on, so the default corpus does.
  sft = small_config(**{"train.objective": "sft", "data.files": "examples/sft.jsonl"})
  assert tokenizer_data_cfg(sft).files == "" and sft.data.files == "examples/sft.jsonl"
  sft.checkpoint.init_from = str(teacher)
  assert tokenizer_data_cfg(sft).tokenizer == str(teacher / "tokenizer.model")


def test_label_smoothing_example_is_its_formula():
  """examples/objectives/label_smoothing.py against a numpy computation of the same loss on random logits."""
  from examples.objectives.label_smoothing import smoothed_cross_entropy_sums

  rng = np.random.default_rng(0)
  logits, targets = rng.normal(size=(2, 5, 12)).astype(np.float32), rng.integers(0, 10, size=(2, 5))
  mask = (rng.random((2, 5)) > 0.3).astype(np.float32)
  logp = logits[..., :10] - np.log(np.exp(logits[..., :10]).sum(-1, keepdims=True))
  nll = -np.take_along_axis(logp, targets[..., None], -1)[..., 0]
  expected = np.sum((0.9 * nll - 0.1 * logp.mean(-1)) * mask)
  loss_sum, nll_sum = smoothed_cross_entropy_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), 0.1, 10)
  assert float(loss_sum) == pytest.approx(expected, rel=1e-5)
  assert float(nll_sum) == pytest.approx(np.sum(nll * mask), rel=1e-5)


@pytest.mark.fast
def test_a_user_objective_from_a_file_outside_the_package_trains(tmp_path, monkeypatch, mini_run_cache):
  """train.objective=module:attribute, the module a copy of the example outside the repository: the run trains,
  and its step-1 cross-entropy (reported as `nll`) is the `lm` objective's step-1 loss on the same batch."""
  import shutil

  from settings import ConfigError
  from settings.validate import validate
  from tests.helpers import mini_run_config
  from trainer.loop import train

  shutil.copy("examples/objectives/label_smoothing.py", tmp_path / "my_objective.py")
  monkeypatch.syspath_prepend(str(tmp_path))
  overrides = {"train.steps": 3, "checkpoint.every_steps": 3, "checkpoint.async_save": False}
  overrides |= {"mesh.data": -1, "train.global_batch_size": 8}  # the 8 emulated devices
  records = {}
  for objective in ("my_objective:OBJECTIVE", "lm"):
    cfg = mini_run_config(mini_run_cache, **overrides, **{"train.objective": objective})
    validate(cfg)
    workdir = tmp_path / objective.split(":")[0]
    train(cfg, str(workdir))
    records[objective] = [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"loss"' in line]
  mine, lm = records["my_objective:OBJECTIVE"], records["lm"]
  assert [r["step"] for r in mine] == [1, 2, 3]
  assert mine[0]["nll"] == pytest.approx(lm[0]["loss"], rel=1e-5)
  assert (tmp_path / "my_objective" / "checkpoints" / "3").is_dir()
  cfg = mini_run_config(mini_run_cache, **{"train.objective": "my_objective:NOTHING"})
  with pytest.raises(ConfigError, match=r"has no Objective named 'NOTHING'"):
    validate(cfg)
  cfg.train.objective = str(tmp_path / "absent.py") + ":OBJECTIVE"
  with pytest.raises(ConfigError, match=r"cannot import .*absent\.py \(FileNotFoundError"):
    validate(cfg)
