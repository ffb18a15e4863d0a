"""Distils the README's first run (runs/tiny, configs/tiny.py) into a student half its width and depth, on the
same default corpus and with the teacher's tokenizer: minutes on CPU once runs/tiny exists.

Train the teacher first: python train.py --config configs/tiny.py (writes runs/tiny); or point
--config.distill.teacher at any run of any size trained with the same tokenizer.
"""

from configs.tiny import get_config as tiny_config


def get_config():
  c = tiny_config()
  c.train.objective = "distill"
  c.distill.teacher = "runs/tiny"
  c.distill.temperature = 2.0
  c.distill.alpha = 0.5
  c.model.num_layers = 2
  c.model.d_model = 64
  c.model.num_heads = 2
  c.model.num_kv_heads = 1
  c.model.mlp_dim = 256
  c.train.steps = 200
  c.checkpoint.every_steps = 100
  return c
