"""Loading a run: its config, model shape, tokenizer and where its weights are, from a run directory, one of
its checkpoints (`<run>/checkpoints/<step>`) or an export (`params/`, scripts/export_params.py or an import).

Training (a distillation teacher, a DPO reference, `checkpoint.init_from`), generation, scoring and export all
open runs here, so a model is rebuilt exactly as training built it: `model_config` is the one place the config
and the tokenizer's size become a `ModelConfig`, its embedding padded as training pads it.
"""

import dataclasses
import json

import jax
import ml_collections
from etils import epath

from model import ModelConfig
from model.config import padded_vocab_size
from settings import ConfigError
from storage import as_path
from storage.checkpoint import CheckpointError, load_params

_RUN_FILES_UP = ("", "../..")  # a run directory, or one of its checkpoints <run>/checkpoints/<step>


def model_config(
  cfg,
  tokenizer_vocab: int,
  *,
  tensor: int = 1,
  max_len: int | None = None,
  with_lora: bool = False,
  rules=None,
  platform: str | None = None,
) -> ModelConfig:
  """The ModelConfig of `cfg` with the embedding padded for `tokenizer_vocab` tokens and a tensor axis of
  `tensor` devices (a size of -1 or 0 counts as 1); `max_len` defaults to data.seq_len. `with_lora`: the model
  with config.lora's adapters (the one a LoRA run trains); without, the base model its weights load into.
  `rules`: the logical-axis rules the model lays activations out by (a mapping; default the defaults).
  `platform`: the target's (parallel/target.py); default the platform of JAX's devices."""
  vocab = padded_vocab_size(tokenizer_vocab, cfg.model.vocab_multiple, max(tensor, 1))
  lora_cfg = cfg.lora if with_lora else None
  try:
    return ModelConfig.from_config(
      cfg.model,
      cfg.moe,
      vocab_size=vocab,
      max_len=max_len or cfg.data.seq_len,
      lora_cfg=lora_cfg,
      rules=rules,
      platform=platform or jax.default_backend(),
    )
  except ValueError as e:
    raise ConfigError(str(e)) from None


def run_file(path: str, name: str) -> epath.Path | None:
  """`name` (e.g. config.json) of the run that `path` (run dir, checkpoint or export) belongs to; None if none."""
  for up in _RUN_FILES_UP:
    candidate = as_path(path) / up / name if up else as_path(path) / name
    if candidate.is_file():
      return candidate
  return None


def run_tokenizer(path: str) -> str | None:
  """The tokenizer copy (tokenizer.json or tokenizer.model) of the run that `path` belongs to, None if none."""
  from data.tokenizer import run_tokenizer_path

  if not as_path(path).exists():
    return None
  for up in _RUN_FILES_UP:
    found = run_tokenizer_path(str(as_path(path) / up if up else as_path(path)))
    if found is not None:
      return found
  return None


def read_run_config(path: str, what: str = "--workdir") -> ml_collections.ConfigDict:
  """The run's config.json over today's defaults, so a run written before a key existed still loads."""
  from configs.base import base_config

  if what == "--workdir" and not (as_path(path) / "config.json").is_file():
    raise ConfigError(
      f"{as_path(path) / 'config.json'}: no such file; pass --workdir a run directory written by train.py "
      "(or an export)"
    )
  if not as_path(path).exists():
    raise CheckpointError(f"{what}={path} does not exist; train that run first or point {what} at another run")
  config_path = run_file(path, "config.json")
  if config_path is None:
    raise CheckpointError(
      f"{what}={path} has no config.json (its model shape); point it at a run directory, one of its checkpoints, "
      "or an export of scripts/export_params.py"
    )
  try:
    saved = json.loads(config_path.read_text())
  except ValueError as e:
    raise ConfigError(f"{config_path}: not valid JSON ({e}); restore the run's config.json") from None
  cfg = base_config()
  for group, values in saved.items():
    if group in cfg and isinstance(values, dict):
      cfg[group].update({k: v for k, v in values.items() if k in cfg[group]})
  return cfg


def run_model_config(path: str, tokenizer_vocab: int, tensor: int, seq_len: int, what: str) -> ModelConfig:
  """The model of another run (a teacher) as this run's steps run it: padded for this run's tensor axis, its
  positions covering `seq_len`."""
  cfg = read_run_config(path, what)
  if cfg.model.position_type == "learned" and seq_len > cfg.data.seq_len:
    raise ConfigError(
      f"config.data.seq_len={seq_len} is longer than the learned positions of {what} ({cfg.data.seq_len}); "
      f"use at most {cfg.data.seq_len}"
    )
  return model_config(cfg, tokenizer_vocab, tensor=tensor, max_len=max(cfg.data.seq_len, seq_len))


def _steps(run: epath.Path) -> list[int]:
  root = run / "checkpoints"
  return sorted(int(p.name) for p in root.iterdir() if p.name.isdigit()) if root.is_dir() else []


def checkpoint_path(workdir: str, checkpoint: str | None = None) -> str:
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


def saved_vocab(source: str) -> int | None:
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


@dataclasses.dataclass(frozen=True)
class Run:
  """A run opened for reading: its config, model, tokenizer file and the checkpoint or export of its weights."""

  cfg: ml_collections.ConfigDict
  model_cfg: ModelConfig
  tokenizer_path: str
  source: str

  def load_params(self, abstract_params: dict) -> dict:
    """The weights in the shardings of `abstract_params` (ShapeDtypeStructs with shardings)."""
    return load_params(self.source, abstract_params)[0]


def open_run(workdir: str, checkpoint: str | None = None, *, compute_dtype: str | None = None) -> Run:
  """The run in `workdir` with the weights of `checkpoint` (see `checkpoint_path`), its model as saved: the
  embedding has the rows the checkpoint has (weights converted from another library may pad otherwise)."""
  from data.tokenizer import Tokenizer, run_tokenizer_path

  cfg = read_run_config(workdir)
  tokenizer_path = run_tokenizer_path(workdir)
  if tokenizer_path is None:
    raise ConfigError(f"{workdir} holds no tokenizer.model or tokenizer.json; pass a run directory or an export")
  source = checkpoint_path(workdir, checkpoint)
  tokenizer_vocab = Tokenizer(tokenizer_path).vocab_size
  model_cfg = model_config(cfg, tokenizer_vocab, tensor=cfg.mesh.tensor)
  rows = saved_vocab(source)
  if rows is not None and rows != model_cfg.vocab_size and rows >= tokenizer_vocab:
    model_cfg = dataclasses.replace(model_cfg, vocab_size=rows)
  if compute_dtype:
    model_cfg = dataclasses.replace(model_cfg, compute_dtype=compute_dtype)
  return Run(cfg=cfg, model_cfg=model_cfg, tokenizer_path=str(tokenizer_path), source=source)
