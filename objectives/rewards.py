"""Reward functions of train.objective=grpo: the shipped ones, the user's, and calling them safely.

A reward function is `fn(prompts: list[str], completions: list[str], **fields) -> list[float]`, one number per
completion. `fields` holds, for each field of the prompt lines besides the prompt (an "answer", test cases, ...), a
list with that field's value for each completion (None where a line lacks it), and `completion_tokens`: the
number of tokens of each completion, its stop token included.

`grpo.rewards` is a comma-separated list of the shipped names below or of `module:function` /
`path/to/file.py:function`. The shipped ones:
- `exact_answer`: 1 when the completion's final answer (the last `#### 42` or `\\boxed{42}`) equals the line's
  "answer" field (numbers compared as numbers, "1,000" = "1000.0"), else 0;
- `format`: 1 when the stripped completion matches `grpo.format_pattern` whole, else 0;
- `overlong`: DAPO's soft length penalty: 0 up to max_new_tokens - grpo.overlong_window tokens, then falling
  linearly to -1 at max_new_tokens.
"""

import functools
import math
import numbers
import re
from collections.abc import Callable, Sequence

import numpy as np

from data.errors import DataError
from objectives import import_attribute

RewardFn = Callable[..., Sequence[float]]

_ANSWER = re.compile(r"####\s*(\S+)|\\boxed\{([^{}]*)\}")


class RewardError(DataError):
  """A reward function raised or returned something other than one number per completion; one line."""


def final_answer(completion: str) -> str | None:
  """The last `#### X` (X up to the next whitespace) or `\\boxed{X}` of a completion, stripped; None without one."""
  matches = list(_ANSWER.finditer(completion))
  if not matches:
    return None
  last = matches[-1]
  return (last.group(1) if last.group(1) is not None else last.group(2)).strip()


def _same_answer(given: str | None, expected) -> bool:
  if given is None or expected is None:
    return False
  given, expected = given.replace(",", "").strip().rstrip("."), str(expected).replace(",", "").strip()
  try:
    return math.isclose(float(given), float(expected), rel_tol=0, abs_tol=1e-9)
  except ValueError:
    return given == expected


def exact_answer(prompts, completions, answer=None, **fields) -> list[float]:
  del prompts, fields
  answers = answer if answer is not None else [None] * len(completions)
  return [float(_same_answer(final_answer(c), a)) for c, a in zip(completions, answers)]


def format_match(prompts, completions, *, pattern: str, **fields) -> list[float]:
  del prompts, fields
  compiled = re.compile(pattern, re.DOTALL)
  return [float(compiled.fullmatch(c.strip()) is not None) for c in completions]


def overlong(prompts, completions, *, completion_tokens, max_new_tokens: int, window: int, **fields) -> list[float]:
  del prompts, completions, fields
  free = max_new_tokens - window
  return [0.0 if n <= free else max(-1.0, (free - n) / max(window, 1)) for n in completion_tokens]


def shipped(grpo_cfg) -> dict[str, RewardFn]:
  """The shipped reward functions by name, with their settings from config.grpo."""
  return {
    "exact_answer": exact_answer,
    "format": functools.partial(format_match, pattern=grpo_cfg.format_pattern),
    "overlong": functools.partial(overlong, max_new_tokens=grpo_cfg.max_new_tokens, window=grpo_cfg.overlong_window),
  }


def reward_functions(grpo_cfg) -> dict[str, RewardFn]:
  """grpo.rewards as {name: function}, in order; RewardError (one line) for a name that imports nothing callable."""
  builtin = shipped(grpo_cfg)
  functions = {}
  for name in [n.strip() for n in grpo_cfg.rewards.split(",") if n.strip()]:
    if name in builtin:
      functions[name] = builtin[name]
      continue
    if ":" not in name:
      raise RewardError(
        f"config.grpo.rewards: {name!r} is not one of {', '.join(builtin)}; name a function of your own as "
        "module:function or path/to/file.py:function"
      )
    try:
      fn = import_attribute(name)
    except (ImportError, AttributeError) as e:
      raise RewardError(f"config.grpo.rewards: {name}: {e}") from None
    if not callable(fn):
      raise RewardError(f"config.grpo.rewards: {name} is a {type(fn).__name__}, not a function")
    functions[name] = fn
  return functions


def reward_weights(grpo_cfg, count: int) -> np.ndarray:
  """grpo.reward_weights as float64 [count]; empty means every function weighs 1."""
  text = grpo_cfg.reward_weights.strip()
  if not text:
    return np.ones(count)
  return np.array([float(w) for w in text.split(",")])


def score(functions: dict[str, RewardFn], prompts: list[str], completions: list[str], fields: dict) -> dict:
  """{name: float64 [n]}: each function's rewards of the n completions; RewardError naming the function when it
  raises, returns another number of values, or a value that is not a finite number."""
  n = len(completions)
  scores = {}
  for name, fn in functions.items():
    try:
      values = fn(list(prompts), list(completions), **fields)
    except Exception as e:  # noqa: BLE001 (the user's function failed: one line naming it, the run stops)
      message = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
      raise RewardError(f"reward function {name} raised {type(e).__name__}: {message}; fix it and rerun") from None
    try:
      length = len(values)
    except TypeError:
      raise RewardError(
        f"reward function {name} returned a {type(values).__name__}; it must return a list of {n} numbers, one "
        "per completion"
      ) from None
    if length != n:
      raise RewardError(
        f"reward function {name} returned {length} values for {n} completions; return one per completion"
      )
    bad = [v for v in values if not isinstance(v, numbers.Real) or not math.isfinite(float(v))]
    if bad:
      raise RewardError(
        f"reward function {name} returned {bad[0]!r}, not a finite number; return a float for every completion"
      )
    scores[name] = np.asarray([float(v) for v in values], np.float64)
  return scores
