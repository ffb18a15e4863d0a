"""A run directory (or an export) made ready to decode: its config, tokenizer, model and parameters on one device.

The model is built from `<run>/config.json` as training built it (`ModelConfig.from_config`, the vocabulary
padded as trainer/experiment.py pads it). The mesh has every axis of size 1, so the logical axes of the
parameters and the KV cache are annotated as in training and map to a single device.
"""

import dataclasses
import json

import jax
import ml_collections
import numpy as np
from etils import epath
from jax.sharding import AxisType, Mesh

from data.tokenizer import Tokenizer, run_tokenizer_path
from generation.decoding import Decoder
from model import ModelConfig
from model.config import padded_vocab_size
from parallel.mesh import MESH_AXES
from parallel.rules import DEFAULT_RULES, parse_rules
from settings import ConfigError
from storage import as_path
from storage.checkpoint import CheckpointError, load_params


@dataclasses.dataclass
class LoadedRun:
  cfg: ml_collections.ConfigDict
  tokenizer: Tokenizer
  decoder: Decoder
  params: dict
  source: str  # the checkpoint or export the parameters came from


def one_device_mesh() -> Mesh:
  devices = np.array(jax.devices()[:1]).reshape((1,) * len(MESH_AXES))
  return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
  path = as_path(workdir) / "config.json"
  if not path.is_file():
    raise ConfigError(f"{path}: no such file; pass --workdir a run directory written by train.py (or an export)")
  try:
    return ml_collections.ConfigDict(json.loads(path.read_text()))
  except ValueError as e:
    raise ConfigError(f"{path}: not valid JSON ({e}); restore the run's config.json") from None


def model_config(cfg, tokenizer_vocab: int) -> ModelConfig:
  """The run's ModelConfig, its embedding padded as in training (a tensor axis of -1 counts as 1)."""
  tensor = cfg.mesh.tensor if cfg.mesh.tensor > 0 else 1
  vocab = padded_vocab_size(tokenizer_vocab, cfg.model.vocab_multiple, tensor)
  return ModelConfig.from_config(cfg.model, cfg.moe, vocab_size=vocab, max_len=cfg.data.seq_len)


def checkpoint_path(workdir: str, checkpoint: str | None) -> str:
  """What `--checkpoint` names: None -> the run's latest checkpoint, else its `params` export; a step number ->
  `<run>/checkpoints/<step>`; anything else a path to a checkpoint or an export."""
  run = as_path(workdir)
  if not checkpoint:
    steps = _steps(run)
    if steps:
      return str(run / "checkpoints" / str(steps[-1]))
    if (run / "params").is_dir():
      return str(run)
    raise CheckpointError(
      f"{run} holds no checkpoint (checkpoints/<step>) and no params export; train it first, or pass --checkpoint"
    )
  if checkpoint.isdigit():
    steps = _steps(run)
    if int(checkpoint) not in steps:
      raise CheckpointError(f"--checkpoint={checkpoint}: no such step in {run / 'checkpoints'}; available: {steps}")
    return str(run / "checkpoints" / str(int(checkpoint)))
  path = as_path(checkpoint)
  if not any((path / name).is_dir() for name in ("state", "params", "checkpoints")):
    raise CheckpointError(
      f"--checkpoint={checkpoint}: neither a step number nor a checkpoint or export directory "
      "(one holding state/ or params/); pass a step of the run or the output of scripts/export_params.py"
    )
  return str(path)


def _steps(run: epath.Path) -> list[int]:
  root = run / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def _saved_vocab(source: str) -> int | None:
  """Rows of the saved embedding (`params.embed_VxD`), from the checkpoint's metadata; None if unreadable."""
  import orbax.checkpoint as ocp

  path = as_path(source)
  for item in (path / "state", path / "params"):
    if item.is_dir():
      try:
        tree = ocp.StandardCheckpointer().metadata(str(item)).item_metadata.tree
        return int(tree["params"]["embed_VxD"].shape[0])
      except Exception:  # noqa: BLE001 (load_params reports an unreadable checkpoint in its own words)
        return None
  return None


def load_run(workdir: str, checkpoint: str | None = None, *, compute_dtype: str | None = None) -> LoadedRun:
  """Config, tokenizer, decoder and parameters of a run; bad input raises a one-line ConfigError, DataError or
  CheckpointError."""
  cfg = read_run_config(workdir)
  tokenizer_path = run_tokenizer_path(workdir)
  if tokenizer_path is None:
    raise ConfigError(f"{workdir} holds no tokenizer.model or tokenizer.json; pass a run directory or an export")
  tokenizer = Tokenizer(tokenizer_path)
  source = checkpoint_path(workdir, checkpoint)
  model_cfg = model_config(cfg, tokenizer.vocab_size)
  saved_vocab = _saved_vocab(source)
  if saved_vocab is not None and saved_vocab != model_cfg.vocab_size and saved_vocab >= tokenizer.vocab_size:
    # Embedding rows padded otherwise than this config pads them (e.g. weights converted from another library,
    # or a tensor axis of -1 in training): the checkpoint's count is the truth.
    model_cfg = dataclasses.replace(model_cfg, vocab_size=saved_vocab)
  if compute_dtype:
    model_cfg = dataclasses.replace(model_cfg, compute_dtype=compute_dtype)
  # Rules of runs made before a logical name existed fall back to its default.
  rules = {**parse_rules(DEFAULT_RULES), **parse_rules(cfg.mesh.rules)}
  decoder = Decoder(model_cfg, tokenizer.vocab_size, one_device_mesh(), rules)
  params, _ = load_params(source, decoder.abstract_sharded_params())
  return LoadedRun(cfg=cfg, tokenizer=tokenizer, decoder=decoder, params=params, source=source)
