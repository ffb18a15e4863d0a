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

from configs.llama_7b import get_config as llama_7b_config


def get_config():
  c = llama_7b_config()  # Llama 2's recipe: vocabulary, norms, untied head, bf16, full remat, 2048 tokens
  c.model.num_layers = 80
  c.model.d_model = 8192
  c.model.num_heads = 64
  c.model.num_kv_heads = 8
  c.model.mlp_dim = 28_672
  c.optim.peak_lr = 1.5e-4
  c.optim.final_lr = 1.5e-5
  c.train.global_batch_size = 1024
  c.mesh.dcn_stage = 2
  c.pipeline.schedule = "1f1b"
  c.pipeline.microbatches = 16
  return c
