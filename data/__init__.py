"""Data pipeline: corpus -> tokenizer (sentencepiece or tokenizer.json) -> token cache -> packed rows -> global batches.

The default corpus (data.files empty) is the running Python's standard library source, so nothing needs a
download. See pipeline.py for the batch fields and what the data order depends on, packing.py for how rows are
cut, token_cache.py for how processes share tokenization, tokenizer.py for the ids.
"""

from data.errors import DataError
from data.pipeline import make_eval_batches, make_train_iterator
from data.token_cache import load_token_cache
from data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
  "DataError",
  "Tokenizer",
  "load_token_cache",
  "load_tokenizer",
  "make_eval_batches",
  "make_train_iterator",
]
