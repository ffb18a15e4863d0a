"""Training objectives, one module each, looked up by `config.train.objective`.

An objective is an `Objective`: the documents it trains on, its loss and the count that loss is divided by,
the frozen models it reads (a DPO reference, a distillation teacher), where its tokenizer comes from and the
static checks of the config keys it reads. The built-in ones are the modules of this package that define
`OBJECTIVE` (`lm`, `sft`, `dpo`, `distill`): a new module here is a new objective, and no other file changes.
`train.objective` also takes `module:attribute` or `path/to/file.py:attribute` naming an `Objective` of your
own (examples/objectives/label_smoothing.py is a complete one).

The loss function contract (`LossFn`): (params, frozen, batch, dropout_key) -> ((loss_sum, z_sum, count), aux),
sums over the batch so microbatches and shards combine exactly; the step divides by `count_fn` of the whole
batch. `frozen` holds the parameter trees the step reads but never trains, by the names of `Setup.frozen`.

Most objectives train on a stream of batches read from data (`load_documents`). One that makes its batches from the
model being trained (grpo: rollouts of the current policy) gives `batches`, a factory of a `BatchSource` the loop
asks for each step's batch with the current state.
"""

import dataclasses
import importlib
import importlib.util
import pkgutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import jax
import jax.numpy as jnp

LossFn = Callable[[dict, dict, dict, jax.Array | None], tuple[tuple[jax.Array, jax.Array, jax.Array], dict]]


@dataclasses.dataclass(frozen=True)
class FrozenModel:
  """A model the step reads but never trains: where its parameters come from, and their abstract tree."""

  source: str  # a run / checkpoint / export; "" = this run's own initial parameters
  model_cfg: object  # model.ModelConfig
  abstract_params: dict  # ShapeDtypeStructs (no shardings)
  logical_names: dict


@dataclasses.dataclass(frozen=True)
class TrainedModel:
  """What an objective's `setup` may read about the run and the model it trains."""

  cfg: object  # the run's resolved ml_collections config
  model_cfg: object  # model.ModelConfig of the trained model
  graphdef: object
  abstract_params: dict  # the full model's parameters (LoRA adapters included), ShapeDtypeStructs
  logical_names: dict
  tokenizer_vocab: int  # the tokenizer's size; the embedding may be padded past it
  tensor_parallelism: int  # mesh.tensor: a frozen model of another shape pads its vocabulary to it too


@dataclasses.dataclass(frozen=True)
class Setup:
  """An objective's computation for one model: `loss_fn` None is the next-token loss (the one a pipeline runs)."""

  loss_fn: LossFn | None
  count_fn: Callable[[dict], jax.Array]  # batch -> what the loss sums are divided by (target tokens, pairs, ...)
  frozen: dict[str, FrozenModel] = dataclasses.field(default_factory=dict)


class BatchSource(Protocol):
  """Where a run's train batches come from, step by step (the loop's only view of its data)."""

  def next(self, state) -> tuple[dict, dict]:
    """The batch of the step that `state` (a TrainState) is about to take, and host metrics for its train line."""

  def position(self, done: int) -> dict:
    """The checkpoint's `data` item once `done` steps are complete ({"next_row": global cursor})."""

  def can_stop(self, done: int) -> bool:
    """Whether the run may checkpoint and stop after `done` steps and resume exactly from there."""

  def close(self) -> None: ...


def _no_problems(cfg) -> list[str]:
  del cfg
  return []


def _no_runs(cfg) -> list[str]:
  del cfg
  return []


def _token_cache(data_cfg, tokenizer):
  from data.token_cache import load_token_cache

  return load_token_cache(data_cfg, tokenizer)


@dataclasses.dataclass(frozen=True)
class Objective:
  """Everything one training objective brings to a run."""

  name: str
  setup: Callable[[TrainedModel], Setup]
  # (data config, tokenizer) -> the documents: a TokenCache or a source with the same interface (data/pipeline.py)
  load_documents: Callable = _token_cache
  # config -> one line per problem with the keys this objective reads; run by settings.validate before the backend
  config_problems: Callable[[object], list[str]] = _no_problems
  # config -> runs (directories or checkpoints) whose tokenizer the run takes when data.tokenizer is empty
  tokenizer_runs: Callable[[object], list[str]] = _no_runs
  # data.files holds plain text a tokenizer can be trained on (chat or preference JSONL does not)
  text_corpus: bool = True
  # a data.tokenizer given anyway must be that of `tokenizer_runs` (distillation compares logits id by id)
  same_tokenizer: bool = False
  # config -> the batch fields besides BATCH_FIELDS (trainer/experiment.py) that the loss reads: {name: dtype},
  # each [B, L]
  batch_fields: Callable[[object], dict[str, jnp.dtype]] = lambda cfg: {}
  # (cfg, tokenizer, experiment, frozen, start_step, saved data item or None) -> (BatchSource, eval batches);
  # None: the stream of `load_documents` (trainer/loop.py)
  batches: Callable | None = None


class ObjectiveError(ValueError):
  """`train.objective` names no objective; the message says which exist."""


def builtin_names() -> tuple[str, ...]:
  """The modules of this package that define an `OBJECTIVE`."""
  names = []
  for info in pkgutil.iter_modules(__path__):
    if not info.name.startswith("_") and hasattr(importlib.import_module(f"{__name__}.{info.name}"), "OBJECTIVE"):
      names.append(info.name)
  return tuple(sorted(names))


def get(name: str) -> Objective:
  """The objective `name`: a built-in one, `module:attribute` or `path/to/file.py:attribute`."""
  if ":" in name:
    return _user_objective(name)
  if name in builtin_names():
    return importlib.import_module(f"{__name__}.{name}").OBJECTIVE
  raise ObjectiveError(
    f"config.train.objective={name!r} is not one of {', '.join(builtin_names())}; pick one of them, or name your own "
    "as module:attribute or path/to/file.py:attribute"
  )


def _user_objective(spec: str) -> Objective:
  try:
    objective = import_attribute(spec)
  except ImportError as e:
    raise ObjectiveError(f"config.train.objective={spec!r}: {e}") from None
  except AttributeError:
    objective = None
  if not isinstance(objective, Objective):
    where, _, attribute = spec.rpartition(":")
    raise ObjectiveError(
      f"config.train.objective={spec!r}: {where} has no Objective named {attribute!r} "
      f"(found {type(objective).__name__}); define {attribute} = objectives.Objective(...)"
    )
  return objective


def import_attribute(spec: str):
  """The attribute named by `module:attribute` or `path/to/file.py:attribute`; ImportError or AttributeError with
  one line saying what failed and how to name it instead."""
  where, _, attribute = spec.rpartition(":")
  if not where or not attribute:
    raise ImportError("name it as module:attribute or path/to/file.py:attribute")
  try:
    module = _load_file(where) if where.endswith(".py") else importlib.import_module(where)
  except Exception as e:  # noqa: BLE001 (the user's module failed to import: say so in one line)
    raise ImportError(
      f"cannot import {where} ({type(e).__name__}: {_first_line(e)}); give an importable module (on PYTHONPATH) "
      "or a path to a .py file"
    ) from None
  if not hasattr(module, attribute):
    raise AttributeError(f"{where} has no attribute {attribute!r}")
  return getattr(module, attribute)


def _first_line(error: BaseException) -> str:
  return str(error).strip().splitlines()[0][:200] if str(error).strip() else ""


def _load_file(path: str):
  """Imports a .py file once per process (a second lookup returns the same module and objects)."""
  resolved = Path(path).resolve()
  if not resolved.is_file():
    raise FileNotFoundError(f"no such file {path}")
  name = f"_kiln_objective_{abs(hash(str(resolved)))}"
  if name not in sys.modules:
    spec = importlib.util.spec_from_file_location(name, resolved)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
      spec.loader.exec_module(module)
    except BaseException:
      del sys.modules[name]
      raise
  return sys.modules[name]
