"""GPT-2 small (~124M parameters): LayerNorm, GELU, learned positions, tied embeddings; for accelerators."""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.num_layers = 12
  c.model.d_model = 768
  c.model.num_heads = 12
  c.model.num_kv_heads = 12
  c.model.mlp_dim = 3072
  c.model.mlp_type = "gelu"
  c.model.norm_type = "layernorm"
  c.model.norm_eps = 1e-5
  c.model.position_type = "learned"
  c.model.tie_embeddings = True
  c.model.compute_dtype = "bfloat16"
  c.data.vocab_size = 50_257
  c.data.tokenizer_sample_bytes = 20_000_000
  c.data.seq_len = 1024
  c.optim.peak_lr = 6e-4
  c.optim.final_lr = 6e-5
  c.optim.warmup_steps = 700
  c.train.steps = 20_000
  c.train.global_batch_size = 512
  c.train.eval_every = 1000
  c.checkpoint.every_steps = 1000
  return c
