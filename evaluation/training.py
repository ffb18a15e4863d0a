"""Downstream tasks during training: `train.eval_tasks` every `train.eval_tasks_every` steps (and at the last
step), on the live parameters (no checkpoint read), as `eval/<task>/<metric>` figures of the eval line.

The decoder is built once on the training mesh and rules (so its compiled calls are reused at every
evaluation); with LoRA the adapters are merged into the frozen base for the forward, as generation does.
Multi-host: process 0 runs the harness, the others follow its device calls (evaluation/harness.py).
"""

import jax

from evaluation.harness import KilnLM
from evaluation.tasks import TaskError, flat_metrics, resolve_tasks, run_tasks, split_tasks
from settings import ConfigError


class TrainingTasks:
  """The run's `train.eval_tasks`; `due(step)` says when, `__call__(params, frozen)` gives the figures."""

  def __init__(self, train_cfg, exp, tokenizer, chat_template: str = ""):
    self.tasks = split_tasks(train_cfg.eval_tasks)
    self.every, self.steps, self.limit = train_cfg.eval_tasks_every, train_cfg.steps, train_cfg.eval_tasks_limit
    self.exp, self.tokenizer, self.chat_template = exp, tokenizer, chat_template
    self._lm: KilnLM | None = None
    try:
      resolve_tasks(self.tasks)  # an unknown task or a bad YAML stops the run before its first step
    except TaskError as e:
      raise ConfigError(f"config.train.eval_tasks: {e}") from None

  def due(self, step: int) -> bool:
    return bool(self.tasks) and step > 0 and (step == self.steps or (self.every > 0 and step % self.every == 0))

  def __call__(self, params, frozen: dict) -> dict[str, float]:
    from generation.decoding import Decoder
    from model import lora

    exp = self.exp
    if self._lm is None:
      decoder = Decoder(exp.model_cfg, self.tokenizer.vocab_size, exp.mesh, exp.rules)
      self._lm = KilnLM(decoder, None, self.tokenizer, batch_size=8, chat_template=self.chat_template or None)
    self._lm.params = lora.combine(params, frozen["base"]) if exp.model_cfg.lora_rank > 0 else params
    if jax.process_index() != 0:
      self._lm.follow()
      return {}
    try:
      results = run_tasks(self._lm, self.tasks, limit=self.limit or None)
    finally:
      self._lm.release()
    return flat_metrics(results)
