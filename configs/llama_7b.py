"""Llama-2-7B shapes (6.7B parameters): RMSNorm, SwiGLU, RoPE, MHA, untied head; FSDP over all devices.

Planned for one v5p slice of 64 chips (fsdp=64, 4 sequences per chip):

  python train.py --config configs/llama_7b.py --dry_run --topology v5p:4x4x4
"""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.num_layers = 32
  c.model.d_model = 4096
  c.model.num_heads = 32
  c.model.num_kv_heads = 32
  c.model.mlp_dim = 11_008
  c.model.norm_eps = 1e-5
  c.model.tie_embeddings = False
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "full"
  c.data.vocab_size = 32_000
  c.data.tokenizer_sample_bytes = 50_000_000
  c.data.seq_len = 2048
  c.optim.peak_lr = 3e-4
  c.optim.final_lr = 3e-5
  c.optim.warmup_steps = 2000
  c.train.steps = 100_000
  c.train.global_batch_size = 256
  c.train.eval_every = 1000
  c.checkpoint.every_steps = 1000
  c.mesh.data = 1
  c.mesh.fsdp = -1
  return c
