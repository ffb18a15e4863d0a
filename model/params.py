"""A model's parameters: abstractly (shapes, dtypes and logical axis names, nothing allocated), or created from a
seed, run under jit with out_shardings so each device makes only its own shards."""

import jax
from flax import nnx

from model.config import ModelConfig
from model.transformer import Transformer


def abstract_model(model_cfg: ModelConfig):
  """(graphdef, params as ShapeDtypeStructs, logical axis names per param) without allocating anything."""
  with nnx.use_eager_sharding(False):
    model = nnx.eval_shape(lambda: Transformer(model_cfg, model_rngs(0)))
  graphdef, state = nnx.split(model)
  return graphdef, state.to_pure_dict(), nnx.get_partition_spec(state).to_pure_dict()


def model_rngs(seed: int) -> nnx.Rngs:
  """The random streams of a model's init: LoRA adapters draw from their own, so the base weights of a model
  with adapters are those of the same model without them."""
  return nnx.Rngs(params=seed, lora=jax.random.fold_in(jax.random.key(seed), 1))


def init_params(model_cfg: ModelConfig, seed: int) -> dict:
  """Creates the parameters; run under jit with out_shardings so each device makes only its own shards."""
  with nnx.use_eager_sharding(False):
    model = Transformer(model_cfg, model_rngs(seed))
  return nnx.state(model, nnx.Param).to_pure_dict()
