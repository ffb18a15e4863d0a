"""The train state and how the model's parameters are created: abstractly, then directly in their shardings."""

import jax
import jax.numpy as jnp
from flax import nnx, struct

from model import ModelConfig, Transformer, lora


@struct.dataclass
class TrainState:
  step: jax.Array  # optimizer updates completed
  params: dict  # nested dict of fp32 (master) weights
  opt_state: object
  rng: jax.Array  # raw uint32 key; dropout at step s uses fold_in(rng, s), so resume is exact


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


def init_trainable(model_cfg: ModelConfig, seed: int) -> dict:
  """The parameters a run trains, created as `init_params` does: all of them, or with LoRA the adapters only."""
  params = init_params(model_cfg, seed)
  return lora.split(params)[0] if model_cfg.lora_rank > 0 else params


def new_state(params: dict, optimizer, seed: int) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed)
  )
