"""The decoder-only Transformer: embeddings, a scanned stack of pre-norm blocks, final norm, LM head.

The stack is scanned over units. A dense model's unit is one `Block` (parameters `blocks.*`, stacked [X]). An
MoE model with `moe_every == 1` has the same tree with an MoE MLP in every block (`blocks.mlp.router_DxE`,
`blocks.mlp.w_up_ExDxF`, ...). With `moe_every == n > 1` the unit is a `_MoeGroup` of n layers: n - 1 dense
blocks (`blocks.dense.*`, stacked [X / n, n - 1]) and then one MoE block (`blocks.moe.*`, stacked [X / n]).
"""

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from model.attention import Attention
from model.config import ModelConfig
from model.kv_cache import KVCache, LayerCache, advance
from model.layers import Norm, dropout, param, project, sinusoidal
from model.loss import chunked_cross_entropy_sums, cross_entropy_sums
from model.mlp import Mlp
from model.moe import Moe
from parallel.rules import constrain

# `checkpoint_name`s of the activations the remat policies choose between. Projection outputs (`project`); the
# score and probability tensors [B, K, G * L, S] of the xla attention; the other named activations of a layer.
PROJECTION_NAMES = ("attn_q", "attn_k", "attn_v", "attn_o", "mlp_gate", "mlp_up", "mlp_down")
ATTENTION_NAMES = ("attention_scores", "attention_probs")
OTHER_NAMES = ("attn_norm", "attn_q_rope", "attn_k_rope", "attn_context", "mlp_norm", "mlp_hidden")
# What the backward pass keeps from the forward of each layer; everything else it recomputes. "none": no remat.
REMAT_POLICIES = {
  "none": None,
  "full": jax.checkpoint_policies.nothing_saveable,
  "save_nothing": jax.checkpoint_policies.nothing_saveable,
  "save_projections": jax.checkpoint_policies.save_only_these_names(*PROJECTION_NAMES),
  # Every named activation but the attention scores and probabilities. Unnamed values (softmax internals
  # among them) are recomputed: a policy that saved all but two names would keep the softmax's own copies.
  "save_all_but_attention": jax.checkpoint_policies.save_any_names_but_these(*ATTENTION_NAMES),
  "offload_projections": jax.checkpoint_policies.save_and_offload_only_these_names(
    names_which_can_be_saved=(),
    names_which_can_be_offloaded=PROJECTION_NAMES,
    offload_src="device",
    offload_dst="pinned_host",
  ),
}


class Block(nnx.Module):
  """x + attn(norm(x)), then x + mlp(norm(x)); returns the new residual and this layer's auxiliary outputs."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, *, moe: bool = False):
    self.cfg = cfg
    self.attn_norm = Norm(cfg.d_model, cfg.norm_type, cfg.norm_eps, cfg.weight_dtype)
    self.attn = Attention(cfg, rngs)
    self.mlp_norm = Norm(cfg.d_model, cfg.norm_type, cfg.norm_eps, cfg.weight_dtype)
    self.mlp = Moe(cfg, rngs) if moe else Mlp(cfg, rngs)

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, dropout_key, cache: LayerCache | None = None):
    """(x, aux); with a `cache` (decoding), (x, aux, the cache with this layer's new keys and values)."""
    rate = self.cfg.dropout_rate
    attn_key, mlp_key = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    normed_BxLxD = checkpoint_name(self.attn_norm(x_BxLxD), "attn_norm")
    if cache is None:
      # The residual dropout's keys also drive the LoRA adapters' dropout (each adapter folds in its own index).
      h_BxLxD = self.attn(normed_BxLxD, positions_BxL, segment_ids_BxL, dropout_key=attn_key)
    else:
      h_BxLxD, cache = self.attn(normed_BxLxD, positions_BxL, segment_ids_BxL, cache)
    x_BxLxD = constrain(x_BxLxD + dropout(h_BxLxD, rate, attn_key), ("batch", "length", "embed"), self.cfg.rules)
    normed_BxLxD = checkpoint_name(self.mlp_norm(x_BxLxD), "mlp_norm")
    if isinstance(self.mlp, Moe):
      h_BxLxD, aux = self.mlp(normed_BxLxD)
    else:
      h_BxLxD, aux = self.mlp(normed_BxLxD, dropout_key=mlp_key), {}
    x_BxLxD = constrain(x_BxLxD + dropout(h_BxLxD, rate, mlp_key), ("batch", "length", "embed"), self.cfg.rules)
    return (x_BxLxD, aux) if cache is None else (x_BxLxD, aux, cache)


def _stack(n: int, make, rngs: nnx.Rngs):
  """n modules from `make(rngs)` with every parameter stacked on a leading axis of logical name "layers"."""

  @nnx.split_rngs(splits=n)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
  def make_stacked(rngs):
    return make(rngs)

  return make_stacked(rngs)


def _scan(units, body, x_BxLxD, keys, unroll: int = 1):
  """Runs `body(x, unit, key) -> (x, aux)` over stacked `units`, `unroll` units per loop iteration; returns x
  and the aux stacked per unit."""
  in_axes = (nnx.Carry, 0, 0 if keys is not None else None)
  scan = nnx.scan(body, in_axes=in_axes, out_axes=(nnx.Carry, 0), unroll=unroll)
  return scan(x_BxLxD, units, keys)


class _MoeGroup(nnx.Module):
  """`moe_every` consecutive layers as one scanned unit: moe_every - 1 dense blocks, then one MoE block."""

  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    self.cfg = cfg
    self.dense = _stack(cfg.moe_every - 1, lambda r: Block(cfg, r), rngs)
    self.moe = Block(cfg, rngs, moe=True)

  def __call__(self, x_BxLxD, positions_BxL, segment_ids_BxL, dropout_key):
    keys = jax.random.split(dropout_key, self.cfg.moe_every) if dropout_key is not None else None

    def body(x_BxLxD, block, key):
      return block(x_BxLxD, positions_BxL, segment_ids_BxL, key)

    x_BxLxD, _ = _scan(self.dense, body, x_BxLxD, keys[:-1] if keys is not None else None)
    return self.moe(x_BxLxD, positions_BxL, segment_ids_BxL, keys[-1] if keys is not None else None)

  def decode(self, x_BxLxD, positions_BxL, segment_ids_BxL, cache: LayerCache):
    """`__call__` against a KV cache whose keys and values hold this group's layers, [moe_every, B, S, K, H]."""

    def body(x_BxLxD, block, k_BxSxKxH, v_BxSxKxH):
      layer = cache.replace(k_BxSxKxH=k_BxSxKxH, v_BxSxKxH=v_BxSxKxH)
      x_BxLxD, _, layer = block(x_BxLxD, positions_BxL, segment_ids_BxL, None, layer)
      return x_BxLxD, (layer.k_BxSxKxH, layer.v_BxSxKxH)

    scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
    x_BxLxD, (k_nxBxSxKxH, v_nxBxSxKxH) = scan(x_BxLxD, self.dense, cache.k_BxSxKxH[:-1], cache.v_BxSxKxH[:-1])
    last = cache.replace(k_BxSxKxH=cache.k_BxSxKxH[-1], v_BxSxKxH=cache.v_BxSxKxH[-1])
    x_BxLxD, aux, last = self.moe(x_BxLxD, positions_BxL, segment_ids_BxL, None, last)
    k = jnp.concatenate([k_nxBxSxKxH, last.k_BxSxKxH[None]])
    v = jnp.concatenate([v_nxBxSxKxH, last.v_BxSxKxH[None]])
    return x_BxLxD, aux, cache.replace(k_BxSxKxH=k, v_BxSxKxH=v)


class Transformer(nnx.Module):
  def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
    assert cfg.position_type in ("rope", "learned", "sinusoidal"), cfg.position_type
    self.cfg = cfg
    wd = cfg.weight_dtype
    self.embed_VxD = param(rngs, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), std=cfg.init_std, dtype=wd)
    if cfg.position_type == "learned":
      self.pos_embed_LxD = param(rngs, (cfg.max_len, cfg.d_model), (None, "embed"), std=cfg.init_std, dtype=wd)

    # Layer parameters are stacked on a leading "layers" axis so the blocks run under one scan: compile time
    # does not grow with depth, and a pipeline can later split the axis into stages.
    if cfg.num_experts == 0:
      self.blocks = _stack(cfg.num_layers, lambda r: Block(cfg, r), rngs)
    elif cfg.moe_every == 1:
      self.blocks = _stack(cfg.num_layers, lambda r: Block(cfg, r, moe=True), rngs)
    else:
      assert cfg.num_layers % cfg.moe_every == 0, "num_layers must be a multiple of moe_every"
      self.blocks = _stack(cfg.num_layers // cfg.moe_every, lambda r: _MoeGroup(cfg, r), rngs)
    self.final_norm = Norm(cfg.d_model, cfg.norm_type, cfg.norm_eps, wd)
    if not cfg.tie_embeddings:
      self.head_DxV = param(rngs, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), std=cfg.init_std, dtype=wd)

  def __call__(
    self,
    tokens_BxL: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    *,
    dropout_key: jax.Array | None = None,
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Returns fp32 logits [B, L, V] and auxiliary outputs (empty for a dense model).

    MoE: the scalar outputs of the MoE layers (`moe_aux_loss`, `moe_z_loss`, `moe_dropped_fraction`) are
    averaged over those layers; `moe_expert_load` stays per layer, [MoE layers, E].

    `dropout_key` None means deterministic (evaluation); a key turns dropout on.
    """
    x_BxLxD, aux = self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL, dropout_key=dropout_key)
    return self.logits(x_BxLxD), aux

  def loss_sums(
    self,
    tokens_BxL: jax.Array,
    positions_BxL: jax.Array,
    segment_ids_BxL: jax.Array,
    targets_BxL: jax.Array,
    loss_mask_BxL: jax.Array,
    *,
    dropout_key: jax.Array | None = None,
  ) -> tuple[tuple[jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]:
    """`cross_entropy_sums` of the logits, and the auxiliary outputs; with `loss_chunk` > 0 the logits exist
    only `loss_chunk` positions at a time (`chunked_cross_entropy_sums`)."""
    x_BxLxD, aux = self.hidden(tokens_BxL, positions_BxL, segment_ids_BxL, dropout_key=dropout_key)
    return self.head_sums(x_BxLxD, targets_BxL, loss_mask_BxL), aux

  def head_sums(self, x_BxLxD: jax.Array, targets_BxL: jax.Array, loss_mask_BxL: jax.Array):
    """`cross_entropy_sums` of the LM head on the final-normed residual stream; with `loss_chunk` > 0 the logits
    exist only `loss_chunk` positions at a time (`chunked_cross_entropy_sums`)."""
    if self.cfg.loss_chunk > 0:
      return chunked_cross_entropy_sums(x_BxLxD, self.logits, targets_BxL, loss_mask_BxL, chunk=self.cfg.loss_chunk)
    return cross_entropy_sums(self.logits(x_BxLxD), targets_BxL, loss_mask_BxL)

  def hidden(self, tokens_BxL, positions_BxL, segment_ids_BxL, *, dropout_key=None):
    """The final-normed residual stream [B, L, D] (the LM head's input) and the auxiliary outputs."""
    cfg = self.cfg
    embed_key, layers_key = jax.random.split(dropout_key) if dropout_key is not None else (None, None)
    x_BxLxD = self.embed(tokens_BxL, positions_BxL, embed_key)
    unit_keys = jax.random.split(layers_key, num_units(cfg)) if layers_key is not None else None
    x_BxLxD, aux_X = apply_units(cfg, self.blocks, x_BxLxD, positions_BxL, segment_ids_BxL, unit_keys)
    # One entry per MoE layer: scalars [X] are averaged, per-expert vectors [X, E] kept.
    aux = {name: value.mean(0) if value.ndim == 1 else value for name, value in aux_X.items()}
    return self.final_norm(x_BxLxD), aux

  def run_units(self, x_BxLxD, positions_BxL, segment_ids_BxL, unit_keys):
    """`apply_units` over this model's `blocks` (all of them, or the chunk a pipeline stage assembled)."""
    return apply_units(self.cfg, self.blocks, x_BxLxD, positions_BxL, segment_ids_BxL, unit_keys)

  def extend(
    self, tokens_BxL: jax.Array, positions_BxL: jax.Array, segment_ids_BxL: jax.Array, cache: KVCache
  ) -> tuple[jax.Array, KVCache]:
    """Runs L new tokens per row against a KV cache (decoding): prefill is a call with the prompts, each decode
    step a call with one token per row. Writes their keys and values at slots [cache.index, cache.index + L);
    segment 0 marks padding, which no query attends. Returns the final-normed residual stream [B, L, D] (the
    LM head's input, `logits`) and the updated cache. Deterministic (no dropout)."""
    cfg = self.cfg
    cache = advance(cache, positions_BxL, segment_ids_BxL, cfg.rules)
    x_BxLxD = self.embed(tokens_BxL, positions_BxL, None)
    x_BxLxD, cache = apply_units_cached(cfg, self.blocks, x_BxLxD, positions_BxL, segment_ids_BxL, cache)
    length = tokens_BxL.shape[1]
    return self.final_norm(x_BxLxD), cache.replace(index=cache.index + length)

  def embed(self, tokens_BxL: jax.Array, positions_BxL: jax.Array, dropout_key: jax.Array | None) -> jax.Array:
    """Token (and learned or sinusoidal position) embeddings, in the compute dtype: the stack's input."""
    cfg = self.cfg
    dt = cfg.dtype
    x_BxLxD = jnp.take(self.embed_VxD[...], tokens_BxL, axis=0).astype(dt)
    if cfg.position_type == "learned":
      x_BxLxD = x_BxLxD + jnp.take(self.pos_embed_LxD[...], positions_BxL, axis=0).astype(dt)
    elif cfg.position_type == "sinusoidal":
      x_BxLxD = x_BxLxD + sinusoidal(positions_BxL, cfg.d_model).astype(dt)
    return constrain(dropout(x_BxLxD, cfg.dropout_rate, dropout_key), ("batch", "length", "embed"), cfg.rules)

  def logits(self, x_BxLxD: jax.Array) -> jax.Array:
    """The LM head: fp32 logits [B, L, V] of the final-normed residual stream."""
    head, spec = (self.embed_VxD, "BLD,VD->BLV") if self.cfg.tie_embeddings else (self.head_DxV, "BLD,DV->BLV")
    names = ("batch", "length", "vocab")
    cfg = self.cfg
    return project(
      x_BxLxD,
      head,
      spec,
      names,
      name="head",
      dtype=cfg.dtype,
      rules=cfg.rules,
      platform=cfg.platform,
      out_dtype=jnp.float32,
    )


def num_units(cfg: ModelConfig) -> int:
  """Length of the stacked "layers" axis: layers, or MoE groups of `moe_every` layers."""
  return cfg.num_layers // (cfg.moe_every if cfg.num_experts > 0 else 1)


def apply_units(cfg: ModelConfig, units, x_BxLxD, positions_BxL, segment_ids_BxL, unit_keys):
  """Runs a stack of units (all of `Transformer.blocks`, or a contiguous slice of it with the same structure,
  as a pipeline stage holds) over x; `unit_keys` [units] or None. Returns x and the aux outputs per unit."""

  def body(x_BxLxD, unit, key):
    return unit(x_BxLxD, positions_BxL, segment_ids_BxL, key)

  if cfg.remat != "none":
    body = nnx.remat(body, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)
  return _scan(units, body, x_BxLxD, unit_keys, unroll=cfg.scan_unroll)


def apply_units_cached(cfg: ModelConfig, units, x_BxLxD, positions_BxL, segment_ids_BxL, cache: KVCache):
  """`apply_units` in decode mode: the scan carries x and takes and returns each unit's slice of the cache's
  keys and values as xs/ys ([X, ...] per layer; a unit of `moe_every` layers takes [moe_every, ...])."""
  per_unit = cfg.num_layers // num_units(cfg)

  def body(x_BxLxD, unit, k, v):
    layer = LayerCache(k, v, cache.segment_ids_BxS, cache.positions_BxS, cache.index)
    if per_unit > 1:
      x_BxLxD, _, layer = unit.decode(x_BxLxD, positions_BxL, segment_ids_BxL, layer)
    else:
      x_BxLxD, _, layer = unit(x_BxLxD, positions_BxL, segment_ids_BxL, None, layer)
    return x_BxLxD, (layer.k_BxSxKxH, layer.v_BxSxKxH)

  def by_unit(kv):  # [X, ...] -> [units, per_unit, ...]; a unit of one layer keeps [X, ...]
    return kv.reshape(num_units(cfg), per_unit, *kv.shape[1:]) if per_unit > 1 else kv

  scan = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0))
  x_BxLxD, (k, v) = scan(x_BxLxD, units, by_unit(cache.k_XxBxSxKxH), by_unit(cache.v_XxBxSxKxH))
  k, v = k.reshape(cache.k_XxBxSxKxH.shape), v.reshape(cache.v_XxBxSxKxH.shape)
  return x_BxLxD, cache.replace(k_XxBxSxKxH=k, v_XxBxSxKxH=v)
