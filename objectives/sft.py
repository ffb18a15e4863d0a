"""`sft`: supervised fine-tuning on chat JSONL (data/sft.py), next-token loss on assistant tokens only.

The loss is the next-token loss: data/sft.py puts weight 0 on every target that is not an assistant token, so
the loss mask does the rest. The tokenizer is that of the run it fine-tunes (checkpoint.init_from) when
data.tokenizer is empty; chat JSONL has no text field to train one on.
"""

from data.chat import template_problem
from data.sft import load_conversations
from objectives import Objective, Setup, TrainedModel
from objectives.losses import token_count


def chat_data_problems(cfg) -> list[str]:
  """What sft and dpo need of config.data: a usable chat template and JSONL files to read."""
  problems = [p for p in (template_problem(cfg.data.chat_template),) if p]
  if not cfg.data.files:
    problems.append(
      f"config.train.objective={cfg.train.objective} reads chat JSONL from config.data.files, which is empty; "
      f"e.g. --config.data.files=examples/{cfg.train.objective}.jsonl (formats: docs/fine-tuning.md)"
    )
  return problems


def _setup(model: TrainedModel) -> Setup:
  del model
  return Setup(loss_fn=None, count_fn=token_count)


OBJECTIVE = Objective(
  name="sft",
  setup=_setup,
  load_documents=load_conversations,
  config_problems=chat_data_problems,
  tokenizer_runs=lambda cfg: [cfg.checkpoint.init_from],
  text_corpus=False,
)
