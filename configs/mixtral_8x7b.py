"""Mixtral 8x7B shapes (46.7B parameters, 12.9B active per token): 32 layers, each with 8 SwiGLU experts of
width 14336 and top-2 routing, GQA 32/8, RoPE theta 1e6, untied head; bf16 compute, full remat; for
accelerators (`--dry_run` plans it anywhere).

Layout: experts split over the `expert` axis (8 devices hold one expert each), everything else fully sharded
(FSDP) over `fsdp` x `expert`; the batch is split over both, so expert parallelism exchanges tokens with
all-to-all inside each fsdp group. On a v5p-128 (64 chips) that is fsdp=8 x expert=8:

  python train.py --config configs/mixtral_8x7b.py --dry_run --topology v5p-128
"""

from configs.base import base_config


def get_config():
  c = base_config()
  c.model.num_layers = 32
  c.model.d_model = 4096
  c.model.num_heads = 32
  c.model.num_kv_heads = 8
  c.model.mlp_dim = 14_336
  c.model.norm_eps = 1e-5
  c.model.rope_theta = 1_000_000.0
  c.model.tie_embeddings = False
  c.model.compute_dtype = "bfloat16"
  c.model.remat = "full"
  c.moe.num_experts = 8
  c.moe.top_k = 2
  c.moe.expert_mlp_dim = 14_336
  c.moe.capacity_factor = 0.0  # dropless, as Mixtral was trained
  c.moe.router_score = "softmax"
  c.moe.renormalize_gates = True  # softmax over the two chosen logits, as in Mixtral
  c.data.vocab_size = 32_000
  c.data.tokenizer_sample_bytes = 50_000_000
  c.data.seq_len = 4096
  c.optim.peak_lr = 3e-4
  c.optim.final_lr = 3e-5
  c.optim.warmup_steps = 2000
  c.train.steps = 100_000
  c.train.global_batch_size = 256
  c.train.grad_accum = 4  # one sequence per device and microbatch on 64 devices: bounds the dropless buffers
  c.train.eval_every = 1000
  c.checkpoint.every_steps = 1000
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.mesh.expert = 8
  # Dense weights are sharded over fsdp and expert together (ZeRO-3 over all 64 devices); expert weights take
  # `expert` for their experts axis first, so their embed dimension is sharded over fsdp only.
  c.mesh.rules.embed = "fsdp,expert"
  return c
