"""GRPO throughput: rollout tokens/s, update tokens/s and the share of a step spent generating, for a model config.

  python scripts/benchmark_grpo.py --config configs/tiny.py [--steps 6] [--prompts 4] [--group 8] [--max_new_tokens 64]

Runs `--steps` GRPO steps of the config's model from random weights in a temporary run directory, on prompts of
random words, with the `overlong` reward (random weights rarely stop, so every completion has `--max_new_tokens`
tokens and the figures compare across configs). The tokenizer is a word-level tokenizer.json of the config's
`data.vocab_size` written on the spot: the model has its real vocabulary and nothing waits for tokenizer training.
The first two steps (compilation) are left out; the last line is one JSON object with the means over the rest.
"""

import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from trainer import cpu_host  # noqa: E402

cpu_host.prepare_heap()  # as train.py: glibc's heap settings before JAX starts any thread

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """The command line's flags, defined only when this file runs as a script: accelerator_check.py imports
  `measure_grpo` beside other scripts that define flags of the same names."""
  flags.DEFINE_string("config", "configs/tiny.py", "A model config file.")
  flags.DEFINE_integer("steps", 6, "GRPO steps to run; the first two are not measured.")
  flags.DEFINE_integer("prompts", 4, "Prompts per rollout.")
  flags.DEFINE_integer("group", 8, "Completions per prompt.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens per completion.")
  flags.DEFINE_integer("prompt_words", 32, "Words per prompt.")
  flags.DEFINE_string("compute_dtype", "float32", "float32 | bfloat16")


def measure_grpo(cfg, *, prompts: int, group: int, max_new_tokens: int, prompt_words: int, steps: int) -> dict:
  """Runs `steps` (at least 3) GRPO steps of `cfg`'s model from random weights in a temporary run directory;
  the means of the rollout and update figures over the steps after the first two."""
  from settings.validate import validate
  from trainer.loop import train
  from trainer.metrics import read_metrics

  steps = max(steps, 3)
  with tempfile.TemporaryDirectory() as root:
    words = "the of a to in is it that for on with as was by at be this from".split()
    tokenizer = Path(root) / "tokenizer.json"
    tokenizer.write_text(json.dumps(_word_level_tokenizer(words, cfg.data.vocab_size)))
    rng = random.Random(0)
    prompt_file = Path(root) / "prompts.jsonl"
    with prompt_file.open("w") as f:
      for _ in range(64):
        f.write(json.dumps({"prompt": " ".join(rng.choice(words) for _ in range(prompt_words))}) + "\n")
    overrides = {
      ("train", "objective"): "grpo", ("data", "files"): str(prompt_file), ("data", "chat_template"): "{content}",
      ("data", "tokenizer"): str(tokenizer), ("data", "cache_dir"): str(Path(root) / "cache"),
      ("grpo", "prompts_per_step"): prompts, ("grpo", "group_size"): group, ("grpo", "max_new_tokens"): max_new_tokens,
      ("grpo", "rewards"): "overlong", ("train", "global_batch_size"): prompts * group, ("train", "steps"): steps,
      ("train", "log_every"): 1, ("train", "eval_every"): steps, ("train", "grad_accum"): 1,
      ("optim", "warmup_steps"): 1, ("checkpoint", "every_steps"): steps, ("checkpoint", "max_to_keep"): 1,
      ("checkpoint", "async_save"): False, ("data", "seq_len"): prompt_words * 4 + max_new_tokens,
    }  # fmt: skip
    for (group_name, key), value in overrides.items():
      cfg[group_name][key] = value
    validate(cfg)
    train(cfg, str(Path(root) / "run"))
    records = [r for r in read_metrics(str(Path(root) / "run")) if "loss" in r and r["step"] > 2]
  mean = lambda name: sum(r[name] for r in records) / len(records)  # noqa: E731
  return {
    "compute_dtype": cfg.model.compute_dtype,
    "rows": prompts * group,
    "max_new_tokens": max_new_tokens,
    "rollout_tokens_per_sec": mean("rollout_tokens_per_sec"),
    "update_tokens_per_sec": mean("update_tokens_per_sec"),
    "rollout_share": mean("rollout_share"),
    "completion_len_mean": mean("completion_len_mean"),
    "steps_measured": len(records),
  }


def _word_level_tokenizer(words: list[str], vocab_size: int) -> dict:
  """A Hugging Face tokenizer.json: <pad> <unk> <s> </s>, `words`, then filler words up to `vocab_size` ids."""
  vocab = ["<pad>", "<unk>", "<s>", "</s>", *words]
  vocab += [f"w{i}" for i in range(vocab_size - len(vocab))]
  specials = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
               "special": True} for i, t in enumerate(vocab[:4])]  # fmt: skip
  return {
    "version": "1.0", "truncation": None, "padding": None, "added_tokens": specials, "normalizer": None,
    "pre_tokenizer": {"type": "Whitespace"}, "post_processor": None, "decoder": None,
    "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(vocab)}, "unk_token": "<unk>"},
  }  # fmt: skip


def main(argv):
  del argv
  from settings.load import load_config_file

  cpu_host.prepare()
  cfg = load_config_file(FLAGS.config)
  cfg.model.compute_dtype = FLAGS.compute_dtype
  result = measure_grpo(cfg, prompts=FLAGS.prompts, group=FLAGS.group, max_new_tokens=FLAGS.max_new_tokens,
                        prompt_words=FLAGS.prompt_words, steps=FLAGS.steps)  # fmt: skip
  print(json.dumps({"config": FLAGS.config, **result}))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
