"""Supervised fine-tuning data: chat JSONL -> conversations of tokens with a loss weight each.

Each line of a `data.files` JSONL file is one conversation, either
  {"prompt": "...", "response": "..."}                      (optionally "system": "...")
  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
rendered with `data.chat_template` (data/chat.py) and tokenized piece by piece: assistant turns weigh 1, the
rest 0. The conversations are the pipeline's documents (pipeline.py): the held-out split is decided by each
line's key (`<file>@<byte offset>`, as for plain JSONL corpora), and rows are packed with whole conversations
(packing.py's whole_documents), so a response always sees its prompt and packed conversations stay apart
(their own segment ids, positions from 0). The files are small next to a pretraining corpus: every process
reads and tokenizes them itself, in the same order, with no cache.
"""

import json
import logging
from collections.abc import Iterator

import numpy as np
from etils import epath

from data import chat
from data.errors import DataError
from data.packing import PackedRows
from data.sources import _expand_globs, eval_hash
from data.tokenizer import Tokenizer

_log = logging.getLogger(__name__)


def jsonl_records(files: str) -> Iterator[tuple[str, str, dict]]:
  """(key, "path:line", record) for every non-blank line of the JSONL files `files` (comma-separated globs)."""
  if not files:
    raise DataError("data.files is empty; fine-tuning needs JSONL files, e.g. --config.data.files=examples/sft.jsonl")
  for source in _expand_globs(files):
    with epath.Path(source.path).open("rb") as f:
      offset = 0
      for number, raw in enumerate(f, start=1):
        where = f"{source.path}:{number}"
        if raw.strip():
          try:
            record = json.loads(raw)
          except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{where}: not valid JSON ({e}); fix or remove the line") from None
          if not isinstance(record, dict):
            raise DataError(f"{where}: a line must be a JSON object; see docs/fine-tuning.md for the formats")
          yield f"{source.key}@{offset}", where, record
        offset += len(raw)


def conversation_messages(record: dict, where: str) -> list[dict]:
  """The messages of an SFT line in either format."""
  if "messages" in record:
    return chat.check_messages(record["messages"], where)
  if isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
    system = record.get("system")
    head = [{"role": "system", "content": system}] if isinstance(system, str) else []
    return head + [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]
  raise DataError(
    f"{where}: an SFT line needs string 'prompt' and 'response' fields, or 'messages'; "
    "see docs/fine-tuning.md for the formats"
  )


def encode_conversation(tokenizer: Tokenizer, messages: list[dict], fmt: str) -> tuple[np.ndarray, np.ndarray]:
  """(int32 tokens, float32 loss weights) of a rendered conversation: 1 on assistant pieces, 0 elsewhere."""
  tokens, weights = [], []
  for text, trained in chat.render(messages, fmt):
    ids = tokenizer.encode(text)
    tokens += ids
    weights += [float(trained)] * len(ids)
  return np.asarray(tokens, np.int32), np.asarray(weights, np.float32)


def held_out_split(hashes: np.ndarray, eval_fraction: float) -> np.ndarray:
  """bool per example, as TokenCache.held_out: hash under the fraction; at least one of two or more examples."""
  if eval_fraction <= 0 or len(hashes) < 2:
    return np.zeros(len(hashes), bool)
  held_out = hashes < eval_fraction
  if not held_out.any():
    held_out[np.argmin(hashes)] = True
  return held_out


class Conversations:
  """Tokenized conversations, the pipeline's documents for train.objective=sft (the TokenCache interface)."""

  def __init__(self, tokens: list[np.ndarray], weights: list[np.ndarray], keys: list[str], description: str):
    assert len(tokens) == len(weights) == len(keys)
    self.corpus_description = description
    self.doc_length = np.asarray([len(t) for t in tokens], np.int64)
    self._offsets = np.concatenate([[0], np.cumsum(self.doc_length)])
    self._tokens = np.concatenate(tokens) if tokens else np.zeros(0, np.int32)
    self._weights = np.concatenate(weights) if weights else np.zeros(0, np.float32)
    self.eval_hash = np.asarray([eval_hash(k) for k in keys], np.float64)

  def __len__(self) -> int:
    return len(self.doc_length)

  def tokens(self, doc: int, lo: int, hi: int) -> np.ndarray:
    return self._tokens[self._offsets[doc] + lo : self._offsets[doc] + hi]

  def weights(self, doc: int, lo: int, hi: int) -> np.ndarray:
    return self._weights[self._offsets[doc] + lo : self._offsets[doc] + hi]

  def held_out(self, eval_fraction: float) -> np.ndarray:
    return held_out_split(self.eval_hash, eval_fraction)

  def packed_rows(self, documents: np.ndarray, row_len: int, tokenizer: Tokenizer, *, seed: int, shuffle: bool):
    """Rows of whole conversations among `documents` (indices in file order)."""
    rows = PackedRows(
      lambda d, lo, hi: self.tokens(int(documents[d]), lo, hi),
      self.doc_length[documents],
      row_len=row_len,
      bos_id=tokenizer.bos_id,
      eos_id=tokenizer.eos_id,
      pad_id=tokenizer.pad_id,
      seed=seed,
      shuffle=shuffle,
      read_weights=lambda d, lo, hi: self.weights(int(documents[d]), lo, hi),
      whole_documents=True,
    )
    if rows.truncated:
      _log.warning(
        "%d of %d conversations are longer than data.seq_len=%d and are cut at its end; raise data.seq_len to keep "
        "them whole",
        rows.truncated,
        len(documents),
        row_len - 1,
      )
    return rows


def load_conversations(data_cfg, tokenizer: Tokenizer) -> Conversations:
  """Every conversation of `data.files`, tokenized with `data.chat_template`."""
  fmt = chat.checked_turn_format(data_cfg.chat_template)
  tokens, weights, keys, untrained = [], [], [], 0
  for key, where, record in jsonl_records(data_cfg.files):
    t, w = encode_conversation(tokenizer, conversation_messages(record, where), fmt)
    untrained += not w.any()
    tokens.append(t)
    weights.append(w)
    keys.append(key)
  if not tokens:
    raise DataError(
      f"data.files={data_cfg.files!r} holds no conversation; add JSONL lines (formats: docs/fine-tuning.md)"
    )
  if untrained:
    _log.warning("%d conversation(s) have no assistant turn: they train on nothing", untrained)
  return Conversations(tokens, weights, keys, f"data.files={data_cfg.files!r} (chat, {data_cfg.chat_template!r})")
