"""Decoder-only Transformer in Flax NNX.

Shape legend used in tensor names throughout `model/` (one letter per dimension):
  B batch, L length (query positions), S length (key positions), D model dim, H head dim,
  N query heads, K kv heads, G query heads per kv head (N = K * G), F mlp dim, V vocab,
  E experts, C expert capacity, T tokens (B * L flattened), X layers in a stack.
In the chunked loops of attend.py and loss.py, C is one chunk (keys of an attention block, positions of a loss
chunk) and X the number of chunks.
"""

from model.config import ModelConfig
from model.loss import cross_entropy_sums
from model.transformer import Transformer

__all__ = ["ModelConfig", "Transformer", "cross_entropy_sums"]
