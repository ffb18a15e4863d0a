"""The 42M-parameter shape that minimal JAX trainers are compared on (d_model 512, 8 layers, 8 heads, MLP 2048
GELU, LayerNorm, learned positions, tied embeddings, vocab 32000, seq 256, batch 8): for
`scripts/benchmark.py --config configs/bench_peer.py`, fp32 and bf16 against the same in-process matmul peak."""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.num_layers = 8
  c.model.d_model = 512
  c.model.num_heads = 8
  c.model.num_kv_heads = 8
  c.model.mlp_dim = 2048
  c.model.mlp_type = "gelu"
  c.model.norm_type = "layernorm"
  c.model.norm_eps = 1e-5
  c.model.position_type = "learned"
  c.model.tie_embeddings = True
  c.data.vocab_size = 32_000
  c.data.seq_len = 256
  c.train.global_batch_size = 8
  c.train.steps = 1000
  c.mesh.data = 1
  return c
