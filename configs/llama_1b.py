"""A Llama-style 1.0B model (Llama 3.2 1B shapes, with a 32k vocabulary): RMSNorm, SwiGLU, RoPE, GQA 32/8; for
accelerators. FSDP over all devices.

On a v5e slice (16 GiB per chip) batch 256 is 16 sequences per chip on 16 chips, whose `save_projections`
activations need 33 GB: accumulate over 4 microbatches instead (11.2 GiB per chip), the same tokens per step:

  python train.py --config configs/llama_1b.py --dry_run --topology v5litepod-16 --config.train.grad_accum=4
"""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.num_layers = 16
  c.model.d_model = 2048
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.mlp_dim = 8192
  c.model.rope_theta = 500_000.0
  c.model.norm_eps = 1e-5
  c.model.tie_embeddings = True
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "save_projections"
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
