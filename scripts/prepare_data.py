"""Build a config's token cache with Apache Beam, ahead of training: a run then starts without tokenizing.

  python scripts/prepare_data.py --config configs/C.py [--config.data.KEY=VALUE ...] [--out DIR_OR_URL]
      [--runner DirectRunner|DataflowRunner|FlinkRunner|SparkRunner] [Beam pipeline options ...]

Reads the config's data.files (text, JSONL, Parquet; local or gs://; `WEIGHT:GLOB` mixtures), trains the tokenizer
as a run would (or takes data.tokenizer), tokenizes every work unit and writes the cache the trainer reads, with
the held-out split's hashes, plus its manifest `prepared.json` (data/prepare.py, data/prepared.py). --out defaults
to data.cache_dir; train with `--config.data.cache_dir=OUT`. Options other than these go to Beam as they are, e.g.
`--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp` or `--direct_num_workers=2`. The
default runner is DirectRunner in multi-processing mode, one worker per local core. Ends with one JSON line:
{"out", "units", "text_bytes", "tokenizer_s", "pipeline_s", "text_mb_per_s", "runner"}.
"""

import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str], list[str]]:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True, help="config file, e.g. configs/tiny.py")
  parser.add_argument("--out", default="", help="cache dir to write (default: the config's data.cache_dir)")
  args, rest = parser.parse_known_args(argv)
  overrides = [arg for arg in rest if arg.startswith("--config.")]
  return args, overrides, [arg for arg in rest if not arg.startswith("--config.")]


def main(argv: list[str]) -> int:
  from data import DataError
  from settings import ConfigError
  from settings.load import load_with_overrides
  from storage import StorageError

  args, overrides, beam_args = _parse(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  try:
    cfg = load_with_overrides(args.config, overrides)
    if args.out:
      cfg.data.cache_dir = args.out
    if not cfg.data.files and not cfg.data.hf_dataset:
      raise DataError("data.files is empty (the built-in default corpus needs no preparing); set data.files")
    from data.prepare import prepare, runner_name

    result = prepare(cfg.data, beam_args)
  except (DataError, ConfigError, StorageError) as e:
    print(f"prepare_data: {e}", file=sys.stderr)
    return 2
  result["runner"] = runner_name(beam_args) or "DirectRunner"
  print(json.dumps(result))
  return 0


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
