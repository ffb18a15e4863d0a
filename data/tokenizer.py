"""The run's tokenizer: load the one `config.data.tokenizer` names, or train a sentencepiece one on the corpus.

`config.data.tokenizer` may be a sentencepiece `.model` or a Hugging Face `tokenizer.json` (the `tokenizers`
library), told apart by the suffix or, failing that, by the content (JSON starts with `{`). Both give the same
interface: encode (no BOS/EOS), decode, vocab_size, bos_id, eos_id, pad_id, unk_id, id_to_piece, pickling. A
tokenizer.json takes BOS/EOS from a sibling `tokenizer_config.json` (`bos_token`, `eos_token`) when there is one,
else from common special tokens (`_BOS_NAMES`, `_EOS_NAMES`). The run keeps a copy under its own suffix,
`<workdir>/tokenizer.model` or `<workdir>/tokenizer.json` (with the sibling `tokenizer_config.json`, if any).

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
because padding is recognized by segment id 0, never by its token. A tokenizer.json without an unknown token
has unk_id -1 (byte-level BPE never needs one).
"""

import io
import json
import logging
import os
import time
from collections.abc import Iterator, Sequence

import numpy as np
import sentencepiece as spm
import tokenizers
from etils import epath

import storage
from data import cache, prepared
from data.errors import DataError
from data.sources import Corpus, eval_hash, unit_hash

_log = logging.getLogger(__name__)

SENTENCEPIECE, HF_JSON = "sentencepiece", "tokenizer.json"  # the two kinds of tokenizer file
_RUN_COPY_NAMES = {SENTENCEPIECE: "tokenizer.model", HF_JSON: "tokenizer.json"}
_HF_CONFIG_NAME = "tokenizer_config.json"
# Special tokens tried, in order, when a tokenizer.json has no tokenizer_config.json that names them. GPT-2 style
# vocabularies have only <|endoftext|>, which then serves as both BOS and EOS.
_BOS_NAMES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>", "<|im_start|>", "<|endoftext|>")
_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|eot_id|>", "<|im_end|>")
_PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]", "<|finetune_right_pad_id|>")
_UNK_NAMES = ("<unk>", "[UNK]", "<|unk|>")
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


def tokenizer_kind(path: str, content: bytes) -> str:
  """SENTENCEPIECE or HF_JSON: by the suffix (.model / .json), else by the content (JSON starts with `{`)."""
  if path.endswith(".json"):
    return HF_JSON
  if path.endswith(".model"):
    return SENTENCEPIECE
  return HF_JSON if content.lstrip()[:1] == b"{" else SENTENCEPIECE


def batch_encoder(kind: str, content: bytes):
  """`encode(texts) -> list of id lists` (no BOS/EOS) from a tokenizer file's bytes: what worker processes run."""
  if kind == SENTENCEPIECE:
    processor = spm.SentencePieceProcessor(model_proto=content)
    # One thread per worker: the workers are the parallelism.
    return lambda texts: processor.encode(texts, num_threads=1)
  hf = tokenizers.Tokenizer.from_str(content.decode("utf-8"))
  return lambda texts: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]


class Tokenizer:
  """A sentencepiece model or a tokenizer.json with the ids the pipeline needs. encode adds no BOS/EOS."""

  def __init__(self, model_path: str) -> None:
    self.model_path = model_path
    try:
      content = epath.Path(model_path).read_bytes()
    except OSError as e:
      raise DataError(
        f"{model_path}: cannot read the tokenizer ({e}); give a readable .model or tokenizer.json"
      ) from None
    self.kind = tokenizer_kind(model_path, content)
    if self.kind == SENTENCEPIECE:
      self._init_sentencepiece(content)
    else:
      self._init_hf(content)

  def _init_sentencepiece(self, content: bytes) -> None:
    try:
      self._processor = spm.SentencePieceProcessor(model_proto=content)
    except (OSError, RuntimeError) as e:
      raise DataError(
        f"{self.model_path}: not a sentencepiece model ({e}); give a .model file written by sentencepiece"
      ) from None
    self.vocab_size: int = self._processor.get_piece_size()
    self.unk_id: int = self._processor.unk_id()
    self.bos_id: int = self._processor.bos_id()
    self.eos_id: int = self._processor.eos_id()
    self.pad_id: int = max(self._processor.pad_id(), 0)
    if self.bos_id < 0 or self.eos_id < 0:
      raise DataError(f"{self.model_path}: the tokenizer has no BOS or EOS piece; train it with bos_id and eos_id set")

  def _init_hf(self, content: bytes) -> None:
    try:
      self._hf = tokenizers.Tokenizer.from_str(content.decode("utf-8"))
    except Exception as e:  # noqa: BLE001 (the library raises plain Exceptions for malformed files)
      reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
      raise DataError(
        f"{self.model_path}: not a Hugging Face tokenizer.json ({reason}); give a file saved by the tokenizers library"
      ) from None
    vocab = self._hf.get_vocab(with_added_tokens=True)
    # Added tokens may sit past the base vocabulary: the size is one past the largest id.
    self.vocab_size = max(vocab.values()) + 1 if vocab else 0
    names = _hf_special_tokens(self.model_path)
    self.bos_id = self._special_id(names.get("bos_token"), _BOS_NAMES)
    self.eos_id = self._special_id(names.get("eos_token"), _EOS_NAMES)
    pad_id, unk_id = (
      self._special_id(names.get("pad_token"), _PAD_NAMES),
      self._special_id(names.get("unk_token"), _UNK_NAMES),
    )
    self.pad_id = max(pad_id, 0)
    self.unk_id = unk_id
    if self.bos_id < 0 or self.eos_id < 0:
      raise DataError(
        f"{self.model_path}: cannot tell the BOS and EOS tokens (no {_HF_CONFIG_NAME} beside it naming bos_token "
        f"and eos_token, and none of {', '.join(_BOS_NAMES + _EOS_NAMES)} in the vocabulary); "
        f"add a {_HF_CONFIG_NAME} with bos_token and eos_token"
      )

  def _special_id(self, configured: str | None, common: Sequence[str]) -> int:
    """Id of the configured token, else of the first common name in the vocabulary; -1 if none."""
    for name in ([configured] if configured else []) + list(common):
      token_id = self._hf.token_to_id(name)
      if token_id is not None:
        return token_id
    return -1

  def encode(self, text: str) -> list[int]:
    if self.kind == SENTENCEPIECE:
      return self._processor.encode(text)
    return self._hf.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of `ids`; control tokens (BOS, EOS, padding) decode to nothing."""
    ids = np.asarray(ids, dtype=np.int64).tolist()
    if self.kind == SENTENCEPIECE:
      return self._processor.decode(ids)
    return self._hf.decode(ids, skip_special_tokens=True)

  def id_to_piece(self, token_id: int) -> str:
    """The vocabulary entry of one id, as stored (sentencepiece writes a space as U+2581, byte-level BPE as U+0120);
    use `decode` on a growing prefix for text."""
    if self.kind == SENTENCEPIECE:
      return self._processor.id_to_piece(int(token_id))
    return self._hf.id_to_token(int(token_id)) or ""

  def __reduce__(self):
    return (Tokenizer, (self.model_path,))

  def __repr__(self) -> str:
    return f"Tokenizer({self.model_path!r}, {self.kind}, vocab_size={self.vocab_size})"


def _hf_special_tokens(model_path: str) -> dict[str, str]:
  """{"bos_token": "<s>", ...} from the tokenizer_config.json beside a tokenizer.json; {} when there is none."""
  path = epath.Path(model_path).parent / _HF_CONFIG_NAME
  if not path.is_file():
    return {}
  try:
    config = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DataError(f"{path}: not valid JSON ({e}); fix or remove it") from None
  names = {}
  for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
    value = config.get(key) if isinstance(config, dict) else None
    value = value.get("content") if isinstance(value, dict) else value  # AddedToken entries are dicts
    if isinstance(value, str) and value:
      names[key] = value
  return names


def run_tokenizer_path(workdir: str) -> str | None:
  """The tokenizer copy a run directory holds (`tokenizer.model` or `tokenizer.json`), None if it has none."""
  # A Hugging Face import may hold both; its config points at tokenizer.json, which wins here too.
  for name in (_RUN_COPY_NAMES[HF_JSON], _RUN_COPY_NAMES[SENTENCEPIECE]):
    path = epath.Path(workdir) / name
    if path.is_file():
      return str(path)
  return None


def copy_run_tokenizer(source_dir: str, out_dir: str) -> list[str]:
  """Copies the tokenizer files of one run directory (or export) into another; returns the names copied."""
  copied = []
  for name in (*_RUN_COPY_NAMES.values(), _HF_CONFIG_NAME):
    path = epath.Path(source_dir) / name
    if path.is_file():
      (epath.Path(out_dir) / name).write_bytes(path.read_bytes())
      copied.append(name)
  return copied


def load_tokenizer(data_cfg, workdir: str | None) -> Tokenizer:
  """The run's tokenizer, copied into `<workdir>/tokenizer.model` (or `tokenizer.json`) when a workdir is given.

  `data_cfg.tokenizer` names a sentencepiece model or a tokenizer.json; empty means train a sentencepiece model on
  the corpus (cached by corpus and settings under the cache dir), or the one a prepared cache dir holds
  (data/prepared.py). A run directory that already holds a tokenizer
  keeps it: resuming never changes the tokenizer, even if the corpus changed in between.
  """
  existing = run_tokenizer_path(workdir) if workdir else None
  if data_cfg.tokenizer:
    source = data_cfg.tokenizer if storage.is_url(data_cfg.tokenizer) else os.path.expanduser(data_cfg.tokenizer)
    if not epath.Path(source).is_file():
      raise DataError(
        f"data.tokenizer: no such file {source!r}; give a sentencepiece .model or a tokenizer.json, "
        "or leave it empty to train one"
      )
    if existing is not None and cache.file_sha256(source) != cache.file_sha256(existing):
      raise DataError(
        f"{existing} differs from data.tokenizer={source!r}: a run keeps its tokenizer; "
        f"use a new --workdir, or set data.tokenizer={existing}"
      )
  elif existing is not None:
    _log.info("Using the tokenizer of this run directory, %s", existing)
    source = existing
  else:
    manifest = prepared.read_manifest(data_cfg)  # a prepared cache dir brings its own tokenizer
    source = prepared.tokenizer_path(data_cfg, manifest) if manifest else _trained_tokenizer_path(data_cfg)
  tokenizer = Tokenizer(source)  # validated before it is copied anywhere
  if not workdir or source == existing:
    return tokenizer
  if existing is None:
    existing = str(epath.Path(workdir) / _RUN_COPY_NAMES[tokenizer.kind])
    cache.write_file_atomically(existing, epath.Path(source).read_bytes())
    sibling_config = epath.Path(source).parent / _HF_CONFIG_NAME
    if tokenizer.kind == HF_JSON and sibling_config.is_file():
      # BOS/EOS of a tokenizer.json may come from it: the run keeps it too.
      cache.write_file_atomically(str(epath.Path(workdir) / _HF_CONFIG_NAME), sibling_config.read_bytes())
  return Tokenizer(existing)


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
