"""Pruning the dense projections: magnitude, Wanda (Sun et al. 2023, "A simple and effective pruning approach for
large language models") and 2:4 structured sparsity, and keeping pruned weights at zero while fine-tuning.

A kernel W [lead..., in..., out...] (lead: the stacked "layers" axes) is seen as [lead, IN, OUT] with the input
axes flattened. Every method compares the weights that feed one output (a column W[:, o]), as Wanda does, so
magnitude and Wanda differ only in the score; the `sparsity` fraction of lowest scores of each output is zeroed.
- magnitude: score |W| (compared per output; Han et al. compare over the whole matrix).
- wanda: score |W[i, o]| * ||X_i||_2, with X_i input feature i over the calibration tokens (`input_norms`).
- 2:4: in every group of 4 consecutive inputs of an output, the 2 of lowest Wanda score are zero (what sparse
  tensor cores run).

A pruned weight is exactly 0, so the zeros are the mask: `keep_zeros` (train.keep_sparsity) sets every
projection weight that was zero before an update back to zero after it.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from model.lora import TARGETS
from model.quant import PROJECTIONS

METHODS = ("magnitude", "wanda", "2:4")
# The projection -> the LoRA adapter attribute whose call sees its input.
_ADAPTER_OF = {kernel: adapter for _, adapter, kernel in TARGETS.values()}


def _as_3d(w: jax.Array, name: str) -> jax.Array:
  """W [lead..., in..., out...] -> [lead, IN, OUT]."""
  n_in, n_out = PROJECTIONS[name]
  n_lead = w.ndim - n_in - n_out
  lead, ins = w.shape[:n_lead], w.shape[n_lead : n_lead + n_in]
  return w.reshape(math.prod(lead), math.prod(ins), -1)


def mask(w: jax.Array, name: str, method: str, sparsity: float, input_norm: jax.Array | None = None) -> jax.Array:
  """Boolean mask of W (True: kept) for `method`; `input_norm` [lead..., in...] is ||X_i||_2 (wanda and 2:4)."""
  assert method in METHODS, method
  w3 = _as_3d(w, name).astype(jnp.float32)
  score = jnp.abs(w3)
  if method != "magnitude":
    assert input_norm is not None, f"{method} needs the inputs' norms"
    score = score * input_norm.reshape(w3.shape[0], w3.shape[1], 1).astype(jnp.float32)
  n_lead, n_in, n_out = w3.shape
  if method == "2:4":
    assert n_in % 4 == 0, (name, w.shape)
    groups = score.reshape(n_lead, n_in // 4, 4, n_out)
    # Rank within each group of 4 (ties broken by position): the two highest stay.
    rank = jnp.argsort(jnp.argsort(-groups, axis=2, stable=True), axis=2, stable=True)
    return (rank < 2).reshape(w.shape)
  pruned = int(math.floor(sparsity * score.shape[1]))
  rank = jnp.argsort(jnp.argsort(score, axis=1, stable=True), axis=1, stable=True)  # 0 = lowest score
  return (rank >= pruned).reshape(w.shape)


def prune_params(params: dict, method: str, sparsity: float, input_norms: dict | None = None) -> dict:
  """Params with every projection kernel pruned; `input_norms` maps the kernel's path (a tuple of keys) to its
  inputs' norms [lead..., in...] (wanda, 2:4)."""

  def walk(tree: dict, path: tuple) -> dict:
    out = {}
    for key, value in tree.items():
      if isinstance(value, dict):
        out[key] = walk(value, (*path, key))
      elif key in PROJECTIONS:
        norm = None if input_norms is None else input_norms[(*path, key)]
        out[key] = jnp.where(mask(value, key, method, sparsity, norm), value, jnp.zeros((), value.dtype))
      else:
        out[key] = value
    return out

  return walk(params, ())


def sparsity_of(params: dict) -> float:
  """The fraction of the projections' weights that are exactly zero."""
  zeros = total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if str(getattr(path[-1], "key", "")) in PROJECTIONS:
      zeros += int(jnp.sum(leaf == 0))
      total += leaf.size
  return zeros / max(total, 1)


def keep_zeros(before: dict, after: dict) -> dict:
  """`after` with each projection weight that is zero in `before` set to zero (train.keep_sparsity)."""

  def keep(path, b, a):
    if str(getattr(path[-1], "key", "")) in PROJECTIONS:
      return jnp.where(b == 0, jnp.zeros((), a.dtype), a)
    return a

  return jax.tree_util.tree_map_with_path(keep, before, after)


# Calibration: the norms of each projection's inputs ------------------------------------------------------------


class _SumSq(nnx.Variable):
  """Sum over calibration tokens of each input feature squared."""


class _InputRecorder(nnx.Module):
  """Sits where a projection's LoRA adapter would (`project` calls it with the projection's input) and adds each
  input feature's squares to `sumsq`; its term of the output is zero."""

  def __init__(self, in_shape: tuple[int, ...]):
    self.sumsq = _SumSq(jnp.zeros(in_shape, jnp.float32))

  def __call__(self, x: jax.Array, spec: str, dtype, key) -> jax.Array:
    del key
    x_spec, k_spec = spec.split("->")[0].split(",")
    n_in = sum(c in x_spec for c in k_spec)
    x = x.astype(jnp.float32)
    self.sumsq[...] = self.sumsq[...] + jnp.sum(x * x, axis=tuple(range(x.ndim - n_in)))
    return jnp.zeros((), dtype)


def input_norms(graphdef, params: dict, batches: list[dict]) -> dict:
  """||X_i||_2 of every projection's inputs over the (non-padding) tokens of `batches` (dicts with inputs,
  positions, segment_ids, loss_mask), by kernel path: a forward pass of the model whose adapters record their
  inputs. Dense models (no MoE)."""
  model = nnx.merge(graphdef, nnx.State(params))
  for path, kernel in kernel_paths(params):
    module = model
    for key in path[:-1]:
      module = getattr(module, key)
    stacked = kernel.shape[: kernel.ndim - sum(PROJECTIONS[path[-1]])]
    in_shape = kernel.shape[len(stacked) : len(stacked) + PROJECTIONS[path[-1]][0]]
    setattr(module, _ADAPTER_OF[path[-1]], nnx.data(_InputRecorder((*stacked, *in_shape))))
  recorder_def, state = nnx.split(model)

  @jax.jit
  def record(state, batch):
    model = nnx.merge(recorder_def, state)
    model(batch["inputs"], batch["positions"], batch["segment_ids"])
    return nnx.state(model, _SumSq)

  # Every token of a batch counts: calibration batches are the run's packed training rows, real text throughout.
  sums = None
  for batch in batches:
    got = record(state, batch)
    sums = got if sums is None else jax.tree.map(jnp.add, sums, got)
  flat = sums.to_pure_dict() if hasattr(sums, "to_pure_dict") else sums
  norms = {}
  for path, _ in kernel_paths(params):
    node = flat
    for key in path[:-1]:
      node = node[key]
    norms[path] = jnp.sqrt(node[_ADAPTER_OF[path[-1]]]["sumsq"])
  return norms


def kernel_paths(params: dict, path: tuple = ()):
  """(path as a tuple of keys, value) of every projection kernel in a nested dict."""
  for key, value in params.items():
    if isinstance(value, dict):
      yield from kernel_paths(value, (*path, key))
    elif key in PROJECTIONS:
      yield (*path, key), value
