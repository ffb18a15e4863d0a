"""Supervised fine-tuning of the tiny model on examples/sft.jsonl (chat JSONL, chatml template): minutes on CPU.

From random weights as shipped; to fine-tune the README's first run instead, add
--config.checkpoint.init_from=runs/tiny (its tokenizer comes along). Other data: --config.data.files=GLOB.
"""

from configs.tiny import get_config as tiny_config


def get_config():
  c = tiny_config()
  c.train.objective = "sft"
  c.data.files = "examples/sft.jsonl"
  c.data.chat_template = "chatml"
  c.data.seq_len = 128
  c.data.eval_fraction = 0.1
  c.optim.peak_lr = 1e-3
  c.optim.final_lr = 1e-4
  c.optim.warmup_steps = 10
  c.train.steps = 100
  c.train.global_batch_size = 8
  c.train.eval_every = 25
  c.train.eval_batches = 2
  c.checkpoint.every_steps = 50
  return c
