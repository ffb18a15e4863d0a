"""Running lm-eval tasks on a KilnLM: resolving task names and YAML files, flattening the results into
`eval/<task>/<metric>` figures, writing results.json and results.md.

A task is a name lm-eval knows (its own catalogue, or a YAML under `include_path`) or a path to a task YAML.
When every task is a path or found under `include_path`, lm-eval's own catalogue (thousands of YAML files) is
not indexed at all.
"""

import difflib
import json
import logging
import math
import os

_log = logging.getLogger(__name__)


class TaskError(ValueError):
  """An unknown task, an unreadable task file, or a task whose data cannot be reached: one line."""


def split_tasks(tasks: str | list[str]) -> list[str]:
  items = tasks.split(",") if isinstance(tasks, str) else [t for item in tasks for t in item.split(",")]
  return [t.strip() for t in items if t.strip()]


def _task_manager(names: list[str], include_path: str | None):
  from lm_eval.tasks import TaskManager

  if include_path and not os.path.isdir(include_path):
    raise TaskError(f"--include_path={include_path} is not a directory; give a directory of task YAML files")
  local = TaskManager(include_path=include_path, include_defaults=False)
  if all(name in local.all_tasks for name in names):
    return local
  return TaskManager(include_path=include_path)


def resolve_tasks(tasks: str | list[str], include_path: str | None = None):
  """(lm-eval task entries: names or loaded YAML configs, the TaskManager that knows them)."""
  from lm_eval.tasks._yaml_loader import load_yaml

  items = split_tasks(tasks)
  if not items:
    raise TaskError("no task given; pass --tasks NAME[,NAME...] (lm-eval task names or task YAML files)")
  entries, names = [], []
  for item in items:
    if item.endswith((".yaml", ".yml")):
      if not os.path.isfile(item):
        raise TaskError(f"task file {item} does not exist; give the path of an lm-eval task YAML")
      try:
        entries.append(load_yaml(os.path.abspath(item), resolve_func=True))
      except Exception as e:  # noqa: BLE001 (a YAML or !function error, reported in one line)
        raise TaskError(f"task file {item}: cannot load it ({type(e).__name__}: {e}); fix the YAML") from None
    else:
      entries.append(item)
      names.append(item)
  manager = _task_manager(names, include_path)
  for name in names:
    if name not in manager.all_tasks:
      close = difflib.get_close_matches(name, manager.all_tasks, n=3)
      hint = f"; did you mean {', '.join(close)}?" if close else ""
      raise TaskError(f"unknown task {name!r}{hint} (lm-eval task names, a task YAML path, or --include_path DIR)")
  return entries, manager


def run_tasks(
  lm,
  tasks: str | list[str],
  *,
  include_path: str | None = None,
  num_fewshot: int | None = None,
  limit: float | None = None,
  apply_chat_template: bool = False,
  bootstrap_iters: int = 0,
  log_samples: bool = False,
) -> dict:
  """lm-eval's `simple_evaluate` of `tasks` with `lm` as the model; returns its results dict."""
  from lm_eval import simple_evaluate

  entries, manager = resolve_tasks(tasks, include_path)
  try:
    return simple_evaluate(
      model=lm,
      tasks=entries,
      num_fewshot=num_fewshot,
      limit=limit,
      task_manager=manager,
      apply_chat_template=apply_chat_template,
      bootstrap_iters=bootstrap_iters,
      log_samples=log_samples,
      verbosity="WARNING",
    )
  except Exception as e:  # noqa: BLE001 (data that cannot be fetched: one line naming the task's need)
    if _is_network_error(e):
      raise TaskError(
        f"a task's data set must be downloaded and the network cannot be reached ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); run with network access once to fill the Hugging Face "
        "cache (HF_DATASETS_CACHE), or use a local task (examples/eval/)"
      ) from None
    raise


def _is_network_error(error: BaseException) -> bool:
  words = ("connection", "offline", "network", "timed out", "couldn't reach", "max retries", "name or service")
  seen: BaseException | None = error
  while seen is not None:
    text = f"{type(seen).__name__} {seen}".lower()
    if isinstance(seen, (ConnectionError, TimeoutError)) or any(w in text for w in words):
      return True
    seen = seen.__cause__ or seen.__context__
  return False


def flat_metrics(results: dict) -> dict[str, float]:
  """{"eval/<task>/<metric>": value} of every task's numeric metrics (lm-eval's "metric,filter" keys: the
  default filter "none" dropped, others kept as "metric_filter"; standard errors, aliases, sample counts left
  out)."""
  flat = {}
  for task, metrics in results.get("results", {}).items():
    for key, value in metrics.items():
      if "_stderr" in key or key == "sample_len" or not isinstance(value, (int, float)) or isinstance(value, bool):
        continue
      metric, _, filt = key.partition(",")
      name = metric if filt in ("", "none") else f"{metric}_{filt}"
      if math.isfinite(value):
        flat[f"eval/{task}/{name}"] = float(value)
  return flat


def write_results(directory: str, results: dict) -> dict[str, str]:
  """results.json (lm-eval's results, config and versions) and results.md (its Markdown table) in `directory`;
  returns their paths."""
  from lm_eval.utils import make_table

  from storage import as_path

  out = as_path(directory)
  out.mkdir(parents=True, exist_ok=True)
  names = ("results", "groups", "configs", "versions", "n-shot", "higher_is_better", "config")
  keep = {k: results[k] for k in names if results.get(k) is not None}
  (out / "results.json").write_text(json.dumps(keep, indent=2, default=str))
  table = make_table(results)
  if results.get("groups"):
    table += "\n" + make_table(results, "groups")
  (out / "results.md").write_text(table)
  return {"json": str(out / "results.json"), "markdown": str(out / "results.md")}
