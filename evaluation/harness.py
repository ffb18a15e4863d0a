"""kiln as an lm-evaluation-harness model (`lm_eval.api.model.TemplateLM`): a Decoder and its parameters answer
the harness's three request types.

- loglikelihood / loglikelihood_rolling: teacher-forced. Every request becomes one token sequence whose last n
  targets are scored; sequences are sorted by length and packed first-fit into rows (each its own segment id,
  positions from 0), `batch_size` rows per device call on the decoder's mesh. Only the target log-probabilities
  and greedy flags [B, T] come back to the host.
- generate_until: the KV-cache decoder (prefill, then one jitted step per token), `batch_size` prompts at a time;
  a row stops at EOS, at a stop string (checked on the decoded text after every step), or after max_gen_toks.

Tokens follow lm-eval's Hugging Face model (`lm_eval.models.huggingface.HFLM`) so the numbers agree: a string is
encoded with a BOS first (`add_bos_token`, kiln's runs all train with one) unless it already starts with the BOS
text; a (context, continuation) pair is encoded whole and split after the context's tokens, trailing spaces of
the context moved to the continuation; an empty context is the BOS alone (`prefix_token_id`); sequences longer
than `max_length` + 1 lose tokens on the left; rolling windows are lm-eval's own (`get_rolling_token_windows`,
prefix BOS, context 1), which also means a string encoded with a BOS scores that BOS after the prefix BOS, as
HFLM does. Log-probabilities are normalised over every row of the LM head (as training's loss and HF are).

Multi-host: every process builds a KilnLM over the same global mesh; process 0 runs the harness and every
device call it makes is first broadcast to the others (`multihost_utils.broadcast_one_to_all`: an op code and
its arrays), which wait in `follow()` and make the same call, until `release()`.
"""

import dataclasses
import logging
from collections.abc import Sequence

import jax
import numpy as np
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from data.tokenizer import Tokenizer
from evaluation.packing import bucket, pack_rows
from generation.decoding import Decoder, right_pad
from generation.sampling import Sampling

_log = logging.getLogger(__name__)

# Device calls, as broadcast to the following processes: a header of _HEADER float64 values (the op first).
_STOP, _SCORE, _PREFILL, _STEP = 0, 1, 2, 3
_HEADER = 16


@dataclasses.dataclass
class _Generation:
  """What the decode steps of one generate_until batch carry between calls (on every process)."""

  cache: object
  next_B: jax.Array
  lengths_B: np.ndarray
  key: jax.Array
  sampling: Sampling


class KilnLM(TemplateLM):
  """kiln's decoder as an lm-eval model. `batch_size`: rows per device call (rounded up to a multiple of the
  mesh's batch shards); `pack`: many requests per row (False: one request per row, the unpacked baseline);
  `max_length`: the longest sequence scored (default the model's max_len); `chat_template`: a kiln turn format
  (data/chat.py) for --apply_chat_template."""

  def __init__(
    self,
    decoder: Decoder,
    params,
    tokenizer: Tokenizer,
    *,
    batch_size: int = 8,
    pack: bool = True,
    max_length: int | None = None,
    add_bos_token: bool = True,
    max_gen_toks: int = 256,
    chat_template: str | None = None,
    seed: int = 0,
  ) -> None:
    super().__init__()
    self.decoder, self.params, self.kiln_tokenizer = decoder, params, tokenizer
    shards = decoder._batch_shards()
    self.rows_per_call = -(-max(batch_size, 1) // shards) * shards
    self.pack = pack
    self._max_length = max_length or decoder.model_cfg.max_len
    self.add_bos_token = add_bos_token
    self._max_gen_toks = max_gen_toks
    self._chat_format = chat_template
    self.seed = seed
    self._gen: _Generation | None = None
    self.device_calls = 0  # scoring calls made (the benchmark reports requests per call)

  # The harness's view of the model ---------------------------------------------------------------------------

  @property
  def eot_token_id(self) -> int:
    return self.kiln_tokenizer.eos_id

  @property
  def prefix_token_id(self) -> int:
    bos = self.kiln_tokenizer.bos_id
    return bos if bos is not None and bos >= 0 else self.kiln_tokenizer.eos_id

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return self.kiln_tokenizer.model_path.replace("/", "__")

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len=None, **kwargs):
    add = self.add_bos_token if add_special_tokens is None else add_special_tokens
    bos_text = self.kiln_tokenizer.id_to_piece(self.prefix_token_id)
    if add_special_tokens is None and bos_text and string.startswith(bos_text):
      add = False  # the string brings its own BOS (HFLM's has_bos_prefix)
    ids = ([self.prefix_token_id] if add else []) + list(self.kiln_tokenizer.encode(string))
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens) -> str:
    return self.kiln_tokenizer.decode(tokens)

  def chat_template(self, chat_template: bool | str = False) -> str | None:
    return self._chat_format if chat_template else None

  def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
    from data.chat import checked_turn_format, prompt_text, render

    if not self._chat_format:
      raise ValueError(
        "--apply_chat_template needs a chat template: the run's config.data.chat_template is empty; "
        "train with one (chatml, llama3, plain or a turn format) or drop --apply_chat_template"
      )
    fmt = checked_turn_format(self._chat_format)
    if add_generation_prompt:
      return prompt_text(chat_history, fmt)
    return "".join(piece for piece, _ in render(chat_history, fmt))

  def get_model_info(self) -> dict:
    cfg = self.decoder.model_cfg
    return {"model_num_layers": cfg.num_layers, "model_d_model": cfg.d_model, "model_dtype": str(cfg.compute_dtype)}

  # Teacher-forced scoring -----------------------------------------------------------------------------------

  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    sequences = []
    for _, context_enc, continuation_enc in requests:
      assert context_enc and continuation_enc, "lm-eval gives a context and a continuation of one token at least"
      whole = (list(context_enc) + list(continuation_enc))[-(self.max_length + 1) :]
      sequences.append((whole, min(len(continuation_enc), len(whole) - 1)))
    return self.score_sequences(sequences)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    pairs, owner = [], []
    for i, (string,) in enumerate(req.args for req in requests):
      windows = get_rolling_token_windows(
        token_list=self.tok_encode(string), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
        context_len=1,
      )  # fmt: skip
      for context, continuation in map(make_disjoint_window, windows):
        pairs.append(((None, None), context, continuation))
        owner.append(i)
    totals = [0.0] * len(requests)
    for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(pairs)):
      totals[i] += logprob
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
    return totals

  def score_sequences(self, sequences: Sequence[tuple[Sequence[int], int]]) -> list[tuple[float, bool]]:
    """(sum of log-probabilities of the last n tokens of each sequence given those before, whether each was the
    argmax) for (tokens, n) pairs; tokens[0] is never scored."""
    lengths = [len(tokens) - 1 for tokens, _ in sequences]
    if self.pack:
      rows = pack_rows(lengths, self.max_length)
    else:
      rows = [[i] for i in sorted(range(len(lengths)), key=lambda i: -lengths[i])]
    results: list[tuple[float, bool]] = [(0.0, False)] * len(sequences)
    for start in range(0, len(rows), self.rows_per_call):
      call = rows[start : start + self.rows_per_call]
      width = bucket(max(sum(lengths[i] for i in row) for row in call), self.max_length)
      arrays = np.zeros((4, self.rows_per_call, width), np.int32)  # tokens, positions, segments, targets
      slots = []
      for r, row in enumerate(call):
        offset = 0
        for segment, i in enumerate(row, start=1):
          tokens, n = sequences[i]
          length = lengths[i]
          span = slice(offset, offset + length)
          arrays[0, r, span], arrays[3, r, span] = tokens[:-1], tokens[1:]
          arrays[1, r, span], arrays[2, r, span] = np.arange(length), segment
          slots.append((i, r, offset + length - n, offset + length))
          offset += length
      logprob_BxT, greedy_BxT = self._call(_SCORE, np.zeros(0), arrays)
      for i, r, lo, hi in slots:
        results[i] = (float(logprob_BxT[r, lo:hi].sum(dtype=np.float64)), bool(greedy_BxT[r, lo:hi].all()))
    return results

  # Generation -----------------------------------------------------------------------------------------------

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    eos = self.kiln_tokenizer.id_to_piece(self.eot_token_id)
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    results = [""] * len(requests)
    for indices in groups.values():
      kwargs = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
      max_new = int(kwargs.pop("max_gen_toks"))
      sampling = Sampling(
        temperature=float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0,
        top_k=int(kwargs.get("top_k") or 0),
        top_p=float(kwargs.get("top_p") or 1.0),
      )
      if self.max_length - max_new <= 0:
        raise ValueError(
          f"a task asks for {max_new} new tokens but the model holds {self.max_length} positions; "
          "lower the task's max_gen_toks"
        )
      prompts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_new) for i in indices]
      order = sorted(range(len(indices)), key=lambda j: -len(prompts[j]))
      for start in range(0, len(order), self.rows_per_call):
        batch = order[start : start + self.rows_per_call]
        texts = self._generate([prompts[j] for j in batch], max_new, until, sampling)
        for j, text in zip(batch, texts):
          results[indices[j]] = text
          self.cache_hook.add_partial("generate_until", requests[indices[j]].args, text)
    return results

  def _generate(self, prompts: list[list[int]], max_new: int, until: list[str], sampling: Sampling) -> list[str]:
    """Completions of up to rows_per_call prompts, each cut at its first stop string (lm-eval's rule)."""
    count = len(prompts)
    prompts = prompts + [prompts[-1]] * (self.rows_per_call - count)  # whole batch shards; extra rows unread
    tokens_BxP, lengths_B = right_pad(prompts, max(self.kiln_tokenizer.pad_id, 0))
    width = bucket(tokens_BxP.shape[1], self.max_length - max_new)  # few prompt widths: few compiles
    tokens_BxP = np.pad(tokens_BxP, ((0, 0), (0, width - tokens_BxP.shape[1])))
    header = np.array([max_new, sampling.temperature, sampling.top_k, sampling.top_p, self.seed], np.float64)
    next_B = self._call(_PREFILL, header, tokens_BxP, lengths_B)
    outputs: list[list[int]] = [[] for _ in range(count)]
    done = [False] * count
    for t in range(max_new):
      for row in range(count):
        if done[row]:
          continue
        if next_B[row] == self.eot_token_id:
          done[row] = True
          continue
        outputs[row].append(int(next_B[row]))
        text = self.tok_decode(outputs[row])
        done[row] = any(stop and stop in text for stop in until)
      if all(done) or t + 1 == max_new:
        break
      next_B = self._call(_STEP, np.array([t], np.float64))
    return [postprocess_generated_text(self.tok_decode(o), until, None) for o in outputs]

  # Device calls (mirrored on every process) -------------------------------------------------------------------

  def _call(self, op: int, header: np.ndarray, *arrays: np.ndarray):
    """Runs one device call; on a multi-host mesh, process 0 first broadcasts it to the followers."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      assert jax.process_index() == 0, "only process 0 drives the harness; the others call follow()"
      shapes = [s for a in arrays for s in a.shape]
      full = np.zeros(_HEADER, np.float64)
      full[: 2 + len(shapes) + header.size] = [op, len(arrays), *shapes, *header]
      multihost_utils.broadcast_one_to_all(full)
      for a in arrays:
        multihost_utils.broadcast_one_to_all(a)
    return self._op(op, header, arrays)

  def _op(self, op: int, header: np.ndarray, arrays) -> tuple | np.ndarray:
    decoder = self.decoder
    if op == _SCORE:
      (arrays,) = arrays
      self.device_calls += 1
      logprob, greedy = decoder.token_logprobs(self.params, *arrays)
      return np.asarray(logprob), np.asarray(greedy)
    if op == _PREFILL:
      tokens_BxP, lengths_B = arrays
      max_new, temperature, top_k, top_p, seed = header[:5].tolist()
      sampling = Sampling(temperature, int(top_k), top_p)
      key = jax.random.PRNGKey(int(seed))
      cache = decoder.new_cache(tokens_BxP.shape[0], tokens_BxP.shape[1] + int(max_new))
      first_key = jax.random.fold_in(key, 0)
      next_B, _, cache = decoder.prefill(self.params, tokens_BxP, lengths_B, cache, first_key, sampling)
      self._gen = _Generation(cache, next_B, np.asarray(lengths_B, np.int32), key, sampling)
      return _host(next_B)
    if op == _STEP:
      g, t = self._gen, int(header[0])
      positions_B = g.lengths_B + t
      key = jax.random.fold_in(g.key, t + 1)
      g.next_B, _, g.cache = decoder.step(self.params, g.next_B, positions_B, g.cache, key, g.sampling)
      return _host(g.next_B)
    raise AssertionError(f"unknown device call {op}")

  def follow(self) -> None:
    """On processes other than 0: make the device calls process 0 broadcasts, until it calls `release()`."""
    from jax.experimental import multihost_utils

    while True:
      full = np.asarray(multihost_utils.broadcast_one_to_all(np.zeros(_HEADER, np.float64)))
      op, count = int(full[0]), int(full[1])
      if op == _STOP:
        return
      ndims = {_SCORE: [3], _PREFILL: [2, 1], _STEP: []}[op]
      assert len(ndims) == count, (op, count)
      at, arrays = 2, []
      for ndim in ndims:
        shape = tuple(int(s) for s in full[at : at + ndim])
        at += ndim
        arrays.append(np.asarray(multihost_utils.broadcast_one_to_all(np.zeros(shape, np.int32))))
      self._op(op, full[at:], arrays)

  def release(self) -> None:
    """On process 0, after the last request: lets the followers' `follow()` return."""
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils

      multihost_utils.broadcast_one_to_all(np.zeros(_HEADER, np.float64))


def _host(x: jax.Array) -> np.ndarray:
  """A (possibly batch-sharded) device array as one host array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
