"""DPO of the tiny model on examples/dpo.jsonl (prompt, chosen, rejected): minutes on CPU.

The frozen reference is config.dpo.reference, else checkpoint.init_from, else this run's own initial weights
(as shipped: from random weights). To align an SFT run: --config.checkpoint.init_from=runs/sft_tiny.
"""

from configs.tiny import get_config as tiny_config


def get_config():
  c = tiny_config()
  c.train.objective = "dpo"
  c.data.files = "examples/dpo.jsonl"
  c.data.chat_template = "chatml"
  c.data.seq_len = 256  # one pair per row: half a row for the chosen, half for the rejected conversation
  c.data.eval_fraction = 0.1
  c.dpo.beta = 0.1
  c.optim.peak_lr = 5e-4
  c.optim.final_lr = 5e-5
  c.optim.warmup_steps = 5
  c.train.steps = 60
  c.train.global_batch_size = 8
  c.train.log_every = 5
  c.train.eval_every = 20
  c.train.eval_batches = 2
  c.checkpoint.every_steps = 30
  return c
