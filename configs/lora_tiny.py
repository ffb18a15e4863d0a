"""LoRA fine-tuning of configs/tiny.py: rank-8 adapters on every projection, the base weights frozen.

  python train.py --config configs/lora_tiny.py --config.checkpoint.init_from=runs/tiny

`checkpoint.init_from` names the base (a run, one of its checkpoints, or an export); without it the base is the
seed's random init, and the run says so. Only the adapters train and are checkpointed; scripts/export_params.py
merges them into the base (or writes them alone with --adapters_only).
"""

from configs.tiny import get_config as tiny_config


def get_config():
  c = tiny_config()
  c.lora.rank = 8
  c.lora.alpha = 16.0
  c.lora.dropout = 0.05
  c.lora.targets = "q,k,v,o,gate,up,down"
  c.optim.peak_lr = 1e-3
  c.optim.final_lr = 1e-4
  c.optim.warmup_steps = 20
  c.optim.weight_decay = 0.0  # decay on the adapters would pull the model back toward the base
  c.train.steps = 200
  return c
