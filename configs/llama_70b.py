"""Llama-2-70B shapes (69.0B parameters): 80 layers, d_model 8192, GQA 64/8, SwiGLU 28672, RoPE, untied head;
bf16 compute, full remat; for accelerators (`--dry_run` plans it anywhere).

Layout: two pipeline stages, one per v5p slice, over the data-center network (`mesh.dcn_stage=2`, 40 layers
each), and FSDP over the 64 chips inside each slice (`mesh.fsdp=-1`), where the links are fast. Only one
activation per microbatch and tick crosses DCN (and its gradient back) instead of FSDP's weight gathers. Global
batch 1024 x 2048 tokens (2M, half Llama 2's 4M at its 4096 context) in 16 pipeline microbatches of 64 sequences,
one per FSDP chip (the most microbatches this batch allows); the 1F1B schedule's bubble is 1/17 (6%) and its stash
stays at two microbatch inputs per stage:

  python train.py --config configs/llama_70b.py --dry_run --topology v5p-128 --num_slices 2

(21.6 GiB per chip of a v5p's 95: 6.1 for weights and Adam moments, the rest the step's temporaries; README's
table.)
"""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.num_layers = 80
  c.model.d_model = 8192
  c.model.num_heads = 64
  c.model.num_kv_heads = 8
  c.model.mlp_dim = 28_672
  c.model.rope_theta = 10_000.0
  c.model.norm_eps = 1e-5
  c.model.tie_embeddings = False
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "full"
  c.data.vocab_size = 32_000
  c.data.tokenizer_sample_bytes = 50_000_000
  c.data.seq_len = 2048
  c.optim.peak_lr = 1.5e-4
  c.optim.final_lr = 1.5e-5
  c.optim.warmup_steps = 2000
  c.train.steps = 100_000
  c.train.global_batch_size = 1024
  c.train.eval_every = 1000
  c.checkpoint.every_steps = 1000
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.dcn_stage = 2
  c.pipeline.schedule = "1f1b"
  c.pipeline.microbatches = 16
  return c
