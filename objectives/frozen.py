"""What objectives share about models they read but never train, and about where a run's tokenizer comes from."""

import logging

import ml_collections

import objectives
from data.cache import file_sha256
from settings import ConfigError
from storage.checkpoint import load_params
from storage.run import run_tokenizer

_log = logging.getLogger(__name__)


def frozen_loader(name: str, model: objectives.FrozenModel, abstract: dict, initial_params):
  """() -> the frozen tree in the shardings of `abstract` (ShapeDtypeStructs with shardings), read once per run:
  from `model.source`, or `initial_params()` (this run's own initial parameters) when it has none."""

  def load() -> dict:
    if not model.source:
      _log.info("frozen %s: this run's initial parameters", name)
      return initial_params()
    _log.info("frozen %s: the parameters of %s", name, model.source)
    return load_params(model.source, abstract)[0]

  return load


def tokenizer_data_cfg(cfg) -> ml_collections.ConfigDict:
  """`config.data` as load_tokenizer should see it: with data.tokenizer empty, a run takes the tokenizer of the
  run its objective builds on (`Objective.tokenizer_runs`: teacher, reference, init_from); an objective whose
  data is not plain text (sft, dpo) otherwise trains one on the default corpus."""
  objective = objectives.get(cfg.train.objective)
  data_cfg = ml_collections.ConfigDict(cfg.data.to_dict())
  runs = [run for run in objective.tokenizer_runs(cfg) if run]
  if data_cfg.tokenizer:
    if objective.same_tokenizer:
      for run in runs:
        _check_same_tokenizer(data_cfg.tokenizer, run)
    return data_cfg
  for run in runs:
    found = run_tokenizer(run)
    if found is not None:
      data_cfg.tokenizer = str(found)
      return data_cfg
  if not objective.text_corpus:
    data_cfg.files, data_cfg.hf_dataset = "", ""
  return data_cfg


def _check_same_tokenizer(tokenizer: str, run: str) -> None:
  """The student's logits are compared with the teacher's id by id: both must use one tokenizer."""
  theirs = run_tokenizer(run)
  if theirs is not None and file_sha256(tokenizer) != file_sha256(str(theirs)):
    raise ConfigError(
      f"config.data.tokenizer={tokenizer} is not the teacher's tokenizer ({theirs}); distillation compares "
      "the two models token by token: leave data.tokenizer empty to use the teacher's"
    )
