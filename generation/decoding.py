"""The model in decode mode: prefill a batch of prompts into a KV cache, then one jitted step per new token.

Prompts are right-padded to the longest: row b holds its prompt at slots [0, len_b), padding (segment 0, never
attended) up to P. Decode step t writes every row's new token at the same slot P + t with the row's own position
len_b + t; attention masks by position and segment, not slot, so the gap after a short prompt costs nothing but
its slots. The step has fixed shapes and compiles once per (batch, cache length).

The decode model differs from the trained one only where decoding needs it: MoE layers route dropless (a token's
output never depends on the other tokens of its batch, so prefill + steps equal the full forward; the capacity
path would drop by group), and the TPU splash kernel, which takes causality from slots, gives way to xla.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from generation.sampling import Sampling, mask_padding, sample
from model import ModelConfig
from model.attend import BACKENDS, resolve
from model.kv_cache import KVCache, cache_shardings, init_cache, select_rows
from model.params import abstract_model
from parallel.partition import param_specs, with_shardings
from parallel.rules import Rules, freeze, logical_to_spec, traced_under
from parallel.target import mesh_platform


def decode_config(model_cfg: ModelConfig, rules: Rules, platform: str) -> ModelConfig:
  """The model configuration decoding runs (module docstring): same parameters, dropless MoE, no dropout,
  `rules` for laying activations out on the decoder's mesh, and that mesh's `platform`."""
  attention = model_cfg.attention
  kernel = resolve(attention, platform, 1 << 20, model_cfg.dtype)
  if kernel == "splash" or BACKENDS.get(kernel, platform) != platform:  # decode steps are short: xla does them
    attention = "xla"
  changes = dict(dropout_rate=0.0, remat="none", attention=attention, rules=freeze(rules), platform=platform)
  if model_cfg.num_experts > 0:
    changes["capacity_factor"] = 0.0
  return dataclasses.replace(model_cfg, **changes)


class Decoder:
  """A model's jitted prefill, decode step, beam step and full forward on a mesh (one device: all sizes 1)."""

  def __init__(self, model_cfg: ModelConfig, vocab_size: int, mesh: Mesh, rules: Rules):
    self.model_cfg = decode_config(model_cfg, rules, mesh_platform(mesh))
    self.vocab_size = vocab_size  # the tokenizer's: ids past it are embedding padding, never chosen
    self.mesh, self.rules = mesh, rules
    self.graphdef, self.abstract_params, self.logical_names = abstract_model(self.model_cfg)
    specs = param_specs(self.abstract_params, self.logical_names, rules, mesh)
    self.param_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), specs)
    self._cache_shardings = cache_shardings(mesh, rules)
    self._jitted = {}

  def abstract_sharded_params(self):
    """ShapeDtypeStructs with shardings: what `storage.checkpoint.load_params` restores into."""
    return with_shardings(self.abstract_params, self.param_shardings)

  def new_cache(self, batch: int, length: int) -> KVCache:
    cfg = self.model_cfg
    return init_cache(cfg.num_layers, batch, length, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, self.mesh, self.rules)

  def _jit(self, name: str, fn, *, donate: tuple[int, ...] = (), static: tuple[int, ...] = ()):
    """`fn` jitted once, traced under the decoder's mesh (so the cache and activations are laid out on it)."""
    if name not in self._jitted:
      self._jitted[name] = jax.jit(traced_under(self.mesh, fn), donate_argnums=donate, static_argnums=static)
    return self._jitted[name]

  def _model(self, params):
    return nnx.merge(self.graphdef, nnx.State(params))

  # Full forward ---------------------------------------------------------------------------------------------

  def forward(self, params, tokens_BxT, segment_ids_BxT=None) -> jax.Array:
    """fp32 logits [B, T, V] of whole sequences (positions 0.., one document per row unless segments say)."""

    def run(params, tokens_BxT, segment_ids_BxT):
      positions_BxT = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32), tokens_BxT.shape)
      return self._model(params)(tokens_BxT, positions_BxT, segment_ids_BxT)[0]

    if segment_ids_BxT is None:
      segment_ids_BxT = jnp.ones(tokens_BxT.shape, jnp.int32)
    return self._jit("forward", run)(params, jnp.asarray(tokens_BxT, jnp.int32), jnp.asarray(segment_ids_BxT))

  def token_logprobs(self, params, tokens_BxT, positions_BxT, segment_ids_BxT, targets_BxT):
    """Teacher-forced scores of packed rows (several sequences per row, told apart by segment ids, positions
    restarting at 0): (log-probability of targets[b, t] after tokens[b, :t + 1] of its segment [B, T] fp32,
    whether it is the argmax [B, T] bool), normalised over every row of the LM head as the training loss is.
    Only these [B, T] leave the device, replicated, so every process of a multi-host mesh can read them."""

    def run(params, tokens_BxT, positions_BxT, segment_ids_BxT, targets_BxT):
      logits_BxTxV = self._model(params)(tokens_BxT, positions_BxT, segment_ids_BxT)[0]
      logprobs_BxTxV = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
      target_BxT = jnp.take_along_axis(logprobs_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
      greedy_BxT = jnp.argmax(logits_BxTxV, axis=-1) == targets_BxT
      replicated = NamedSharding(self.mesh, jax.sharding.PartitionSpec())
      return jax.lax.with_sharding_constraint((target_BxT, greedy_BxT), replicated)

    batch = NamedSharding(self.mesh, logical_to_spec(("batch", None), self.rules, self.mesh))
    args = [jax.device_put(np.asarray(a, np.int32), batch) for a in (tokens_BxT, positions_BxT, segment_ids_BxT)]
    targets = jax.device_put(np.asarray(targets_BxT, np.int32), batch)
    return self._jit("token_logprobs", run)(params, *args, targets)

  # Sampling -------------------------------------------------------------------------------------------------

  def prefill(self, params, tokens_BxP, lengths_B, cache: KVCache, key, sampling: Sampling):
    """Writes the right-padded prompts into an empty cache; -> (first new token [B], logits [B, V], cache)."""

    def run(sampling, params, tokens_BxP, lengths_B, cache, key):
      logits_BxV, cache = self._prefill_logits(params, tokens_BxP, lengths_B, cache)
      return sample(key, logits_BxV, sampling, self.vocab_size), logits_BxV, cache

    fn = self._jit("prefill", run, donate=(4,), static=(0,))
    return fn(sampling, params, jnp.asarray(tokens_BxP, jnp.int32), jnp.asarray(lengths_B, jnp.int32), cache, key)

  def step(self, params, tokens_B, positions_B, cache: KVCache, key, sampling: Sampling):
    """Feeds one token per row at its position; -> (next token [B], logits [B, V], cache)."""

    def run(sampling, params, tokens_B, positions_B, cache, key):
      logits_BxV, cache = self._step_logits(params, tokens_B, positions_B, cache)
      return sample(key, logits_BxV, sampling, self.vocab_size), logits_BxV, cache

    return self._jit("step", run, donate=(4,), static=(0,))(sampling, params, tokens_B, positions_B, cache, key)

  # Rollouts ---------------------------------------------------------------------------------------------

  def rollout(self, params, tokens_QxP, lengths_Q, rows_B, key, sampling: Sampling, max_new_tokens: int, stop_ids):
    """Samples a completion for every row b of prompt rows_B[b], all on the device in one call: the Q distinct
    prompts are prefilled once, their cache rows copied to the B rows that continue them, then up to
    `max_new_tokens` decode steps run in a loop that ends early once every row has produced a stop id.
    -> (tokens [B, max_new_tokens] int32: row b's new tokens, its first stop id included, anything after it
    meaningless; done [B] bool: whether the row produced a stop id). Token t of every row is drawn with
    fold_in(key, t), so the draw is the same on every layout of the same mesh size (threefry is partitionable)."""
    # The prompts' rows split evenly over the batch's devices (a dropless MoE's shard_map needs it): the last
    # prompt repeated as padding, never selected.
    tokens_QxP, lengths_Q = np.asarray(tokens_QxP), np.asarray(lengths_Q)
    padding = -len(lengths_Q) % self._batch_shards()
    tokens_QxP = np.concatenate([tokens_QxP, np.repeat(tokens_QxP[-1:], padding, axis=0)])
    lengths_Q = np.concatenate([lengths_Q, np.repeat(lengths_Q[-1:], padding)])
    fn = self._jit("rollout", self._rollout, static=(0, 1))
    args = (tokens_QxP, lengths_Q, rows_B, stop_ids)
    return fn(sampling, max_new_tokens, params, *(jnp.asarray(a, jnp.int32) for a in args), key)

  def _batch_shards(self) -> int:
    """How many ways the decoder's mesh splits a batch (the mesh axes of the logical `batch` axis)."""
    spec = logical_to_spec(("batch",), self.rules, self.mesh)[0]
    axes = () if spec is None else (spec,) if isinstance(spec, str) else spec
    return int(np.prod([self.mesh.shape[a] for a in axes]))

  def _rollout(self, sampling, max_new_tokens, params, tokens_QxP, lengths_Q, rows_B, stop_ids, key):
    cfg = self.model_cfg
    batch, width = rows_B.shape[0], tokens_QxP.shape[1]
    cache = init_cache(
      cfg.num_layers, tokens_QxP.shape[0], width + max_new_tokens, cfg.num_kv_heads, cfg.head_dim, cfg.dtype, None,
      self.rules,
    )  # fmt: skip
    logits_QxV, cache = self._prefill_logits(params, tokens_QxP, lengths_Q, cache)
    cache = select_rows(cache, rows_B, self.rules)
    lengths_B = jnp.take(lengths_Q, rows_B)
    first_B = sample(jax.random.fold_in(key, 0), jnp.take(logits_QxV, rows_B, axis=0), sampling, self.vocab_size)

    def unfinished(carry):
      t, _, _, done_B, _ = carry
      return (t < max_new_tokens) & ~jnp.all(done_B)

    def decode(carry):
      t, token_B, tokens_BxT, done_B, cache = carry
      tokens_BxT = jax.lax.dynamic_update_slice(tokens_BxT, token_B[:, None], (0, t))
      done_B = done_B | jnp.isin(token_B, stop_ids)
      logits_BxV, cache = self._step_logits(params, token_B, lengths_B + t, cache)
      token_B = sample(jax.random.fold_in(key, t + 1), logits_BxV, sampling, self.vocab_size)
      return t + 1, token_B, tokens_BxT, done_B, cache

    tokens_BxT = jnp.zeros((batch, max_new_tokens), jnp.int32)
    carry = (jnp.zeros((), jnp.int32), first_B, tokens_BxT, jnp.zeros((batch,), bool), cache)
    _, _, tokens_BxT, done_B, _ = jax.lax.while_loop(unfinished, decode, carry)
    return tokens_BxT, done_B

  def _prefill_logits(self, params, tokens_BxP, lengths_B, cache):
    slot_P = jnp.arange(tokens_BxP.shape[1], dtype=jnp.int32)
    segment_ids_BxP = (slot_P[None, :] < lengths_B[:, None]).astype(jnp.int32)
    positions_BxP = jnp.where(segment_ids_BxP == 1, slot_P[None, :], 0)
    model = self._model(params)
    h_BxPxD, cache = model.extend(tokens_BxP, positions_BxP, segment_ids_BxP, cache)
    last_Bx1xD = jnp.take_along_axis(h_BxPxD, (lengths_B - 1)[:, None, None], axis=1)
    return model.logits(last_Bx1xD)[:, 0], cache

  def _step_logits(self, params, tokens_B, positions_B, cache):
    model = self._model(params)
    ones_Bx1 = jnp.ones((tokens_B.shape[0], 1), jnp.int32)
    h_Bx1xD, cache = model.extend(tokens_B[:, None], positions_B[:, None], ones_Bx1, cache)
    return model.logits(h_Bx1xD)[:, 0], cache

  # Beam search ----------------------------------------------------------------------------------------------

  def beam_prefill(self, params, tokens_RxP, lengths_R, cache: KVCache):
    """Prefill of R = prompts x width rows; -> (log-probabilities [R, V] of the first token, cache)."""

    def run(params, tokens_RxP, lengths_R, cache):
      logits_RxV, cache = self._prefill_logits(params, tokens_RxP, lengths_R, cache)
      return jax.nn.log_softmax(mask_padding(logits_RxV, self.vocab_size), axis=-1), cache

    fn = self._jit("beam_prefill", run, donate=(3,))
    return fn(params, jnp.asarray(tokens_RxP, jnp.int32), jnp.asarray(lengths_R, jnp.int32), cache)

  def beam_step(self, params, beams: "Beams", logprobs_RxV, lengths_R, cache: KVCache, stop_ids):
    """Extends every beam by one token: keeps the `width` best (prompt's beams x vocabulary) continuations,
    reorders the cache rows after their parents and feeds the chosen tokens. A finished beam (it chose a stop
    id) continues only with its first stop id at log-probability 0, so its score stays and it keeps its place.
    -> (beams, log-probabilities [R, V] of the next token, cache)."""
    fn = self._jit("beam_step", _beam_step_fn(self), donate=(4,))
    return fn(params, beams, logprobs_RxV, lengths_R, cache, jnp.asarray(stop_ids, jnp.int32))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Beams:
  scores_BxW: jax.Array  # summed log-probabilities
  finished_BxW: jax.Array  # bool
  tokens_BxWxT: jax.Array  # chosen tokens so far, then whatever follows (cut at the first stop id)
  t: jax.Array  # int32: tokens chosen so far


def new_beams(prompts: int, width: int, max_new_tokens: int) -> Beams:
  # Every beam of a prompt starts as the same sequence: only beam 0 may be extended first, or the first step
  # would pick the same continuation `width` times.
  scores_BxW = jnp.tile(jnp.where(jnp.arange(width) == 0, 0.0, -jnp.inf)[None], (prompts, 1))
  return Beams(
    scores_BxW=scores_BxW.astype(jnp.float32),
    finished_BxW=jnp.zeros((prompts, width), bool),
    tokens_BxWxT=jnp.zeros((prompts, width, max_new_tokens), jnp.int32),
    t=jnp.zeros((), jnp.int32),
  )


def _beam_step_fn(decoder: Decoder):
  def run(params, beams: Beams, logprobs_RxV, lengths_R, cache, stop_ids):
    b, w, _ = beams.tokens_BxWxT.shape
    v = logprobs_RxV.shape[-1]
    logprobs_BxWxV = logprobs_RxV.reshape(b, w, v)
    only_stop_V = jnp.where(jnp.arange(v) == stop_ids[0], 0.0, -jnp.inf)
    logprobs_BxWxV = jnp.where(beams.finished_BxW[..., None], only_stop_V, logprobs_BxWxV)
    total_BxWV = (beams.scores_BxW[..., None] + logprobs_BxWxV).reshape(b, w * v)
    scores_BxW, choice_BxW = jax.lax.top_k(total_BxWV, w)
    parent_BxW, token_BxW = choice_BxW // v, (choice_BxW % v).astype(jnp.int32)
    finished_BxW = jnp.take_along_axis(beams.finished_BxW, parent_BxW, axis=1) | jnp.isin(token_BxW, stop_ids)
    tokens_BxWxT = jnp.take_along_axis(beams.tokens_BxWxT, parent_BxW[..., None], axis=1)
    tokens_BxWxT = jax.lax.dynamic_update_slice(tokens_BxWxT, token_BxW[..., None], (0, 0, beams.t))
    rows_R = (jnp.arange(b)[:, None] * w + parent_BxW).reshape(-1)
    cache = select_rows(cache, rows_R, decoder.rules)
    logits_RxV, cache = decoder._step_logits(params, token_BxW.reshape(-1), lengths_R + beams.t, cache)
    logprobs_RxV = jax.nn.log_softmax(mask_padding(logits_RxV, decoder.vocab_size), axis=-1)
    return Beams(scores_BxW, finished_BxW, tokens_BxWxT, beams.t + 1), logprobs_RxV, cache

  return run


def right_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """[B, P] int32 prompts right-padded with `pad_id` to the longest, and their lengths [B]."""
  assert all(len(p) > 0 for p in prompts), "every prompt needs at least one token (BOS)"
  width = max(len(p) for p in prompts)
  tokens_BxP = np.full((len(prompts), width), pad_id, np.int32)
  for b, prompt in enumerate(prompts):
    tokens_BxP[b, : len(prompt)] = prompt
  return tokens_BxP, np.array([len(p) for p in prompts], np.int32)
