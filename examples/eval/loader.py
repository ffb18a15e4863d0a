"""Loads the example tasks' JSONL files from beside this file, so the tasks run offline from any directory
(lm-eval calls `custom_dataset` with the task's `dataset_kwargs`)."""

import json
import os

import datasets


def jsonl_test_split(data_file: str, **kwargs) -> datasets.DatasetDict:
  """A DatasetDict whose `test` split is the JSONL file `data_file` (relative to this directory)."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), data_file)
  with open(path, encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()]
  return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})
