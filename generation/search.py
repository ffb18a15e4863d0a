"""Generation loops on top of the jitted decoder: sampling (greedy, temperature, top-k, top-p) and beam search.

A row ends when it produces a stop id (the tokenizer's EOS and any the user adds; the stop id is not part of the
completion) or after `max_new_tokens`. Each loop dispatches step t + 1 before it reads step t's tokens on the
host, so the device never waits for Python; the price is one step computed past the end.
"""

import dataclasses
from collections.abc import Callable, Sequence

import jax
import numpy as np

from generation.decoding import Decoder, new_beams, right_pad
from generation.sampling import Sampling


@dataclasses.dataclass
class Completion:
  tokens: list[int]  # the new tokens, without the stop id
  stopped: bool  # True: ended on a stop id; False: reached max_new_tokens
  score: float | None = None  # beam search: the summed log-probability of the tokens (and the stop id)


def _check(prompts: Sequence[Sequence[int]], max_new_tokens: int, decoder: Decoder) -> None:
  assert prompts and all(len(p) > 0 for p in prompts), "every prompt needs at least one token"
  assert max_new_tokens > 0, max_new_tokens
  cfg = decoder.model_cfg
  longest = max(len(p) for p in prompts) + max_new_tokens
  # Learned position embeddings exist only up to max_len; rope and sinusoidal positions go on (quality aside).
  assert cfg.position_type != "learned" or longest <= cfg.max_len, (longest, cfg.max_len)


def generate(
  decoder: Decoder,
  params,
  prompts: Sequence[Sequence[int]],
  *,
  max_new_tokens: int,
  sampling: Sampling,
  stop_ids: Sequence[int],
  seed: int = 0,
  pad_id: int = 0,
  on_token: Callable[[int, int], None] | None = None,
) -> list[Completion]:
  """Samples a completion of every prompt (token ids, BOS included if wanted); `on_token(row, id)` is called
  for every new token as it is read back (not for the stop id)."""
  _check(prompts, max_new_tokens, decoder)
  tokens_BxP, lengths_B = right_pad([list(p) for p in prompts], pad_id)
  batch, width = tokens_BxP.shape
  key = jax.random.PRNGKey(seed)
  cache = decoder.new_cache(batch, width + max_new_tokens)
  next_B, _, cache = decoder.prefill(params, tokens_BxP, lengths_B, cache, jax.random.fold_in(key, 0), sampling)
  stop = set(int(i) for i in stop_ids)
  outputs = [Completion([], False) for _ in range(batch)]
  for t in range(max_new_tokens):
    current_B = next_B
    if t + 1 < max_new_tokens:
      positions_B = lengths_B + t
      next_B, _, cache = decoder.step(params, current_B, positions_B, cache, jax.random.fold_in(key, t + 1), sampling)
    for row, token in enumerate(np.asarray(current_B).tolist()):
      out = outputs[row]
      if out.stopped:
        continue
      if token in stop:
        out.stopped = True
      else:
        out.tokens.append(token)
        if on_token is not None:
          on_token(row, token)
    if all(out.stopped for out in outputs):
      break
  return outputs


def beam_search(
  decoder: Decoder,
  params,
  prompts: Sequence[Sequence[int]],
  *,
  width: int,
  max_new_tokens: int,
  stop_ids: Sequence[int],
  pad_id: int = 0,
) -> list[Completion]:
  """The highest-scoring completion of every prompt among `width` beams (no length penalty; width 1 is greedy)."""
  _check(prompts, max_new_tokens, decoder)
  assert width >= 1 and stop_ids, (width, stop_ids)
  tokens_BxP, lengths_B = right_pad([list(p) for p in prompts], pad_id)
  batch, length = tokens_BxP.shape
  # Every prompt repeated once per beam: row r = prompt r // width, beam r % width.
  tokens_RxP, lengths_R = np.repeat(tokens_BxP, width, axis=0), np.repeat(lengths_B, width)
  cache = decoder.new_cache(batch * width, length + max_new_tokens)
  logprobs_RxV, cache = decoder.beam_prefill(params, tokens_RxP, lengths_R, cache)
  beams = new_beams(batch, width, max_new_tokens)
  for _ in range(max_new_tokens):
    beams, logprobs_RxV, cache = decoder.beam_step(params, beams, logprobs_RxV, lengths_R, cache, list(stop_ids))
    if bool(np.all(np.asarray(beams.finished_BxW))):
      break
  # top_k keeps the beams sorted: beam 0 is the best of each prompt.
  tokens_BxT, scores_B = np.asarray(beams.tokens_BxWxT[:, 0, : int(beams.t)]), np.asarray(beams.scores_BxW[:, 0])
  stop = set(int(i) for i in stop_ids)
  outputs = []
  for row in range(batch):
    tokens = tokens_BxT[row].tolist()
    end = next((i for i, token in enumerate(tokens) if token in stop), None)
    outputs.append(Completion(tokens[:end] if end is not None else tokens, end is not None, float(scores_B[row])))
  return outputs
