"""GRPO: the loss and its gradient against a float64 per-sequence loop, advantages, rewards, rollouts, layouts,
exact resume, LoRA, and one-line errors for bad reward functions."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from objectives import grpo, rewards
from tests.helpers import VOCAB, mesh_for, small_config

# ---------------------------------------------------------------------------------------------------------------
# The loss, against a naive float64 loop over sequences and tokens


def _naive_loss_and_grad(logp, old, ref, rewards_B, mask, *, group, agg, eps, eps_high, beta, max_new, scale):
  """float64, one sequence and one token at a time: the loss and its derivative by each log-probability."""
  logp, old, ref, mask = (np.asarray(x, np.float64) for x in (logp, old, ref, mask))
  B, L = logp.shape
  adv = np.zeros(B)
  for start in range(0, B, group):
    r = np.asarray(rewards_B[start : start + group], np.float64)
    mean = sum(r) / group
    std = (sum((x - mean) ** 2 for x in r) / (group - 1)) ** 0.5
    for i in range(group):
      adv[start + i] = (r[i] - mean) / (std + 1e-4) if scale else r[i] - mean
  n_tokens = mask.sum()
  total, grad = 0.0, np.zeros((B, L))
  for b in range(B):
    length = mask[b].sum()
    for t in range(L):
      if not mask[b, t]:
        continue
      ratio = np.exp(logp[b, t] - old[b, t])
      clipped = min(max(ratio, 1 - eps), 1 + eps_high)
      plain, held = ratio * adv[b], clipped * adv[b]
      d = ref[b, t] - logp[b, t]
      loss = -min(plain, held) + beta * (np.exp(d) - d - 1)
      dloss = (-ratio * adv[b] if plain <= held else 0.0) + beta * (1 - np.exp(d))
      weight = {"sequence_mean": 1 / (length * B), "token_mean": 1 / n_tokens, "constant": 1 / (B * max_new)}[agg]
      total += weight * loss
      grad[b, t] = weight * dloss
  return total, grad


@pytest.mark.fast
@pytest.mark.parametrize("agg", grpo.LOSS_AGGREGATIONS)
def test_loss_and_gradient_equal_a_float64_per_sequence_loop(agg):
  rng = np.random.default_rng(0)
  B, L, group, max_new = 6, 7, 3, 9
  settings = dict(eps=0.2, eps_high=0.28, beta=0.04)
  logp = np.log(rng.uniform(0.05, 0.9, (B, L)))
  old = logp + rng.normal(0, 0.6, (B, L))  # ratios well outside [0.8, 1.28]: the clip is active on many tokens
  ref = logp + rng.normal(0, 0.3, (B, L))
  rewards_B = np.array([1.0, 0.0, 0.5, 0.0, 0.0, 2.0])
  mask = (np.arange(L)[None] < np.array([[7], [3], [5], [1], [6], [4]])).astype(np.float32)

  def loss_of(logp_BxL):
    adv = grpo.group_advantages(jnp.asarray(rewards_B), group, scale=True)[:, None] * mask
    weights = grpo.aggregation_weights(jnp.asarray(mask), jnp.ones(B, bool), agg, max_new)
    terms = grpo.token_terms(logp_BxL, jnp.asarray(old, jnp.float32), adv, epsilon=settings["eps"],
                             epsilon_high=settings["eps_high"], beta=settings["beta"],
                             ref_logp_BxL=jnp.asarray(ref, jnp.float32))  # fmt: skip
    return jnp.sum(weights * terms["loss"]), terms["clipped"]

  (loss, clipped), grad = jax.value_and_grad(loss_of, has_aux=True)(jnp.asarray(logp, jnp.float32))
  want, want_grad = _naive_loss_and_grad(logp, old, ref, rewards_B, mask, group=group, agg=agg, max_new=max_new,
                                         scale=True, **settings)  # fmt: skip
  assert np.sum(np.asarray(clipped) * mask) >= 4  # the clip matters in this case
  np.testing.assert_allclose(float(loss), want, rtol=1e-5)
  np.testing.assert_allclose(np.asarray(grad), want_grad, rtol=1e-4, atol=1e-7)


@pytest.mark.fast
def test_group_advantages_are_the_formula():
  rewards_B = jnp.array([1.0, 0.0, 0.0, 1.0, 3.0, 3.0, 3.0, 3.0])
  std = np.std([1, 0, 0, 1], ddof=1)
  want = [(1 - 0.5) / (std + 1e-4), -0.5 / (std + 1e-4), -0.5 / (std + 1e-4), 0.5 / (std + 1e-4), 0, 0, 0, 0]
  np.testing.assert_allclose(grpo.group_advantages(rewards_B, 4, scale=True), want, rtol=1e-6)
  np.testing.assert_allclose(grpo.group_advantages(rewards_B, 4, scale=False), [0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0])
  assert grpo.equal_groups(rewards_B, 4).tolist() == [False] * 4 + [True] * 4
  # Dropped groups weigh nothing; the rest share the whole weight.
  mask = jnp.ones((8, 2))
  weights = grpo.aggregation_weights(mask, ~grpo.equal_groups(rewards_B, 4), "token_mean", 2)
  assert np.asarray(weights).tolist() == [[1 / 8, 1 / 8]] * 4 + [[0, 0]] * 4


# ---------------------------------------------------------------------------------------------------------------
# Reward functions


@pytest.mark.fast
def test_shipped_rewards():
  completions = ["so 40 + 2\n#### 42", "\\boxed{1,000} then \\boxed{12}", "#### 7.0", "no answer", "#### 41"]
  answers = ["42", "12", "7", "3", "42"]
  assert rewards.exact_answer(None, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0, 0.0]
  assert rewards.final_answer("\\boxed{1,000}") == "1,000"
  assert rewards.exact_answer(None, ["#### 1,000"], answer=["1000"]) == [1.0]
  fmt = rewards.format_match(None, ["work\n#### 5 ", "5"], pattern=r"(?s).*####\s*\S+")
  assert fmt == [1.0, 0.0]
  assert rewards.overlong(None, [""] * 4, completion_tokens=[10, 12, 14, 16], max_new_tokens=16, window=4) == [
    0.0, 0.0, -0.5, -1.0
  ]  # fmt: skip


def _bad_length(prompts, completions, **fields):
  return [1.0]


def _not_numbers(prompts, completions, **fields):
  return ["yes"] * len(completions)


def _nan(prompts, completions, **fields):
  return [float("nan")] * len(completions)


def _raises(prompts, completions, **fields):
  raise KeyError("answer")


@pytest.mark.fast
@pytest.mark.parametrize(
  ("fn", "message"),
  [
    (_bad_length, r"^reward function bad returned 1 values for 2 completions; return one per completion$"),
    (_not_numbers, r"^reward function bad returned 'yes', not a finite number"),
    (_nan, r"^reward function bad returned nan, not a finite number"),
    (_raises, r"^reward function bad raised KeyError: 'answer'; fix it and rerun$"),
  ],
)
def test_a_bad_reward_function_is_one_line_naming_it(fn, message):
  with pytest.raises(rewards.RewardError, match=message) as info:
    rewards.score({"bad": fn}, ["p", "q"], ["a", "b"], {})
  assert "\n" not in str(info.value)


@pytest.mark.fast
def test_reward_names_that_import_nothing_are_one_line(tmp_path):
  cfg = small_config()
  for spec, message in [
    ("exact", r"'exact' is not one of exact_answer, format, overlong"),
    ("nowhere_module:fn", r"cannot import nowhere_module \(ModuleNotFoundError"),
    (f"{tmp_path}/absent.py:fn", r"cannot import .*absent\.py \(FileNotFoundError"),
    ("objectives.rewards:nothing", r"has no attribute 'nothing'"),
  ]:
    cfg.grpo.rewards = spec
    with pytest.raises(rewards.RewardError, match=message):
      rewards.reward_functions(cfg.grpo)
  mine = "def reward(prompts, completions, **fields):\n  return [len(c) for c in completions]\n"
  (tmp_path / "mine.py").write_text(mine)
  cfg.grpo.rewards = f"exact_answer,{tmp_path}/mine.py:reward"
  functions = rewards.reward_functions(cfg.grpo)
  assert rewards.score(functions, ["p"], ["#### 3"], {"answer": ["3"]})[f"{tmp_path}/mine.py:reward"].tolist() == [6.0]


@pytest.mark.fast
def test_a_completion_ends_at_its_stop_token_or_the_turns_end_marker():
  from trainer.rollouts import split_completion

  pieces = {1: "#### ", 2: "9", 3: "<|im", 4: "_end|>", 5: "\n", 6: "junk", 0: "</s>"}
  decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
  # Stopped at EOS (id 0) before any marker: trained up to and with EOS, scored without it.
  assert split_completion([1, 2, 0, 6], True, [0], "<|im_end|>", decode) == ([1, 2, 0], "#### 9")
  # The marker's last token ends it; the rambling after it is neither trained on nor scored.
  assert split_completion([1, 2, 3, 4, 5, 6, 0], True, [0], "<|im_end|>", decode) == ([1, 2, 3, 4], "#### 9")
  # No stop token within max_new_tokens and no template marker: every token, all its text.
  assert split_completion([1, 2, 6], False, [0], "", decode) == ([1, 2, 6], "#### 9junk")


@pytest.mark.fast
def test_prompt_lines_render_with_the_template_and_keep_their_fields(tmp_path):
  from configs.base import base_config
  from data.prompts import load_prompts, prompt_order

  class Chars:  # a tokenizer of characters: what was rendered can be read back
    bos_id = 1

    def encode(self, text):
      return [ord(c) for c in text]

  (tmp_path / "p.jsonl").write_text(
    json.dumps({"prompt": "2+2?", "answer": "4"}) + "\n\n"
    + json.dumps({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                  "tests": [1, 2]}) + "\n"
  )  # fmt: skip
  data_cfg = base_config().data
  data_cfg.files, data_cfg.chat_template = str(tmp_path / "p.jsonl"), "chatml"
  first, second = load_prompts(data_cfg, Chars())
  assert "".join(map(chr, first.tokens[1:])) == "<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n"
  assert first.tokens[0] == 1 and first.text == "2+2?" and first.fields == {"answer": "4"}
  system, user = "<|im_start|>system\nBe brief.<|im_end|>\n", "<|im_start|>user\nHi<|im_end|>\n"
  assert second.text == system + user + "<|im_start|>assistant\n"
  assert second.fields == {"tests": [1, 2]}
  # Each epoch takes every prompt once, in an order of its own; the same rows give the same prompts anywhere.
  epochs = prompt_order(np.arange(30), 10, seed=3, shuffle=True).reshape(3, 10)
  assert all(sorted(e) == list(range(10)) for e in epochs) and len({tuple(e) for e in epochs}) == 3
  assert prompt_order(np.arange(12, 17), 10, seed=3, shuffle=True).tolist() == epochs.reshape(-1)[12:17].tolist()


# ---------------------------------------------------------------------------------------------------------------
# Rollouts on the training mesh


def _decoder(layout: dict):
  from generation.decoding import Decoder
  from parallel.rules import parse_rules
  from storage.run import model_config

  cfg = small_config(**layout)
  mesh = mesh_for(cfg)
  rules = parse_rules(cfg.mesh.rules)
  return Decoder(model_config(cfg, VOCAB, tensor=mesh.shape["tensor"], rules=rules, platform="cpu"), VOCAB, mesh, rules)


@pytest.mark.fast
def test_rollouts_equal_one_device_generation_on_a_sharded_mesh():
  """Greedy: the rollout of each group's rows equals generate() of its prompt alone; sampled: every layout draws
  the same tokens (the draw is a function of the key, not of the layout)."""
  from generation.sampling import Sampling
  from generation.search import generate
  from model.params import init_params

  one, sharded = _decoder({"mesh.data": 1}), _decoder({"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  params = init_params(one.model_cfg, 3)
  prompts = [[2, 5, 6, 7, 8], [2, 9]]
  tokens_QxP = np.array([[2, 5, 6, 7, 8], [2, 9, 0, 0, 0]])
  rows_B = np.repeat([0, 1], 4)
  key = jax.random.PRNGKey(1)
  greedy = Sampling(temperature=0.0)
  got, done = sharded.rollout(jax.device_put(params, sharded.param_shardings), tokens_QxP, [5, 2], rows_B, key,
                              greedy, 6, [3])  # fmt: skip
  want = generate(one, params, prompts, max_new_tokens=6, sampling=greedy, stop_ids=[3])
  assert not np.asarray(done).any() and all(not c.stopped for c in want)
  assert np.asarray(got).tolist() == [want[0].tokens] * 4 + [want[1].tokens] * 4
  sampled = Sampling(temperature=1.0, top_p=0.9)
  a, _ = one.rollout(params, tokens_QxP, [5, 2], rows_B, key, sampled, 6, [3])
  sharded_params = jax.device_put(params, sharded.param_shardings)
  b, _ = sharded.rollout(sharded_params, tokens_QxP, [5, 2], rows_B, key, sampled, 6, [3])
  assert np.asarray(a).tolist() == np.asarray(b).tolist()
  assert len({tuple(row) for row in np.asarray(a)[:4].tolist()}) > 1  # a group's completions differ


# ---------------------------------------------------------------------------------------------------------------
# The update on every layout


def _grpo_cfg(**overrides):
  return small_config(
    **{
      "train.objective": "grpo", "data.files": "examples/grpo.jsonl", "grpo.prompts_per_step": 2,
      "grpo.group_size": 4, "grpo.max_new_tokens": 8, "grpo.iterations": 2, "grpo.beta": 0.04,
      "grpo.epsilon_high": 0.28, "train.steps": 4, "checkpoint.every_steps": 2, **overrides,
    }
  )  # fmt: skip


def _rollout_batch(seed: int = 0) -> dict:
  """A batch as the rollouts build it: one prompt + completion per row, its fields from made-up log-probabilities."""
  from data.synthetic import packed_batch

  rng = np.random.default_rng(seed)
  batch = packed_batch(rng, 8, 16, VOCAB, docs_per_row=1)
  mask = batch["loss_mask"] * (np.arange(16)[None] >= 6)  # the completion after a 6-token prompt
  rewards_B = jnp.asarray(rng.integers(0, 2, 8), jnp.float32)
  batch["advantages"] = np.asarray(grpo.group_advantages(rewards_B, 4, True))[:, None] * mask
  batch["loss_mask"] = np.asarray(grpo.aggregation_weights(jnp.asarray(mask), jnp.ones(8, bool), "sequence_mean", 8))
  batch["token_share"] = mask / mask.sum()
  batch["old_logprobs"] = (np.log(1 / VOCAB) + rng.normal(0, 0.3, (8, 16))).astype(np.float32)
  batch["ref_logprobs"] = (np.log(1 / VOCAB) + rng.normal(0, 0.3, (8, 16))).astype(np.float32)
  return batch


def test_an_update_on_identical_rollouts_is_the_same_on_every_layout():
  """Two iterations on one rollout batch (the second with ratios away from 1, a KL term): one device, and data x
  fsdp x tensor with two microbatches, end with the same parameters and statistics."""
  from trainer.experiment import build

  results = []
  # A small learning rate: Adam turns float noise in a near-zero gradient into a step as large as any other.
  for layout in ({}, {"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2, "train.grad_accum": 2}):
    cfg = _grpo_cfg(**layout, **{"optim.peak_lr": 1e-3})
    exp = build(cfg, VOCAB, mesh_for(cfg))
    state = exp.init_state()
    for _ in range(2):
      state, metrics = exp.train_step(state, jax.device_put(_rollout_batch(), exp.batch_sharding), exp.load_frozen())
    results.append((jax.device_get(state.params), jax.device_get(metrics)))
  (one, one_metrics), others = results[0], results[1:]
  for other, other_metrics in others:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6), one, other)
    for name in ("loss", "kl", "clip_fraction", "entropy", "grad_norm"):
      np.testing.assert_allclose(one_metrics[name], other_metrics[name], rtol=1e-5, err_msg=name)
  assert one_metrics["clip_fraction"] > 0 and one_metrics["kl"] > 0


# ---------------------------------------------------------------------------------------------------------------
# Runs: exact resume, LoRA, a failing reward function


@pytest.fixture(scope="module")
def grpo_tokenizer(tmp_path_factory):
  from configs.base import base_config
  from data.tokenizer import load_tokenizer

  root = tmp_path_factory.mktemp("grpo_tokenizer")
  corpus = root / "text.txt"
  corpus.write_text("".join(open(f).read() for f in ("examples/grpo_sft.jsonl", "examples/sft.jsonl",
                                                       "examples/dpo.jsonl")))  # fmt: skip
  data_cfg = base_config().data
  data_cfg.files, data_cfg.vocab_size, data_cfg.cache_dir, data_cfg.eval_fraction = str(corpus), 400, str(root), 0.0
  return load_tokenizer(data_cfg, None).model_path


def _run_cfg(tokenizer: str, **overrides):
  return _grpo_cfg(
    **{
      "data.tokenizer": tokenizer, "data.seq_len": 40, "grpo.max_new_tokens": 8, "grpo.prompts_per_step": 2,
      "grpo.rewards": "exact_answer,format,overlong", "grpo.overlong_window": 4, "train.global_batch_size": 8,
      "train.log_every": 1, "checkpoint.async_save": False, "mesh.data": -1, "data.chat_template": "{content}",
      "optim.peak_lr": 3e-2, **overrides,
    }
  )  # fmt: skip


def _records(*files) -> list[dict]:
  return [json.loads(line) for name in files for line in open(name)]


def test_a_run_resumes_with_the_uninterrupted_runs_metrics(grpo_tokenizer, tmp_path):
  """Two updates per rollout batch, a KL to the frozen reference, an MoE model over data x expert x tensor (the 2
  prompts' prefill split over 4 batch shards): checkpoints at 2 and 4; with 4 gone the run resumes at 2 and logs,
  for steps 3 and 4, the rewards and losses it logged the first time."""
  from trainer.loop import train

  moe = {"moe.num_experts": 4, "moe.top_k": 2, "mesh.data": 2, "mesh.expert": 2, "mesh.tensor": 2}
  cfg = _run_cfg(grpo_tokenizer, **moe)
  workdir = tmp_path / "run"
  train(cfg, str(workdir))
  shutil.rmtree(workdir / "checkpoints" / "4")
  (workdir / "metrics.jsonl").rename(tmp_path / "first.jsonl")
  train(cfg, str(workdir))
  first, resumed = _records(tmp_path / "first.jsonl"), _records(workdir / "metrics.jsonl")
  assert [r["step"] for r in first] == [1, 2, 3, 4] and [r["step"] for r in resumed] == [3, 4]
  assert "reward_mean" in first[0] and "reward_mean" not in first[1]  # a rollout every two steps
  assert {"kl", "clip_fraction", "entropy", "reward/exact_answer", "completion_len_mean"} <= set(first[2])
  assert first[3]["kl"] > 0
  for want, got in zip(first[2:], resumed):
    for name in ("loss", "reward_mean", "reward_std", "reward/overlong", "kl", "clip_fraction", "grad_norm"):
      if name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), (want["step"], name)


def test_lora_grpo_trains_only_the_adapters_and_a_failing_reward_keeps_the_steps_done(grpo_tokenizer, tmp_path):
  """LoRA: the state (optimizer, checkpoints) holds the adapters alone, the reference is the base (beta > 0). A
  reward function that fails at the second rollout stops the run with one line, after saving step 1."""
  from data import DataError
  from trainer.loop import train

  reward = tmp_path / "reward.py"
  reward.write_text(
    "calls = []\n"
    "def fails_second(prompts, completions, **fields):\n"
    "  calls.append(1)\n"
    "  if len(calls) > 1:\n"
    "    raise ValueError('no answer field')\n"
    "  return [0.0] * len(completions)\n"
  )
  cfg = _run_cfg(grpo_tokenizer, **{"lora.rank": 4, "lora.targets": "q,v", "grpo.iterations": 1})
  result = train(cfg, str(tmp_path / "lora"))
  params = result["state"].params
  leaves = jax.tree_util.tree_leaves_with_path(params)
  assert leaves and all("lora_" in jax.tree_util.keystr(path) for path, _ in leaves)
  assert any(np.abs(np.asarray(leaf)).max() > 0 for path, leaf in leaves if "lora_v" in jax.tree_util.keystr(path))
  assert np.isfinite(result["train"]["kl"])

  cfg = _run_cfg(grpo_tokenizer, **{"grpo.iterations": 1, "grpo.beta": 0.0, "grpo.rewards": f"{reward}:fails_second",
                                    "checkpoint.every_steps": 4})  # fmt: skip
  with pytest.raises(DataError, match=r"^reward function .*reward\.py:fails_second raised ValueError: no answer field"):
    train(cfg, str(tmp_path / "failing"))
  assert sorted((tmp_path / "failing" / "checkpoints").iterdir())[-1].name == "1"
  assert [r["step"] for r in _records(tmp_path / "failing" / "metrics.jsonl")] == [1]


@pytest.mark.fast
def test_config_problems_are_one_line_each():
  from settings import ConfigError
  from settings.validate import validate

  for overrides, message in [
    ({"train.global_batch_size": 6}, r"must equal grpo.prompts_per_step x grpo.group_size = 8"),
    ({"grpo.group_size": 1, "train.global_batch_size": 2}, r"group_size=1 must be at least 2"),
    ({"grpo.max_new_tokens": 16}, r"max_new_tokens=16 must be positive and less than data.seq_len=16"),
    ({"grpo.loss_agg": "mean"}, r"loss_agg='mean' is not one of sequence_mean, token_mean, constant"),
    ({"checkpoint.every_steps": 3}, r"must be multiples of grpo.iterations=2"),
    ({"grpo.reward_weights": "1,2,3"}, r"3 weights for 1 reward functions"),
  ]:
    with pytest.raises(ConfigError, match=message):
      validate(_grpo_cfg(**overrides))
