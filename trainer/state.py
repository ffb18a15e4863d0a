"""The train state and how the model's parameters are created: abstractly, then directly in their shardings."""

import jax
import jax.numpy as jnp
from flax import struct

from model import ModelConfig, lora
from model.params import init_params


@struct.dataclass
class TrainState:
  step: jax.Array  # optimizer updates completed
  params: dict  # nested dict of fp32 (master) weights
  opt_state: object
  rng: jax.Array  # raw uint32 key; dropout at step s uses fold_in(rng, s), so resume is exact


def init_trainable(model_cfg: ModelConfig, seed: int) -> dict:
  """The parameters a run trains, created as `init_params` does: all of them, or with LoRA the adapters only."""
  params = init_params(model_cfg, seed)
  return lora.split(params)[0] if model_cfg.lora_rank > 0 else params


def new_state(params: dict, optimizer, seed: int) -> TrainState:
  return TrainState(
    step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params), rng=jax.random.PRNGKey(seed)
  )
