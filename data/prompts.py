"""Prompts for reinforcement learning (train.objective=grpo): JSONL lines -> token ids, text and reward fields.

Each line of a `data.files` JSONL file is one prompt, either
  {"prompt": "...", ...}                                     (a user turn)
  {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...], ...}
rendered with `data.chat_template` (data/chat.py) and followed by the head of an assistant turn, so the model
answers as it learned to in SFT; the template "{content}" leaves a plain prompt as it is (for base models). Every
other field of the line (an "answer", test cases, ...) is handed to the reward functions with the completions.

The files are small next to a pretraining corpus: every process reads them all, in the same order, with no cache,
and the prompt of global row r is a pure function of (files, seed, r): rows go through the prompts in an order
shuffled anew each epoch.
"""

import dataclasses

import numpy as np

from data import chat
from data.errors import DataError
from data.permutation import permutation_key, permute
from data.sft import jsonl_records
from data.tokenizer import Tokenizer

_ORDER_SALT = 0x6772706F  # "grpo": prompt order apart from every other use of the seed


@dataclasses.dataclass(frozen=True)
class Prompt:
  tokens: list[int]  # BOS, the rendered prompt and the head of the assistant turn
  text: str  # the "prompt" field as written, or the rendered conversation (what reward functions see)
  fields: dict  # every other field of the line


def prompt_messages(record: dict, where: str) -> list[dict]:
  """The conversation a prompt line asks the model to continue."""
  if "messages" in record:
    return chat.check_messages(record["messages"], where)
  if isinstance(record.get("prompt"), str):
    return [{"role": "user", "content": record["prompt"]}]
  raise DataError(f"{where}: a prompt line needs a string 'prompt' field or 'messages' (see docs/fine-tuning.md)")


def load_prompts(data_cfg, tokenizer: Tokenizer) -> list[Prompt]:
  """Every prompt of `data.files`, tokenized with `data.chat_template`, in file order."""
  fmt = chat.checked_turn_format(data_cfg.chat_template)
  prompts = []
  for _, where, record in jsonl_records(data_cfg.files):
    messages = prompt_messages(record, where)
    text = chat.prompt_text(messages, fmt)
    tokens = [tokenizer.bos_id, *tokenizer.encode(text)]
    fields = {k: v for k, v in record.items() if k not in ("prompt", "messages")}
    prompts.append(Prompt(tokens, record["prompt"] if "prompt" in record else text, fields))
  if not prompts:
    raise DataError(f"data.files={data_cfg.files!r} holds no prompt; add JSONL lines with a 'prompt' field")
  return prompts


def prompt_order(rows: np.ndarray, count: int, seed: int, shuffle: bool) -> np.ndarray:
  """The index of the prompt that global row r of the rollouts takes, for each r in `rows`: every prompt once per
  epoch of `count` rows, in an order keyed by (seed, epoch)."""
  rows = np.asarray(rows, np.int64)
  epoch, within = rows // count, rows % count
  if not shuffle:
    return within
  return np.array([permute(int(i), count, permutation_key(_ORDER_SALT, seed, int(e))) for e, i in zip(epoch, within)])
