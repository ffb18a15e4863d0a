"""GRPO of the tiny model on examples/grpo.jsonl ("Which is larger, 3 or 7?" with the answer): minutes on CPU.

Start from a model that already answers in the task's format: an SFT run on 30 of the 90 questions
(examples/grpo_sft.jsonl; README, "Reinforcement learning"):

  python train.py --config configs/sft_tiny.py --config.data.files=examples/grpo_sft.jsonl --config.train.steps=180 \
      --workdir runs/sft_larger
  python train.py --config configs/grpo_tiny.py --config.checkpoint.init_from=runs/sft_larger

Each step samples 8 completions of each of 8 prompts from all 90 questions, rewards a right final answer
(`#### 7`) and the format, and updates on them once (grpo.iterations=1).
"""

from configs.tiny import get_config as tiny_config


def get_config():
  c = tiny_config()
  c.train.objective = "grpo"
  c.data.files = "examples/grpo.jsonl"
  c.data.chat_template = "chatml"
  c.data.seq_len = 64
  c.grpo.prompts_per_step = 8
  c.grpo.group_size = 8
  c.grpo.max_new_tokens = 24
  c.grpo.rewards = "exact_answer,format"
  c.grpo.reward_weights = "1.0,0.2"
  c.grpo.epsilon_high = 0.28  # DAPO's clip-higher
  c.grpo.loss_agg = "token_mean"
  c.optim.peak_lr = 1e-3
  c.optim.final_lr = 1e-4
  c.optim.warmup_steps = 5
  c.optim.weight_decay = 0.0
  c.train.global_batch_size = 64
  c.train.steps = 100
  c.train.log_every = 1
  c.checkpoint.every_steps = 50
  return c
