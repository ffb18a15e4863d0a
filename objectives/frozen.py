"""What `config.train.objective` adds to a run: its loss function, its frozen models and where its tokenizer
comes from. experiment.build calls `objective_setup` and `frozen_loader`, the loop `tokenizer_data_cfg`; the
losses themselves are in objectives.py.
"""

import dataclasses
import json
import logging

import jax
import ml_collections
from etils import epath

import objectives
from configs.base import base_config
from data.cache import file_sha256
from data.tokenizer import run_tokenizer_path
from model import ModelConfig
from model.config import padded_vocab_size
from settings import ConfigError
from storage import as_path
from storage.checkpoint import CheckpointError, load_params
from trainer.state import abstract_model

_log = logging.getLogger(__name__)

_RUN_FILES_UP = ("", "../..")  # a run directory, or one of its checkpoints <run>/checkpoints/<step>


@dataclasses.dataclass(frozen=True)
class FrozenModel:
  """A model the step reads but never trains: where its parameters come from, and their abstract tree."""

  source: str  # a run / checkpoint / export for load_params; "" = this run's own initial parameters
  model_cfg: ModelConfig
  abstract_params: dict  # ShapeDtypeStructs (no shardings)
  logical_names: dict


@dataclasses.dataclass(frozen=True)
class ObjectiveSetup:
  loss_fn: object  # objectives' LossFn, or None for the default next-token loss (lm, sft)
  count_fn: object  # batch -> the count the objective's sums are divided by (tokens, or pairs for dpo)
  frozen: dict  # name -> FrozenModel: {"reference": ...} for dpo, {"teacher": ...} for distill


def _run_file(path: str, name: str) -> epath.Path | None:
  """`name` (config.json) of the run that `path` (run dir, checkpoint or export) belongs to."""
  for up in _RUN_FILES_UP:
    candidate = as_path(path) / up / name if up else as_path(path) / name
    if candidate.is_file():
      return candidate
  return None


def _run_tokenizer(path: str) -> str | None:
  """The tokenizer copy (tokenizer.json or tokenizer.model) of the run that `path` belongs to, None if none."""
  if not as_path(path).exists():
    return None
  for up in _RUN_FILES_UP:
    found = run_tokenizer_path(str(as_path(path) / up if up else as_path(path)))
    if found is not None:
      return found
  return None


def _teacher_model_config(teacher: str, tokenizer_vocab: int, tensor: int, seq_len: int) -> ModelConfig:
  if not as_path(teacher).exists():
    raise CheckpointError(
      f"config.distill.teacher={teacher} does not exist; train the teacher first (python train.py --config "
      "configs/tiny.py writes runs/tiny) or point distill.teacher at another run"
    )
  config_path = _run_file(teacher, "config.json")
  if config_path is None:
    raise CheckpointError(
      f"config.distill.teacher={teacher} has no config.json (its model shape); point it at a run directory, "
      "one of its checkpoints, or an export of scripts/export_params.py"
    )
  saved = json.loads(config_path.read_text())
  # The teacher's model and moe groups over today's defaults: a run written before a key existed still loads.
  cfg = base_config()
  for group in ("model", "moe"):
    cfg[group].update({k: v for k, v in saved.get(group, {}).items() if k in cfg[group]})
  max_len = int(saved.get("data", {}).get("seq_len", seq_len))
  if cfg.model.position_type == "learned" and seq_len > max_len:
    raise ConfigError(
      f"config.data.seq_len={seq_len} is longer than the teacher's learned positions ({max_len}); use at most {max_len}"
    )
  vocab = padded_vocab_size(tokenizer_vocab, cfg.model.vocab_multiple, tensor)
  return ModelConfig.from_config(cfg.model, cfg.moe, vocab_size=vocab, max_len=max(max_len, seq_len))


def objective_setup(
  cfg, model_cfg: ModelConfig, abstract_params: dict, logical_names: dict, graphdef, tokenizer_vocab: int, tensor: int
) -> ObjectiveSetup:
  """The loss function, count and frozen models of `cfg.train.objective` for the model being trained."""
  objective = cfg.train.objective
  if objective == "dpo":
    source = cfg.dpo.reference or cfg.checkpoint.init_from
    reference = FrozenModel(source, model_cfg, abstract_params, logical_names)
    loss_fn = objectives.make_dpo_loss(graphdef, beta=cfg.dpo.beta)
    return ObjectiveSetup(loss_fn, objectives.pair_count, {"reference": reference})
  if objective == "distill":
    teacher_cfg = _teacher_model_config(cfg.distill.teacher, tokenizer_vocab, tensor, cfg.data.seq_len)
    teacher_graphdef, teacher_params, teacher_names = abstract_model(teacher_cfg)
    loss_fn = objectives.make_distill_loss(
      graphdef,
      teacher_graphdef,
      temperature=cfg.distill.temperature,
      alpha=cfg.distill.alpha,
      vocab_size=tokenizer_vocab,
    )
    teacher = FrozenModel(cfg.distill.teacher, teacher_cfg, teacher_params, teacher_names)
    return ObjectiveSetup(loss_fn, objectives.token_count, {"teacher": teacher})
  return ObjectiveSetup(None, objectives.token_count, {})


def frozen_loader(name: str, model: FrozenModel, shapes: dict, shardings: dict, initial_params):
  """() -> the frozen tree in its shardings, read once per run: from `model.source`, or `initial_params()`."""
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)

  def load() -> dict:
    if not model.source:
      _log.info("frozen %s: this run's initial parameters", name)
      return initial_params()
    _log.info("frozen %s: the parameters of %s", name, model.source)
    return load_params(model.source, abstract)[0]

  return load


def tokenizer_data_cfg(cfg) -> ml_collections.ConfigDict:
  """`config.data` as load_tokenizer should see it: with data.tokenizer empty, a fine-tuning run takes the
  tokenizer of the run it builds on (teacher, reference, init_from); sft and dpo otherwise train one on the
  default corpus, since their chat JSONL has no text field to train on."""
  data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
  objective = cfg.train.objective
  if objective == "distill" and data_cfg.tokenizer:
    _check_same_tokenizer(data_cfg.tokenizer, cfg.distill.teacher)
  if data_cfg.tokenizer or objective == "lm":
    return data_cfg
  sources = {
    "distill": [cfg.distill.teacher],
    "dpo": [cfg.dpo.reference, cfg.checkpoint.init_from],
    "sft": [cfg.checkpoint.init_from],
  }[objective]
  for source in filter(None, sources):
    found = _run_tokenizer(source)
    if found is not None:
      data_cfg.tokenizer = str(found)
      return data_cfg
  if objective in ("sft", "dpo"):
    data_cfg.files, data_cfg.hf_dataset = "", ""
  return data_cfg


def _check_same_tokenizer(tokenizer: str, teacher: str) -> None:
  """The student's logits are compared with the teacher's id by id: both must use one tokenizer."""
  theirs = _run_tokenizer(teacher)
  if theirs is not None and file_sha256(tokenizer) != file_sha256(str(theirs)):
    raise ConfigError(
      f"config.data.tokenizer={tokenizer} is not the teacher's tokenizer ({theirs}); distillation compares "
      "the two models token by token: leave data.tokenizer empty to use the teacher's"
    )
