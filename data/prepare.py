"""The token cache built by an Apache Beam pipeline (scripts/prepare_data.py), for corpora too large to tokenize
at a training job's start.

The pipeline is the trainer's own cache build driven by another engine: the same units (sources.py), the same
unit paths and the same writer (token_cache.py), so the files are byte for byte those a run would build for the
same config. Steps:
  1. here, before the pipeline: the tokenizer, trained on the same sample as a run would train it
     (tokenizer.py; a sample of `data.tokenizer_sample_bytes`, so one machine suffices) or `data.tokenizer`;
  2. the pipeline: one element per work unit of every source, redistributed (Reshuffle) over the workers,
     each tokenizing its unit into its file; a unit file already there is kept, so a failed run resumes;
  3. here, after it: `prepared.json` (data/prepared.py), which tells a run to read these files and tokenize
     nothing. It is written last: a cache dir without it is never taken for a prepared one.
Beam is imported only here: nothing a training run imports needs it.
"""

import os
import time

import numpy as np
from etils import epath

from data import prepared, token_cache
from data.errors import DataError
from data.sources import Corpus, mixture
from data.tokenizer import Tokenizer, batch_encoder, load_tokenizer

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def runner_name(args: list[str]) -> str | None:
  runner = next((a.split("=", 1)[1] for a in args if a.startswith("--runner=")), None)
  if runner is None and "--runner" in args[:-1]:
    runner = args[args.index("--runner") + 1]
  return runner


def default_pipeline_args(args: list[str]) -> list[str]:
  """Beam options: the user's, with DirectRunner in multi-processing mode over the local cores by default."""
  runner = runner_name(args)
  out = list(args)
  if runner is None:
    out.append("--runner=DirectRunner")
    runner = "DirectRunner"
  if runner == "DirectRunner":
    if not any(a.startswith("--direct_running_mode") for a in args):
      out.append("--direct_running_mode=multi_processing")
    if not any(a.startswith("--direct_num_workers") for a in args):
      out.append(f"--direct_num_workers={os.cpu_count() or 1}")
  return out


def prepare(data_cfg, pipeline_args: list[str]) -> dict:
  """Builds the token cache of `data_cfg` into `data_cfg.cache_dir` with Beam; returns what it did."""
  import apache_beam as beam
  from apache_beam.options.pipeline_options import PipelineOptions

  start = time.perf_counter()
  tokenizer = load_tokenizer(data_cfg, None)  # trains it into the cache dir, as a run would
  tokenizer_s = time.perf_counter() - start
  sources = mixture(data_cfg.files)
  configs = [token_cache.source_config(data_cfg, s.files) for s in sources] if sources else [data_cfg]
  names = [s.name for s in sources] if sources else [""]
  plans = [token_cache.unit_plan(c, tokenizer) for c in configs]
  work = [(s, unit.index, str(paths[unit.index])) for s, (corpus, paths) in enumerate(plans) for unit in corpus.units]
  if not work:
    raise DataError(f"no work units in data.files={data_cfg.files!r}; nothing to prepare")
  with epath.Path(tokenizer.model_path).open("rb") as f:
    model = f.read()
  # Spawned Beam workers unpickle the DoFn, which needs kiln's modules on their path.
  os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (_REPO, os.environ.get("PYTHONPATH", "")) if p)
  pipeline_start = time.perf_counter()
  options = PipelineOptions(default_pipeline_args(pipeline_args))
  runner = None
  if runner_name(pipeline_args) in (None, "DirectRunner"):
    # The engine DirectRunner falls back to, and the one its multi-processing mode is for: asked for directly, as
    # DirectRunner first tries PrismRunner, which downloads a binary (and, offline, fails after a wait).
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    runner = FnApiRunner()
  with beam.Pipeline(runner=runner, options=options) as pipeline:
    _ = (
      pipeline
      | "Units" >> beam.Create(work)
      | "Spread" >> beam.Reshuffle()
      | "Tokenize" >> beam.ParDo(_TokenizeUnit([c for c, _ in plans], tokenizer.kind, model, tokenizer.vocab_size))
    )
  pipeline_s = time.perf_counter() - pipeline_start
  root = str(prepared.manifest_path(data_cfg).parent)
  missing = [path for _, _, path in work if not epath.Path(path).exists()]
  if missing:  # a runner that reported success without running every element
    raise DataError(f"the pipeline left {len(missing)} unit files unwritten (e.g. {missing[0]}); run it again")
  units = [(n, c.files, [_relative(str(p), root) for p in paths]) for n, c, (_, paths) in zip(names, configs, plans)]
  prepared.write_manifest(data_cfg, tokenizer.model_path, units)
  text_bytes = sum(corpus.total_file_bytes for corpus, _ in plans)
  return {
    "out": root,
    "units": len(work),
    "text_bytes": text_bytes,
    "tokenizer_s": tokenizer_s,
    "pipeline_s": pipeline_s,
    "text_mb_per_s": text_bytes / 1e6 / max(pipeline_s, 1e-9),
  }


def _relative(path: str, root: str) -> str:
  return path[len(root.rstrip("/")) + 1 :]


try:  # a DoFn subclass when Beam is installed; the module imports without it (nothing else here needs Beam)
  from apache_beam import DoFn as _DoFn
except ImportError:  # pragma: no cover - the newest stack has no Beam
  _DoFn = object


class _TokenizeUnit(_DoFn):
  """Tokenizes one work unit (source index, unit index, path) into its unit file, unless the file is there."""

  def __init__(self, corpora: list[Corpus], kind: str, model: bytes, vocab_size: int) -> None:
    self._corpora, self._kind, self._model = corpora, kind, model
    self._dtype = token_cache.token_dtype(vocab_size)
    self._encode = None

  def setup(self) -> None:
    self._encode = batch_encoder(self._kind, self._model)

  def process(self, element):
    source, index, path = element
    path = epath.Path(path)
    if path.exists():
      return
    corpus = self._corpora[source]
    num_tokens = token_cache.write_unit(
      path, corpus.units[index], token_cache.encode_unit(corpus, corpus.units[index], self._encode), self._dtype
    )
    corpus.report_invalid_utf8()
    yield num_tokens


def tokenizer_rate(data_cfg, tokenizer: Tokenizer, max_bytes: int) -> dict:
  """The tokenizer's own single-core rate over the first `max_bytes` of the corpus's text: the bound that a
  worker of the pipeline can at best reach."""
  encode = batch_encoder(tokenizer.kind, epath.Path(tokenizer.model_path).read_bytes())
  texts, total = [], 0
  for document in Corpus(data_cfg).documents():
    text = document.read()
    if text:
      texts.append(text)
      total += len(text.encode())
    if total >= max_bytes:
      break
  start = time.perf_counter()
  ids = encode(texts)
  seconds = time.perf_counter() - start
  return {"bytes": total, "tokens": int(np.sum([len(i) for i in ids])), "mb_per_s": total / 1e6 / seconds}
