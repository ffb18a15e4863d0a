"""Tiny mixture-of-experts model: configs/tiny.py with 8 experts, top-2, in every layer; trains on 2 CPU cores.

Each expert is half as wide as tiny's MLP, so a token's two experts cost what tiny's dense MLP costs (the
active parameters per token match) while the MLP holds 4x the parameters. Capacity dispatch by default: on
XLA:CPU the dropless grouped matmul (`ragged_dot`) is computed densely over all experts, which is slower here
(try --config.moe.capacity_factor=0 to compare).
"""

from configs import tiny


def get_config():
  c = tiny.get_config()
  c.moe.num_experts = 8
  c.moe.top_k = 2
  c.moe.expert_mlp_dim = c.model.mlp_dim // 2
  c.moe.capacity_factor = 1.25
  c.moe.every = 1
  return c
