"""Parameter names and layouts: each Hugging Face tensor <-> a slice of one kiln parameter.

kiln stacks layers on leading axes (`blocks.*` [X, ...], or with `moe.every` = n > 1 `blocks.dense.*`
[X / n, n - 1, ...] and `blocks.moe.*` [X / n, ...]) and stores projections input-first with heads split out:
`wq_DxNxH` [D, N, H] is Hugging Face's `q_proj.weight` [N * H, D] transposed, `wo_NxHxD` [N, H, D] is
`o_proj.weight` [D, N * H] transposed, expert weights [E, D, F] are the per-expert [F, D] matrices transposed.
One `Tensor` entry names both sides and how many leading kiln axes are the matrix's input.
"""

import dataclasses
import math
from collections.abc import Callable, Iterator

import numpy as np

from model.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Tensor:
  hf_name: str
  path: tuple[str, ...]  # kiln parameter, e.g. ("blocks", "attn", "wq_DxNxH")
  index: tuple[int, ...]  # the slice of that parameter: layer (and expert) indices on its leading axes
  in_axes: int | None  # matrices: the number of kiln axes that are the input (HF's columns); None: same layout


def to_kiln(hf_array: np.ndarray, in_axes: int | None, shape: tuple[int, ...]) -> np.ndarray:
  """A Hugging Face tensor in kiln's layout `shape` (a view where the layouts allow)."""
  if in_axes is None:
    return hf_array.reshape(shape)
  return hf_array.T.reshape(shape)


def to_hf(kiln_array: np.ndarray, in_axes: int | None) -> np.ndarray:
  """A kiln parameter slice in Hugging Face's layout, contiguous (safetensors writes raw bytes)."""
  if in_axes is None:
    return np.ascontiguousarray(kiln_array)
  shape = kiln_array.shape
  matrix = kiln_array.reshape(math.prod(shape[:in_axes]), math.prod(shape[in_axes:]))
  return np.ascontiguousarray(matrix.T)


def _layer_slot(cfg: ModelConfig, layer: int) -> tuple[tuple[str, ...], tuple[int, ...], bool]:
  """(path of the layer's block in the tree, its index on the stacked axes, whether its MLP is MoE)."""
  if cfg.num_experts == 0:
    return ("blocks",), (layer,), False
  if cfg.moe_every == 1:
    return ("blocks",), (layer,), True
  group, position = divmod(layer, cfg.moe_every)
  if position < cfg.moe_every - 1:
    return ("blocks", "dense"), (group, position), False
  return ("blocks", "moe"), (group,), True


def tensor_map(cfg: ModelConfig, family: str) -> list[Tensor]:
  """Every tensor of a `family` checkpoint of this model ("llama", "mistral", "qwen3", "mixtral", "qwen3_moe")."""
  tensors = [Tensor("model.embed_tokens.weight", ("embed_VxD",), (), None)]
  for layer in range(cfg.num_layers):
    block, index, moe = _layer_slot(cfg, layer)
    hf = f"model.layers.{layer}."

    def add(hf_suffix: str, kiln: tuple[str, ...], in_axes: int | None, expert: tuple[int, ...] = ()) -> None:
      tensors.append(Tensor(hf + hf_suffix, block + kiln, index + expert, in_axes))  # noqa: B023

    add("input_layernorm.weight", ("attn_norm", "scale"), None)
    add("post_attention_layernorm.weight", ("mlp_norm", "scale"), None)
    for proj, name in (("q", "wq_DxNxH"), ("k", "wk_DxKxH"), ("v", "wv_DxKxH")):
      add(f"self_attn.{proj}_proj.weight", ("attn", name), 1)
      if cfg.attention_bias:
        add(f"self_attn.{proj}_proj.bias", ("attn", f"b{proj}_{'NH' if proj == 'q' else 'KH'}"), None)
    add("self_attn.o_proj.weight", ("attn", "wo_NxHxD"), 2)
    if cfg.attention_out_bias:
      add("self_attn.o_proj.bias", ("attn", "bo_D"), None)
    if cfg.qk_norm:
      add("self_attn.q_norm.weight", ("attn", "q_norm", "scale"), None)
      add("self_attn.k_norm.weight", ("attn", "k_norm", "scale"), None)
    if not moe:
      for proj, name in (("gate", "w_gate_DxF"), ("up", "w_up_DxF"), ("down", "w_down_FxD")):
        add(f"mlp.{proj}_proj.weight", ("mlp", name), 1)
      continue
    # Mixtral names its experts' gate, down and up projections w1, w2, w3.
    moe_prefix, names = (
      ("block_sparse_moe", {"gate": "w1", "up": "w3", "down": "w2"})
      if family == "mixtral"
      else ("mlp", {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"})
    )
    add(f"{moe_prefix}.gate.weight", ("mlp", "router_DxE"), 1)
    for expert in range(cfg.num_experts):
      for proj, name in (("gate", "w_gate_ExDxF"), ("up", "w_up_ExDxF"), ("down", "w_down_ExFxD")):
        add(f"{moe_prefix}.experts.{expert}.{names[proj]}.weight", ("mlp", name), 1, (expert,))
  tensors.append(Tensor("model.norm.weight", ("final_norm", "scale"), (), None))
  if not cfg.tie_embeddings:
    tensors.append(Tensor("lm_head.weight", ("head_DxV",), (), 1))
  return tensors


def _leaf(tree: dict, path: tuple[str, ...]):
  for key in path:
    tree = tree[key]
  return tree


def fill_params(
  tensors: list[Tensor], params: dict, read: Callable[[str], np.ndarray], on_error: Callable[[str], Exception]
) -> None:
  """Writes every Hugging Face tensor (`read(name)`, one at a time) into its slice of `params` (numpy arrays
  in kiln's shapes); `on_error(message)` makes the exception for a tensor of the wrong shape."""
  for t in tensors:
    target = _leaf(params, t.path)[t.index]
    hf_array = read(t.hf_name)
    want = (
      target.shape
      if t.in_axes is None
      else (math.prod(target.shape[t.in_axes :]), math.prod(target.shape[: t.in_axes]))
    )
    if hf_array.shape != want:
      raise on_error(f"{t.hf_name} has shape {list(hf_array.shape)}, the config implies {list(want)}")
    target[...] = to_kiln(hf_array, t.in_axes, target.shape)


def hf_tensors(tensors: list[Tensor], params: dict) -> Iterator[tuple[str, Callable[[], np.ndarray], tuple, np.dtype]]:
  """(name, make the array, its shape, its dtype) of every Hugging Face tensor of `params`; arrays are made
  only when asked, one at a time."""
  for t in tensors:
    source = _leaf(params, t.path)
    shape = source.shape[len(t.index) :]
    if t.in_axes is not None:
      shape = (math.prod(shape[t.in_axes :]), math.prod(shape[: t.in_axes]))

    def make(t=t, source=source) -> np.ndarray:
      return to_hf(np.asarray(source[t.index]), t.in_axes)

    yield t.hf_name, make, tuple(shape), np.dtype(source.dtype)
