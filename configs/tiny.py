"""Tiny dense model (0.9M parameters + embeddings) that trains on 2 CPU cores in a few minutes on the default
corpus (the Python standard library's source): the smoke test of the whole stack and the README's first run."""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.num_layers = 4
  c.model.d_model = 128
  c.model.num_heads = 4
  c.model.num_kv_heads = 2  # GQA
  c.model.mlp_dim = 512
  c.data.vocab_size = 4096
  c.data.seq_len = 256
  c.optim.peak_lr = 3e-3
  c.optim.final_lr = 3e-4
  c.optim.warmup_steps = 30
  c.train.steps = 300
  c.train.global_batch_size = 16
  c.train.log_every = 10
  c.train.eval_every = 50
  c.train.eval_batches = 4
  c.checkpoint.every_steps = 100
  return c
