"""Convert between Hugging Face checkpoints and kiln run directories.

  python scripts/convert_hf.py --hf_dir DIR --out RUN [--dtype bfloat16]
  python scripts/convert_hf.py --to_hf RUN --out DIR [--dtype bfloat16] [--max_shard_gb 5]

Import writes RUN/config.json, RUN/params (start a run from it with --config.checkpoint.init_from=RUN) and the
tokenizer files; export writes config.json, safetensors and the tokenizer files that
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads. `--out` must not exist. See
docs/generation-and-hf.md.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402

_HF_DIR = flags.DEFINE_string("hf_dir", None, "Hugging Face model directory to import.")
_TO_HF = flags.DEFINE_string("to_hf", None, "kiln run directory to export.")
_OUT = flags.DEFINE_string("out", None, "Output directory (must not exist).")
_DTYPE = flags.DEFINE_enum(
  "dtype", None, ["float32", "bfloat16"], "Weights dtype; default float32 on import, the stored dtype on export."
)
_MAX_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Export: largest safetensors shard, in GB (2^30 bytes).")


def convert(hf_dir: str | None, to_hf: str | None, out: str | None, dtype: str | None, max_shard_gb: float) -> int:
  """Runs one direction; prints a summary, or `error: ...` (one line) and returns 1."""
  from hf.convert import export_hf, import_hf
  from settings import ConfigError
  from storage.checkpoint import CheckpointError

  if (hf_dir is None) == (to_hf is None) or not out:
    print("error: pass exactly one of --hf_dir DIR or --to_hf RUN, and --out", file=sys.stderr)
    return 1
  if max_shard_gb <= 0:
    print(f"error: --max_shard_gb={max_shard_gb} must be positive", file=sys.stderr)
    return 1
  try:
    if hf_dir is not None:
      summary = import_hf(hf_dir, out, dtype or "float32")
      print(f"imported {summary['family']} ({summary['params'] / 1e6:.1f}M parameters) from {hf_dir} into {out}")
    else:
      summary = export_hf(to_hf, out, dtype, int(max_shard_gb * (1 << 30)))
      print(f"exported {to_hf} as {summary['family']} into {out}: {', '.join(summary['files'])}")
      for note in summary["notes"]:
        print(f"note: {note}")
  except (ConfigError, CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  return 0


def main(argv):
  del argv
  logging.set_verbosity(logging.ERROR)  # orbax logs each step of a save (and a missing metadata file on read)
  sys.exit(convert(_HF_DIR.value, _TO_HF.value, _OUT.value, _DTYPE.value, _MAX_SHARD_GB.value))


if __name__ == "__main__":
  app.run(main)
