"""GRPO's batches: rollouts of the policy being trained, scored by the reward functions (objectives/grpo.py).

Every `grpo.iterations` steps the current parameters sample `grpo.group_size` completions of each of the next
`grpo.prompts_per_step` prompts, on the training mesh and in one jitted call (Decoder.rollout: no second copy of
the weights, no other engine); the steps in between train again on the same rollouts. What a rollout is depends
only on (config, seed, rollout index, parameters): the prompts are global rows [k * P, (k + 1) * P) of
data/prompts.py's order and the sampling key is folded from the seed and k, so a resumed run redraws what the
uninterrupted one drew. Checkpoints fall between rollout batches (`can_stop`) and save the prompt cursor.

Each process turns the rows its devices hold into text, scores them with the reward functions where the text is,
and builds those rows of the batch; advantages, loss weights and the statistics are then computed on the devices
over the whole global batch, so a group is normalised as a whole wherever its rows are.
"""

import logging
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data import chat
from data.pipeline import GlobalBatches
from data.prompts import load_prompts, prompt_order
from data.tokenizer import Tokenizer
from generation.decoding import Decoder
from generation.sampling import Sampling
from model import lora
from objectives import grpo, rewards
from parallel.rules import traced_under
from trainer.experiment import Experiment

_log = logging.getLogger(__name__)

_SAMPLING_SALT = 0x726F6C6C  # "roll": the sampling keys apart from every other use of the seed


class Rollouts:
  """A BatchSource (objectives.BatchSource): the rollout batch of each step, regenerated every grpo.iterations."""

  def __init__(self, cfg, tokenizer: Tokenizer, exp: Experiment, frozen: dict, start_step: int, start_row: int):
    self.cfg, self.g, self.exp, self.frozen = cfg, cfg.grpo, exp, frozen
    self.tokenizer = tokenizer
    turn_end = chat.turn_format(cfg.data.chat_template).split("{content}")[1]
    self._end_marker = turn_end.replace("{role}", chat.TRAINED_ROLE).strip()  # "<|im_end|>" for chatml
    self.prompts = load_prompts(cfg.data, tokenizer)
    self.functions = rewards.reward_functions(self.g)
    self.weights = rewards.reward_weights(self.g, len(self.functions))
    self.decoder = Decoder(exp.model_cfg, tokenizer.vocab_size, exp.mesh, exp.rules)
    self.sampling = Sampling(temperature=self.g.temperature, top_k=self.g.top_k, top_p=self.g.top_p)
    self.start_step, self.start_row = start_step, start_row
    self.rows = GlobalBatches(self._row, cfg.train.global_batch_size, cfg.data.seq_len, exp.batch_sharding)
    batch_axes = exp.batch_sharding.spec[0]
    self._row_sharding = NamedSharding(exp.mesh, PartitionSpec(batch_axes, None))
    self._finish = jax.jit(
      traced_under(exp.mesh, self._finish_batch),
      out_shardings=(exp.batch_sharding, NamedSharding(exp.mesh, PartitionSpec())),
    )
    self._local: dict[int, dict] = {}  # this process's rows of the rollout being built
    self._batch: dict | None = None
    self._timing: dict = {}
    longest = max(len(p.tokens) for p in self.prompts)
    self.prompt_room = cfg.data.seq_len + 1 - self.g.max_new_tokens
    if longest > self.prompt_room:
      _log.warning(
        "prompts of up to %d tokens are cut to their last %d (data.seq_len + 1 - grpo.max_new_tokens); raise "
        "data.seq_len to keep them whole", longest, self.prompt_room,
      )  # fmt: skip

  @classmethod
  def start(cls, cfg, tokenizer, exp, frozen, start_step: int, saved: dict | None):
    """(the rollouts from the saved prompt cursor, no eval batches): objectives' `batches` factory."""
    start_row = (saved or {}).get("next_row", start_step // cfg.grpo.iterations * cfg.grpo.prompts_per_step)
    return cls(cfg, tokenizer, exp, frozen, start_step, start_row), []

  # BatchSource ----------------------------------------------------------------------------------------------

  def next(self, state) -> tuple[dict, dict]:
    step = int(state.step)
    if self._batch is None or step % self.g.iterations == 0:
      self._batch, metrics = self._rollout(state, (step - self.start_step) // self.g.iterations)
      return self._batch, metrics
    return self._batch, {}

  def position(self, done: int) -> dict:
    # Called where can_stop(done): between rollout batches.
    return {"next_row": self.start_row + (done - self.start_step) // self.g.iterations * self.g.prompts_per_step}

  def can_stop(self, done: int) -> bool:
    return done % self.g.iterations == 0

  def close(self) -> None:
    pass

  # One rollout ----------------------------------------------------------------------------------------------

  def _rollout(self, state, k: int) -> tuple[dict, dict]:
    """The batch of rollout k of this invocation (prompt rows from start_row + k * P), and its metrics."""
    g, B = self.g, self.cfg.train.global_batch_size
    jax.block_until_ready(state.params)  # the updates on the previous rollout are done
    t_start = time.perf_counter()
    first_row = self.start_row + k * g.prompts_per_step
    rows = np.arange(first_row, first_row + g.prompts_per_step)
    order = prompt_order(rows, len(self.prompts), self.cfg.train.seed, self.cfg.data.shuffle)
    prompts = [self.prompts[i] for i in order]
    prompt_tokens = [p.tokens[-self.prompt_room :] for p in prompts]
    width = max(len(t) for t in prompt_tokens)
    tokens_QxP = np.full((len(prompts), width), self.tokenizer.pad_id, np.int32)
    for q, t in enumerate(prompt_tokens):
      tokens_QxP[q, : len(t)] = t
    lengths_Q = np.array([len(t) for t in prompt_tokens], np.int32)
    rows_B = np.repeat(np.arange(len(prompts)), g.group_size)
    stop_ids = [self.tokenizer.eos_id]
    key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.cfg.train.seed), _SAMPLING_SALT), first_row)
    params = self._policy(state.params, self.frozen)
    completions_BxT, done_B = self.decoder.rollout(
      params, tokens_QxP, lengths_Q, rows_B, key, self.sampling, g.max_new_tokens, stop_ids
    )
    local = _local_rows(completions_BxT, done_B)
    t_generated = time.perf_counter()

    # This process's rows: text, rewards, and the row of prompt + completion.
    self._local, texts, prompt_texts, counts = {}, [], [], []
    for r in self.rows.local_rows:
      completion, text = split_completion(*local[r], stop_ids, self._end_marker, self.tokenizer.decode)
      self._local[r] = {"prompt": prompt_tokens[rows_B[r]], "completion": completion}
      texts.append(text)
      prompt_texts.append(prompts[rows_B[r]].text)
      counts.append(len(completion))
    names = sorted({name for p in prompts for name in p.fields})
    fields = {name: [prompts[rows_B[r]].fields.get(name) for r in self.rows.local_rows] for name in names}
    fields["completion_tokens"] = counts
    scores = _agreed(lambda: rewards.score(self.functions, prompt_texts, texts, fields))
    functions = list(self.functions)
    per_row = {r: np.array([scores[n][i] for n in functions], np.float32) for i, r in enumerate(self.rows.local_rows)}
    scores_BxF = jax.make_array_from_callback(
      (B, len(functions)), self._row_sharding, lambda index: np.stack([per_row[r] for r in range(*index[0].indices(B))])
    )
    raw = self.rows.at(0)
    weights_F = jnp.asarray(self.weights, jnp.float32)
    batch, stats = self._finish(state.params, self.frozen, raw, scores_BxF, weights_F)
    stats = jax.device_get(stats)
    t_done = time.perf_counter()

    metrics = {
      "reward_mean": float(stats["reward_mean"]),
      "reward_std": float(stats["reward_std"]),
      **{
        f"reward/{name.rpartition(':')[2]}": float(stats["reward_per_function"][i]) for i, name in enumerate(functions)
      },
      "completion_len_mean": float(stats["completion_len_mean"]),
      "equal_reward_groups": float(stats["equal_reward_groups"]),
      "rollout_tokens_per_sec": float(stats["completion_tokens"]) / max(t_generated - t_start, 1e-9),
      "rollout_seconds": t_done - t_start,
    }
    previous = self._timing
    if previous:  # the updates on the previous rollout batch ran from its end to this one's start
      update_seconds = t_start - previous["done"]
      metrics["update_tokens_per_sec"] = previous["tokens"] * g.iterations / max(update_seconds, 1e-9)
      metrics["rollout_share"] = previous["seconds"] / (previous["seconds"] + update_seconds)
    self._timing = {"done": t_done, "seconds": t_done - t_start, "tokens": float(stats["row_tokens"])}
    return batch, metrics

  def _policy(self, params: dict, frozen: dict) -> dict:
    """The full model's parameters: with LoRA, the adapters being trained over the frozen base."""
    return lora.combine(params, frozen["base"]) if self.exp.model_cfg.lora_rank > 0 else params

  def _row(self, r: int) -> dict:
    """Global row r of the rollout batch as packing.py's rows (length seq_len + 1): prompt and completion, one
    segment, the completion's tokens weighted."""
    prompt, completion = self._local[r]["prompt"], self._local[r]["completion"]
    length = self.cfg.data.seq_len + 1
    tokens = (prompt + completion)[:length]
    row = {
      "tokens": np.full(length, self.tokenizer.pad_id, np.int32),
      "segment_ids": np.zeros(length, np.int32),
      "positions": np.zeros(length, np.int32),
      "loss_weights": np.zeros(length, np.float32),
    }
    row["tokens"][: len(tokens)] = tokens
    row["segment_ids"][: len(tokens)] = 1
    row["positions"][: len(tokens)] = np.arange(len(tokens))
    row["loss_weights"][len(prompt) : len(tokens)] = 1.0
    return row

  def _finish_batch(self, params, frozen, raw: dict, scores_BxF, weights_F):
    """On the devices, over the global batch: advantages, loss weights, the log-probabilities the loss compares
    with, and the rollout's statistics. `params` are the trainable ones (with LoRA, the adapters)."""
    g = self.g
    rewards_B = scores_BxF @ weights_F
    mask_BxL = raw["loss_mask"]
    equal_B = grpo.equal_groups(rewards_B, g.group_size)
    keep_B = ~equal_B if g.drop_equal_groups else jnp.ones_like(equal_B)
    kept_BxL = mask_BxL * keep_B[:, None]
    batch = dict(raw)
    batch["loss_mask"] = grpo.aggregation_weights(mask_BxL, keep_B, g.loss_agg, g.max_new_tokens)
    batch["token_share"] = kept_BxL / jnp.maximum(jnp.sum(kept_BxL), 1.0)
    batch["advantages"] = grpo.group_advantages(rewards_B, g.group_size, g.scale_rewards)[:, None] * mask_BxL
    graphdef = self.exp.graphdef
    if g.iterations > 1:
      batch["old_logprobs"] = grpo.policy_logprobs(graphdef, self._policy(params, frozen), raw, g.temperature)[0]
    if g.beta > 0:
      reference = grpo.reference_params(params, frozen, self.exp.model_cfg.lora_rank)
      batch["ref_logprobs"] = grpo.policy_logprobs(graphdef, reference, raw, g.temperature)[0]
    lengths_B = jnp.sum(mask_BxL, axis=1)
    stats = {
      "reward_mean": jnp.mean(rewards_B),
      "reward_std": jnp.std(rewards_B),
      "reward_per_function": jnp.mean(scores_BxF, axis=0),
      "completion_len_mean": jnp.mean(lengths_B),
      "completion_tokens": jnp.sum(lengths_B),
      "row_tokens": jnp.sum((raw["segment_ids"] > 0).astype(jnp.float32)),
      "equal_reward_groups": jnp.mean(equal_B.astype(jnp.float32)),
    }
    return batch, stats


def _agreed(score):
  """score()'s result on every process, or the same failure on all: a reward function that fails on one process
  (where its rows' text is) must stop them all, before the next collective, to checkpoint and exit together."""
  try:
    result, error = score(), None
  except rewards.RewardError as e:
    result, error = None, e
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    failed = np.asarray(multihost_utils.process_allgather(np.array(error is not None)))
    if error is None and failed.any():
      error = rewards.RewardError(
        f"a reward function failed on process {int(np.argmax(failed))} (its log line names it); fix it and rerun"
      )
  if error is not None:
    raise error
  return result


def split_completion(tokens_T, stopped: bool, stop_ids, end_marker: str, decode) -> tuple[list[int], str]:
  """(the tokens trained on, the text the reward functions see) of a row's new tokens. A completion ends at its
  stop token (kept: the model learns to stop) or, in a chat template, with the token that completes the assistant
  turn's end marker (`end_marker`, "" for none): what follows is not part of the answer, and is neither scored nor
  trained on. `decode`: token ids -> text."""
  tokens = [int(t) for t in tokens_T]
  end = next(i for i, t in enumerate(tokens) if t in stop_ids) if stopped else len(tokens)
  text = decode(tokens[:end])
  if end_marker and end_marker in text:
    # The shortest prefix whose text holds the marker (found by bisection: text grows with the prefix).
    lo, hi = 1, end
    while lo < hi:
      mid = (lo + hi) // 2
      lo, hi = (lo, mid) if end_marker in decode(tokens[:mid]) else (mid + 1, hi)
    return tokens[:lo], text.split(end_marker, 1)[0]
  return tokens[: end + 1 if stopped else end], text


def _local_rows(completions_BxT: jax.Array, done_B: jax.Array) -> dict[int, tuple[np.ndarray, bool]]:
  """{global row: (its new tokens, whether it stopped)} for the rows this process's devices hold."""
  done = {}
  for shard in done_B.addressable_shards:
    for i, r in enumerate(range(*shard.index[0].indices(done_B.shape[0]))):
      done[r] = bool(np.asarray(shard.data)[i])
  rows = {}
  for shard in completions_BxT.addressable_shards:
    data = np.asarray(shard.data)
    for i, r in enumerate(range(*shard.index[0].indices(completions_BxT.shape[0]))):
      rows[r] = (data[i], done[r])
  return rows
