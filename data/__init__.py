"""Data pipeline: corpus -> sentencepiece tokenizer -> token cache -> packed rows -> grain batches.

The default corpus (data.files empty) is the running Python's standard library source, so nothing needs a
download. See pipeline.py for the batch fields, packing.py for how rows are cut, tokenizer.py for the ids.
"""

from data.errors import DataError
from data.pipeline import global_batch, make_eval_batches, make_train_iterator
from data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
  "DataError",
  "Tokenizer",
  "global_batch",
  "load_tokenizer",
  "make_eval_batches",
  "make_train_iterator",
]
