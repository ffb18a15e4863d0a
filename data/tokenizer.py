"""SentencePiece tokenizer: load the one `config.data.tokenizer` names, or train one on the corpus and cache it.

Ids of a tokenizer trained here:
  0 <pad>   padding; never produced by encode
  1 <unk>   never produced either: byte fallback spells any unseen character as UTF-8 byte pieces
  2 <s>     BOS, put before every document by the packer
  3 </s>    EOS, put after every document
  4..259    the byte pieces <0x00>..<0xFF>
  260..     learned pieces
Whitespace is kept verbatim: no normalization, no dummy prefix, no collapsing of spaces, runs of spaces may
form pieces, newlines are ordinary characters. So decode(encode(text)) == text for source code; the one
exception is U+2581 ("▁"), which sentencepiece uses internally for a space and decodes back as a space.

A tokenizer loaded from elsewhere keeps its own ids; if it has no pad piece, pad_id is 0, which is harmless
because padding is recognized by segment id 0, never by its token.
"""

import io
import logging
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np
import sentencepiece as spm
from etils import epath

import storage
from data import cache
from data.errors import DataError
from data.sources import Corpus, eval_hash, unit_hash

_log = logging.getLogger(__name__)

_RUN_COPY_NAME = "tokenizer.model"
# The trained model depends on the trainer's thread count (checked: 1 and 2 threads give different BPE
# merges), so it is fixed: every host that trains from the same corpus gets the same tokenizer.
_TRAINER_THREADS = 4
_SENTENCE_CHARS = 4096  # documents are cut at line ends into "sentences" of at most this many characters
_TRAINER_OPTIONS = dict(
  byte_fallback=True,
  normalization_rule_name="identity",
  remove_extra_whitespaces=False,
  add_dummy_prefix=False,
  allow_whitespace_only_pieces=True,
  split_digits=True,
  character_coverage=0.9999,  # the rarest characters go to byte pieces rather than taking vocabulary slots
  max_sentence_length=4 * _SENTENCE_CHARS,  # in bytes: room for 4-byte characters
  pad_id=0,
  unk_id=1,
  bos_id=2,
  eos_id=3,
  num_threads=_TRAINER_THREADS,
  minloglevel=2,
)
_TOKENIZER_TYPES = ("bpe", "unigram")


class Tokenizer:
  """A sentencepiece model with the ids the pipeline needs. encode adds no BOS/EOS."""

  def __init__(self, model_path: str) -> None:
    self.model_path = model_path
    try:
      self._processor = spm.SentencePieceProcessor(model_proto=epath.Path(model_path).read_bytes())
    except (OSError, RuntimeError) as e:
      raise DataError(
        f"{model_path}: not a sentencepiece model ({e}); give a .model file written by sentencepiece"
      ) from None
    self.vocab_size: int = self._processor.get_piece_size()
    self.unk_id: int = self._processor.unk_id()
    self.bos_id: int = self._processor.bos_id()
    self.eos_id: int = self._processor.eos_id()
    self.pad_id: int = max(self._processor.pad_id(), 0)
    if self.bos_id < 0 or self.eos_id < 0:
      raise DataError(f"{model_path}: the tokenizer has no BOS or EOS piece; train it with bos_id and eos_id set")

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._processor.decode(np.asarray(ids, dtype=np.int64).tolist())

  def __reduce__(self):
    return (Tokenizer, (self.model_path,))

  def __repr__(self) -> str:
    return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(data_cfg, workdir: str | None) -> Tokenizer:
  """The run's tokenizer, copied into `<workdir>/tokenizer.model` when a workdir is given.

  `data_cfg.tokenizer` names a sentencepiece model; empty means train one on the corpus (cached by corpus and
  settings under the cache dir). A run directory that already holds a tokenizer keeps it: resuming never
  changes the tokenizer, even if the corpus changed in between.
  """
  run_copy = str(epath.Path(workdir) / _RUN_COPY_NAME) if workdir else None
  has_run_copy = run_copy is not None and epath.Path(run_copy).is_file()
  if data_cfg.tokenizer:
    source = data_cfg.tokenizer if storage.is_url(data_cfg.tokenizer) else os.path.expanduser(data_cfg.tokenizer)
    if not epath.Path(source).is_file():
      raise DataError(
        f"data.tokenizer: no such file {source!r}; give a sentencepiece .model, or leave it empty to train one"
      )
    if has_run_copy and cache.file_sha256(source) != cache.file_sha256(run_copy):
      raise DataError(
        f"{run_copy} differs from data.tokenizer={source!r}: a run keeps its tokenizer; "
        f"use a new --workdir, or set data.tokenizer={run_copy}"
      )
  elif has_run_copy:
    _log.info("Using the tokenizer of this run directory, %s", run_copy)
    source = run_copy
  else:
    source = _trained_tokenizer_path(data_cfg)
  tokenizer = Tokenizer(source)  # validated before it is copied anywhere
  if run_copy is None or source == run_copy:
    return tokenizer
  if not has_run_copy:
    cache.write_file_atomically(run_copy, epath.Path(source).read_bytes())
  return Tokenizer(run_copy)


def _trained_tokenizer_path(data_cfg) -> str:
  if data_cfg.tokenizer_type not in _TOKENIZER_TYPES:
    raise DataError(f"data.tokenizer_type={data_cfg.tokenizer_type!r} is not a type; use 'bpe' or 'unigram'")
  corpus = Corpus(data_cfg)
  settings = {
    "type": data_cfg.tokenizer_type,
    "vocab_size": data_cfg.vocab_size,
    "sample_bytes": data_cfg.tokenizer_sample_bytes,
    "eval_fraction": data_cfg.eval_fraction,  # only training documents are sampled
    "trainer": _TRAINER_OPTIONS,
    "sentence_chars": _SENTENCE_CHARS,
    "sentencepiece": spm.__version__,
  }
  key = cache.content_hash({"corpus": corpus.identity(), "settings": settings})
  path = str(cache.cache_root(data_cfg.cache_dir) / "tokenizers" / f"{key}.model")
  with cache.file_lock(path + ".lock"):
    if epath.Path(path).is_file():
      _log.info("Reusing the cached tokenizer %s", path)
      return path
    start = time.perf_counter()
    model = _train(corpus, data_cfg)
    cache.write_file_atomically(path, model)
    _log.info(
      "Trained a %s tokenizer (vocab %d) on %s in %.1f s: %s",
      data_cfg.tokenizer_type,
      data_cfg.vocab_size,
      corpus.description,
      time.perf_counter() - start,
      path,
    )
  return path


def _train(corpus: Corpus, data_cfg) -> bytes:
  sample = _sample_training_texts(corpus, data_cfg.eval_fraction, data_cfg.tokenizer_sample_bytes)
  corpus.report_invalid_utf8()
  if not sample:
    raise DataError(f"no training documents to train a tokenizer on in {corpus.description}; add text files")
  model = io.BytesIO()
  # sentencepiece draws random numbers (e.g. to shuffle sentences): fix them so training is reproducible.
  spm.set_random_generator_seed(0)
  try:
    spm.SentencePieceTrainer.train(
      sentence_iterator=_sentences(sample),
      model_writer=model,
      model_type=data_cfg.tokenizer_type,
      vocab_size=data_cfg.vocab_size,
      **_TRAINER_OPTIONS,
    )
  except RuntimeError as e:
    reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
    too_small = "smaller than required" in reason  # bytes, specials and every kept character need a piece each
    fix = "raise data.vocab_size" if too_small else "lower data.vocab_size or raise data.tokenizer_sample_bytes"
    raise DataError(f"training a tokenizer on {corpus.description} failed ({reason}); {fix}") from None
  return model.getvalue()


def _sample_training_texts(corpus: Corpus, eval_fraction: float, sample_bytes: int) -> list[str]:
  """About `sample_bytes` of training documents, spread over the whole corpus, the same on every host."""
  if corpus.has_unknown_size:
    keep_fraction = 1.0  # a streamed dataset is sampled from its start
  else:
    keep_fraction = min(1.0, sample_bytes / max(corpus.total_file_bytes, 1))
  texts, total = [], 0
  for document in corpus.documents():
    if total >= sample_bytes:
      break
    # The eval split's fallback for a tiny corpus (its one smallest-hash document) is not known here: only
    # documents under eval_fraction are kept out of the sample.
    if eval_hash(document.key) < eval_fraction or unit_hash("tokenizer", document.key) >= keep_fraction:
      continue
    text = document.read()
    if text:
      texts.append(text)
      total += len(text)
  return texts


def _sentences(texts: list[str]) -> Iterator[str]:
  """Cuts documents at line ends into pieces sentencepiece accepts, newlines kept inside them."""
  for text in texts:
    piece = ""
    for line in text.splitlines(keepends=True):
      while len(line) > _SENTENCE_CHARS:
        if piece:
          yield piece
          piece = ""
        yield line[:_SENTENCE_CHARS]
        line = line[_SENTENCE_CHARS:]
      if len(piece) + len(line) > _SENTENCE_CHARS:
        yield piece
        piece = ""
      piece += line
    if piece:
      yield piece
