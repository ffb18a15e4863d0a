"""Generate text from a trained run (or an export) with a KV cache.

  python scripts/generate.py --workdir runs/tiny --prompt "def main(" [--prompt ...] [--prompts_file F]
      [--checkpoint STEP|PATH] [--max_new_tokens 128] [--temperature 0.8] [--top_k 40] [--top_p 0.95]
      [--beam_width 4] [--stop_ids 13,42] [--seed 0] [--quantize int8|int4 [--group_size 128]]

Each prompt is encoded after a BOS token, as training saw documents. With one prompt the new text streams to
the terminal as it is produced; with several, each completion is printed when all are done, after a
`=== completion i ===` line. --temperature 0 is greedy; --beam_width > 1 runs beam search (sampling flags are
then ignored). A row stops at EOS, at any --stop_ids, or after --max_new_tokens. --quantize holds the
projections' weights as int8 or int4 (docs/compression.md).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (config.json, tokenizer, checkpoints) or export.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt; repeat for a batch.")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "A file with one prompt per line (added to --prompt).")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Step number, or path to a checkpoint or export.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Most new tokens per prompt.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "Sampling temperature; 0 is greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0: all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Sample among the most likely tokens holding this much probability.")
_BEAM = flags.DEFINE_integer("beam_width", 1, "Beams; > 1 runs beam search instead of sampling.")
_STOP_IDS = flags.DEFINE_list("stop_ids", [], "Token ids that end a completion, besides EOS.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_DTYPE = flags.DEFINE_string("compute_dtype", None, "Override the run's compute dtype (float32, bfloat16).")
_QUANTIZE = flags.DEFINE_enum("quantize", None, ["int8", "int4"], "Weight-only quantization of the projections.")
_GROUP_SIZE = flags.DEFINE_integer("group_size", 128, "--quantize=int4: inputs per scale (per output channel).")


def _prompts() -> list[str]:
  prompts = list(_PROMPT.value)
  if _PROMPTS_FILE.value:
    try:
      with open(_PROMPTS_FILE.value, encoding="utf-8") as f:
        prompts += [line.rstrip("\n") for line in f if line.strip()]
    except (OSError, UnicodeDecodeError) as e:
      raise ValueError(f"--prompts_file={_PROMPTS_FILE.value}: cannot read it ({e}); give a UTF-8 text file") from None
  if not prompts:
    raise ValueError("no prompt; pass --prompt TEXT (repeatable) or --prompts_file with one prompt per line")
  return prompts


def _settings() -> tuple[object, list[int]]:
  from generation import Sampling

  if _MAX_NEW.value < 1:
    raise ValueError(f"--max_new_tokens={_MAX_NEW.value}; give at least 1")
  if _TEMPERATURE.value < 0 or _TOP_K.value < 0 or not 0 < _TOP_P.value <= 1 or _BEAM.value < 1:
    raise ValueError("--temperature and --top_k must be >= 0, --top_p in (0, 1], --beam_width >= 1")
  try:
    stop_ids = [int(i) for i in _STOP_IDS.value]
  except ValueError:
    raise ValueError(f"--stop_ids={','.join(_STOP_IDS.value)}: give integer token ids, comma separated") from None
  return Sampling(_TEMPERATURE.value, _TOP_K.value, _TOP_P.value), stop_ids


def run() -> None:
  from data import DataError
  from generation import beam_search, generate
  from generation.run import load_run, report_quantization
  from generation.stream import TextStream
  from settings import ConfigError
  from storage.checkpoint import CheckpointError

  try:
    if not _WORKDIR.value:
      raise ValueError("--workdir is required; pass a run directory or an export")
    prompts, (sampling, stop_ids) = _prompts(), _settings()
    loaded = load_run(
      _WORKDIR.value,
      _CHECKPOINT.value,
      compute_dtype=_DTYPE.value,
      quantize=_QUANTIZE.value,
      group_size=_GROUP_SIZE.value,
    )
    report_quantization(loaded)
  except (ValueError, ConfigError, DataError, CheckpointError) as e:
    sys.exit(f"error: {e}")
  tok, decoder = loaded.tokenizer, loaded.decoder
  bad = [i for i in stop_ids if not 0 <= i < tok.vocab_size]
  if bad:
    sys.exit(f"error: --stop_ids {bad} are outside the vocabulary [0, {tok.vocab_size}); give ids of tokens")
  stop_ids = [tok.eos_id, *stop_ids]
  encoded = [[tok.bos_id, *tok.encode(p)] for p in prompts]
  cfg = decoder.model_cfg
  if cfg.position_type == "learned" and max(map(len, encoded)) + _MAX_NEW.value > cfg.max_len:
    sys.exit(f"error: prompt + --max_new_tokens exceed the model's {cfg.max_len} positions; shorten either")
  common = dict(max_new_tokens=_MAX_NEW.value, stop_ids=stop_ids, pad_id=tok.pad_id)
  if _BEAM.value > 1:
    completions = beam_search(decoder, loaded.params, encoded, width=_BEAM.value, **common)
  elif len(prompts) == 1:
    stream = TextStream(tok)
    sys.stdout.write(prompts[0])

    def show(row: int, token: int) -> None:
      sys.stdout.write(stream.push(token))
      sys.stdout.flush()

    generate(decoder, loaded.params, encoded, sampling=sampling, seed=_SEED.value, on_token=show, **common)
    sys.stdout.write(stream.flush() + "\n")
    return
  else:
    completions = generate(decoder, loaded.params, encoded, sampling=sampling, seed=_SEED.value, **common)
  for i, (prompt, completion) in enumerate(zip(prompts, completions)):
    print(f"=== completion {i} ===")
    print(prompt + tok.decode(completion.tokens))


def main(argv):
  if len(argv) > 1:
    sys.exit(f"error: unexpected arguments {argv[1:]}; prompts go in --prompt")
  logging.set_verbosity(logging.WARNING)  # the terminal shows the text (and errors), not library progress
  run()


if __name__ == "__main__":
  app.run(main)
