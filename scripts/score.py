"""Score text with a trained run (or an export): per-token loss and perplexity, or raw logits.

  python scripts/score.py --workdir runs/tiny --text_file F [--checkpoint STEP|PATH]
  python scripts/score.py --workdir runs/tiny --tokens IDS.npy --logits_out OUT.npy
  (either with [--quantize int8|int4 [--group_size 128]]: the projections' weights quantized, docs/compression.md)

--text_file: the file is one document, encoded after a BOS as training saw it. Every token after the BOS is
scored given those before it; a document longer than the model's context (config.data.seq_len) is scored in
consecutive windows of that many tokens, each conditioned on its own window only. Prints one line per token,
`index<TAB>id<TAB>piece<TAB>loss` (loss in nats), then `tokens N  loss X  perplexity Y`.

--tokens: int token ids [B, T] (.npy); writes fp32 logits [B, T, V] of the full forward (row b, position t
predicts token t + 1) to --logits_out, V the tokenizer's vocabulary (the embedding's padding rows are cut).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json, tokenizer, checkpoints) or export.")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Step number, or path to a checkpoint or export.")
_TEXT = flags.DEFINE_string("text_file", None, "A UTF-8 text file to score.")
_TOKENS = flags.DEFINE_string("tokens", None, "A .npy of int token ids [B, T].")
_LOGITS_OUT = flags.DEFINE_string("logits_out", None, "Where --tokens writes fp32 logits [B, T, V] (.npy).")
_DTYPE = flags.DEFINE_string("compute_dtype", None, "Override the run's compute dtype (float32, bfloat16).")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8", "int4"], "Weight-only quantization of the projections.")
_GROUP_SIZE = flags.DEFINE_integer("group_size", 128, "--quantize=int4: inputs per scale (per output channel).")


def _read_inputs():
  """(text or None, tokens or None), checked before the model is loaded."""
  if bool(_TEXT.value) == bool(_TOKENS.value):
    raise ValueError("pass exactly one of --text_file F or --tokens IDS.npy --logits_out OUT.npy")
  if _TEXT.value:
    try:
      with open(_TEXT.value, encoding="utf-8") as f:
        return f.read(), None
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"--text_file={_TEXT.value}: cannot read it ({e}); give a UTF-8 text file") from None
  if not _LOGITS_OUT.value:
    raise ValueError("--tokens needs --logits_out OUT.npy, where the logits go")
  try:
    tokens = np.load(_TOKENS.value)
  except (OSError, ValueError) as e:
    raise ValueError(f"--tokens={_TOKENS.value}: cannot read it as .npy ({e}); save int ids with numpy.save") from None
  if tokens.ndim != 2 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(
      f"--tokens={_TOKENS.value}: holds {tokens.dtype} {list(tokens.shape)}; give int token ids of shape [B, T]"
    )
  return None, tokens


def score_text(loaded, text: str):
  """(ids scored [N], loss per id [N]) of a document, in windows of the model's context."""
  tok, decoder = loaded.tokenizer, loaded.decoder
  ids = np.array([tok.bos_id, *tok.encode(text)], np.int64)
  if len(ids) < 2:
    raise ValueError(f"--text_file={_TEXT.value}: no text to score; give a non-empty file")
  window = decoder.model_cfg.max_len
  starts = list(range(0, len(ids) - 1, window))
  # Row w: inputs ids[s : s + window], targets one further; the last row right-padded (segment 0).
  inputs = np.zeros((len(starts), window), np.int32)
  segments = np.zeros((len(starts), window), np.int32)
  targets = np.zeros((len(starts), window), np.int64)
  for row, s in enumerate(starts):
    n = min(window, len(ids) - 1 - s)
    inputs[row, :n], segments[row, :n], targets[row, :n] = ids[s : s + n], 1, ids[s + 1 : s + 1 + n]
  logits = np.asarray(decoder.forward(loaded.params, inputs, segments))[..., : tok.vocab_size]
  logits = logits - logits.max(-1, keepdims=True)
  logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  losses = -np.take_along_axis(logprobs, targets[..., None], axis=-1)[..., 0]
  keep = segments == 1
  return targets[keep], losses[keep]


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}")
  logging.set_verbosity(logging.WARNING)  # the output is the scores (and errors), not library progress
  try:  # before JAX is imported: a mistyped flag answers at once
    if not _WORKDIR.value:
      raise ValueError("--workdir is required; pass a run directory or an export")
    text, tokens = _read_inputs()
  except ValueError as e:
    sys.exit(f"error: {e}")
  from data import DataError
  from generation.run import load_run, report_quantization
  from settings import ConfigError
  from storage.checkpoint import CheckpointError

  try:
    loaded = load_run(
      _WORKDIR.value,
      _CHECKPOINT.value,
      compute_dtype=_DTYPE.value,
      quantize=_QUANTIZE.value,
      group_size=_GROUP_SIZE.value,
    )
    report_quantization(loaded)
    tok, cfg = loaded.tokenizer, loaded.decoder.model_cfg
    if tokens is not None:
      if tokens.min() < 0 or tokens.max() >= tok.vocab_size:
        raise ValueError(f"--tokens: ids must lie in [0, {tok.vocab_size}), the tokenizer's vocabulary")
      if cfg.position_type == "learned" and tokens.shape[1] > cfg.max_len:
        raise ValueError(f"--tokens: {tokens.shape[1]} positions, the model has {cfg.max_len}; shorten the rows")
      logits = np.asarray(loaded.decoder.forward(loaded.params, tokens))[..., : tok.vocab_size]
      np.save(_LOGITS_OUT.value, logits.astype(np.float32))
      print(f"wrote fp32 logits {list(logits.shape)} to {_LOGITS_OUT.value}")
      return
    ids, losses = score_text(loaded, text)
  except (ValueError, ConfigError, DataError, CheckpointError, OSError) as e:
    sys.exit(f"error: {e}")
  for i, (token, loss) in enumerate(zip(ids.tolist(), losses.tolist())):
    print(f"{i}\t{token}\t{tok.id_to_piece(token)!r}\t{loss:.4f}")
  mean = float(losses.mean())
  print(f"tokens {len(ids)}  loss {mean:.4f}  perplexity {float(np.exp(min(mean, 80.0))):.3f}")


if __name__ == "__main__":
  app.run(main)
