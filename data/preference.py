"""Preference data for DPO: JSONL pairs -> one row per pair, the chosen sequence then the rejected one.

Each line of a `data.files` JSONL file is one pair, either
  {"prompt": "...", "chosen": "...", "rejected": "..."}       (optionally "system": "...")
  {"messages": [...the conversation so far...], "chosen": ..., "rejected": ...}
where chosen and rejected are a string (one assistant reply) or a list of messages appended to the prompt.
Both are rendered with `data.chat_template` and tokenized as SFT conversations (sft.py): only the responses
carry loss weight.

Row layout: a pair is one row, [BOS chosen EOS][BOS rejected EOS] padding, with segment ids 1 (chosen) and 2
(rejected) and positions restarting at each. The DPO loss of a row is a function of that row alone, so any
split of the batch (devices, grad_accum microbatches) keeps pairs together. Each sequence gets half a row
(seq_len + 1 tokens), cut at its end when longer. Rows are visited in a new shuffled order each epoch, a pure
function of (seed, row index) as for the other data.
"""

import logging

import numpy as np

from data import chat
from data.errors import DataError
from data.packing import empty_row, shuffled_row
from data.sft import conversation_messages, encode_conversation, held_out_split, jsonl_records
from data.sources import eval_hash
from data.tokenizer import Tokenizer

_log = logging.getLogger(__name__)

CHOSEN_SEGMENT, REJECTED_SEGMENT = 1, 2


def _pair_messages(record: dict, where: str) -> tuple[list[dict], list[dict]]:
  """(prompt + chosen, prompt + rejected) messages of a preference line."""
  if "messages" in record:
    prompt = chat.check_messages(record["messages"], where)
  elif isinstance(record.get("prompt"), str):
    prompt = conversation_messages({**record, "response": ""}, where)[:-1]
  else:
    raise DataError(
      f"{where}: a preference line needs a string 'prompt' (or 'messages') and 'chosen' and 'rejected'; "
      "see docs/fine-tuning.md for the formats"
    )

  def reply(name: str) -> list[dict]:
    value = record.get(name)
    if isinstance(value, str):
      return [{"role": "assistant", "content": value}]
    if isinstance(value, list):
      return chat.check_messages(value, f"{where} ({name})")
    raise DataError(
      f"{where}: {name!r} must be a string or a list of messages; see docs/fine-tuning.md for the formats"
    )

  return prompt + reply("chosen"), prompt + reply("rejected")


class PreferencePairs:
  """Tokenized (chosen, rejected) pairs: the pipeline's documents for train.objective=dpo."""

  def __init__(self, pairs: list[tuple[tuple[np.ndarray, np.ndarray], ...]], keys: list[str], description: str):
    self._pairs = pairs  # [((chosen tokens, weights), (rejected tokens, weights))]
    self.corpus_description = description
    self.eval_hash = np.asarray([eval_hash(k) for k in keys], np.float64)

  def __len__(self) -> int:
    return len(self._pairs)

  def held_out(self, eval_fraction: float) -> np.ndarray:
    return held_out_split(self.eval_hash, eval_fraction)

  def packed_rows(self, documents: np.ndarray, row_len: int, tokenizer: Tokenizer, *, seed: int, shuffle: bool):
    rows = PairRows([self._pairs[int(d)] for d in documents], row_len, tokenizer, seed=seed, shuffle=shuffle)
    if rows.truncated:
      _log.warning(
        "%d of %d preference pairs have a side longer than half a row (data.seq_len=%d) and are cut at its end; "
        "raise data.seq_len to keep them whole",
        rows.truncated,
        len(documents),
        row_len - 1,
      )
    return rows


class PairRows:
  """Row i (global, epoch after epoch) = one pair, as the module docstring lays it out."""

  def __init__(self, pairs: list, row_len: int, tokenizer: Tokenizer, *, seed: int, shuffle: bool) -> None:
    assert pairs, "no pairs to make rows of"
    assert row_len >= 6, "a pair needs room for two sequences of BOS, one token, EOS"
    self._pairs = pairs
    self._row_len = row_len
    self._half = row_len // 2 - 2  # body tokens per side
    self._bos_id, self._eos_id, self._pad_id = tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id
    self._seed = seed % 2**63
    self._shuffle = shuffle
    self.rows_per_epoch = len(pairs)
    self.truncated = sum(any(len(t) > self._half for t, _ in pair) for pair in pairs)

  def __len__(self) -> int:
    return 2**62

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    epoch, row = divmod(int(index), self.rows_per_epoch)
    if self._shuffle:
      row = shuffled_row(row, self.rows_per_epoch, seed=self._seed, epoch=epoch)
    out = empty_row(self._row_len, self._pad_id, weighted=True)
    at = 0
    for segment, (tokens, weights) in zip((CHOSEN_SEGMENT, REJECTED_SEGMENT), self._pairs[row]):
      body, body_weights = tokens[: self._half], weights[: self._half]
      n = len(body) + 2
      out["tokens"][at : at + n] = [self._bos_id, *body.tolist(), self._eos_id]
      out["loss_weights"][at + 1 : at + n - 1] = body_weights
      out["loss_weights"][at + n - 1] = body_weights[-1] if len(body) else 0.0  # EOS: as the reply's last token
      out["segment_ids"][at : at + n] = segment
      out["positions"][at : at + n] = np.arange(n, dtype=np.int32)
      at += n
    return out


def load_preferences(data_cfg, tokenizer: Tokenizer) -> PreferencePairs:
  """Every pair of `data.files`, tokenized with `data.chat_template`."""
  fmt = chat.checked_turn_format(data_cfg.chat_template)
  pairs, keys = [], []
  for key, where, record in jsonl_records(data_cfg.files):
    chosen, rejected = _pair_messages(record, where)
    pairs.append((encode_conversation(tokenizer, chosen, fmt), encode_conversation(tokenizer, rejected, fmt)))
    keys.append(key)
  if not pairs:
    raise DataError(
      f"data.files={data_cfg.files!r} holds no preference pair; add JSONL lines (formats: docs/fine-tuning.md)"
    )
  return PreferencePairs(pairs, keys, f"data.files={data_cfg.files!r} (preference pairs, {data_cfg.chat_template!r})")
