"""kiln as an lm-evaluation-harness model against lm-eval's own Hugging Face model (HFLM) on the same weights:
a small random Llama with a byte-level BPE tokenizer (BOS added by its post-processor, as Llama's) is saved,
imported into a kiln run, and both models answer the example tasks (examples/eval/): per-request
log-likelihoods (multiple choice), rolling log-likelihoods (perplexity) and greedy generations with stop strings
must agree; a sharded layout must give the one-device answers."""

import importlib.util
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from evaluation.packing import pack_rows

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join(REPO, "examples", "eval")
SEQ_LEN = 128


@pytest.mark.fast
def test_pack_rows_holds_every_request_once_and_fills_rows_nearly_full():
  rng = np.random.default_rng(0)
  lengths = rng.integers(1, 12, 200).tolist()
  rows = pack_rows(lengths, 16)
  assert sorted(i for row in rows for i in row) == list(range(200))  # every request once
  assert all(sum(lengths[i] for i in row) <= 16 for row in rows)
  # First-fit decreasing uses at most 11/9 OPT + 6/9 rows, and OPT >= ceil(total / 16).
  assert len(rows) <= 11 / 9 * -(-sum(lengths) // 16) + 6 / 9
  assert pack_rows([16, 3, 13, 5], 16) == [[0], [2, 1], [3]]  # longest first, each into the first row with room


@pytest.mark.fast
def test_malformed_eval_files_are_one_line_errors():
  import ml_collections

  from evaluation.heldout import named_eval_batches, parse_eval_files
  from settings import ConfigError

  assert parse_eval_files("wiki:/d/*.txt, code:gs://b/*.py") == [("wiki", "/d/*.txt"), ("code", "gs://b/*.py")]
  for bad, message in (("/d/*.txt", "is not NAME:GLOB"), ("gs://b/*.py", "is not NAME:GLOB"), ("a:x,a:y", "twice")):
    with pytest.raises(ConfigError, match=message):
      parse_eval_files(bad)
  mixed = ml_collections.ConfigDict({"files": "0.7:/d/web/*.txt,0.3:/d/code/*.py", "eval_files": "code:/e/*.py"})
  with pytest.raises(ConfigError, match="'code', a source of the data.files mixture"):
    named_eval_batches(mixed, None, global_batch_size=1, num_batches=1, sharding=None)


# The newest stack has no torch (requirements-next.txt says why): the tests against lm-eval's HF model skip there.
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed")
needs_torch = pytest.mark.skipif(
  importlib.util.find_spec("torch") is None or importlib.util.find_spec("lm_eval") is None,
  reason="the reference (lm-eval's HF model) needs torch, transformers and lm-eval",
)


@pytest.mark.fast
@needs_lm_eval
def test_apply_chat_template_renders_the_runs_turn_format():
  """--apply_chat_template: lm-eval's chat history in the run's data.chat_template, then the assistant turn's head
  (the text the model continues), as GRPO's prompts are rendered."""
  from evaluation.harness import KilnLM

  history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
  lm = types.SimpleNamespace(_chat_format="chatml")
  want = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
  assert KilnLM.apply_chat_template(lm, history) == want + "<|im_start|>assistant\n"
  assert KilnLM.apply_chat_template(lm, history, add_generation_prompt=False) == want
  with pytest.raises(ValueError, match="needs a chat template"):
    KilnLM.apply_chat_template(types.SimpleNamespace(_chat_format=None), history)


@pytest.mark.fast
@needs_lm_eval
def test_bad_tasks_are_one_line_errors(tmp_path):
  from evaluation.tasks import TaskError, resolve_tasks

  assert resolve_tasks("kiln_mc,kiln_ppl", TASKS)[0] == ["kiln_mc", "kiln_ppl"]  # found without lm-eval's catalogue
  with pytest.raises(TaskError, match=r"task file .*nope.yaml does not exist"):
    resolve_tasks(str(tmp_path / "nope.yaml"))
  with pytest.raises(TaskError, match=r"--include_path=.* is not a directory"):
    resolve_tasks("kiln_mc", str(tmp_path / "missing"))


@needs_lm_eval
def test_tasks_during_training_equal_the_script_on_the_saved_checkpoint(tmp_path, mini_run_cache):
  """train.eval_tasks scores the live parameters; scripts/evaluate.py on the checkpoint of the same step (the
  parameters read back from disk) must give the same figures, and write results.json, results.md and a JSON line.
  A named held-out set (data.eval_files) must score as the corpus's own held-out split scores the same files."""
  import data
  from data.tokenizer import Tokenizer
  from tests.helpers import mini_run_config
  from trainer.loop import evaluate, train

  tasks = ",".join(os.path.join(TASKS, f"{t}.yaml") for t in ("kiln_ppl", "kiln_mc"))
  overrides = {"mesh.data": -1, "train.global_batch_size": 8, "train.steps": 4}
  overrides.update({"train.eval_tasks": tasks, "train.eval_tasks_every": 2, "train.eval_tasks_limit": 4})
  overrides["data.eval_files"] = f"docs:{TASKS}/ppl.jsonl"
  workdir = tmp_path / "run"
  cfg = mini_run_config(mini_run_cache, **overrides)
  result = train(cfg, str(workdir))
  records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  # The reference: ppl.jsonl as a corpus whose held-out split is every document, scored by the loop's evaluate.
  corpus_cfg = cfg.data.copy_and_resolve_references()
  corpus_cfg.files, corpus_cfg.eval_fraction = f"{TASKS}/ppl.jsonl", 1.0
  exp = result["experiment"]
  batches = data.make_eval_batches(
    corpus_cfg, Tokenizer(str(workdir / "tokenizer.model")), global_batch_size=8, num_batches=1,
    sharding=exp.batch_sharding,
  )  # fmt: skip
  want = evaluate(exp, result["state"].params, batches, {})
  assert records[-1]["eval_loss/docs"] == pytest.approx(want["eval_loss"], rel=1e-6)
  assert records[-1]["eval_ppl/docs"] == pytest.approx(want["eval_ppl"], rel=1e-6)
  task_lines = {r["step"]: r for r in records if "eval/kiln_ppl/bits_per_byte" in r}
  assert sorted(task_lines) == [2, 4] and "eval_loss" in task_lines[4]  # one eval line per step
  out = subprocess.run(
    [sys.executable, "scripts/evaluate.py", f"--workdir={workdir}", f"--tasks={tasks}", "--limit=4",
     "--bootstrap_iters=0", "--batch_size=2"],
    cwd=REPO, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert out.returncode == 0, out.stderr[-2000:]
  line = json.loads(out.stdout.strip().splitlines()[-1])
  assert line["step"] == "4" and line["out"] == str(workdir / "eval" / "4")
  live = {k: v for k, v in task_lines[4].items() if k.startswith("eval/")}
  assert live.keys() == line["metrics"].keys()
  np.testing.assert_allclose([line["metrics"][k] for k in live], list(live.values()), rtol=1e-5)
  assert json.loads((workdir / "eval" / "4" / "results.json").read_text())["results"].keys() == {"kiln_ppl", "kiln_mc"}
  assert "bits_per_byte" in (workdir / "eval" / "4" / "results.md").read_text()


# The reference below is lm-eval's Hugging Face model: torch and transformers (the pinned stack only).


def _write_tokenizer(directory) -> int:
  """A byte-level BPE with <pad>, <s>, </s> whose post-processor puts <s> first; returns its vocabulary size."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, processors, trainers

  lines = [line for name in ("ppl.jsonl", "mc.jsonl") for line in open(os.path.join(TASKS, name))]
  texts = [json.loads(line).get("text", line) for line in lines]
  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=384, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  hf.train_from_iterator(texts * 4, trainer=trainer)
  hf.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", hf.token_to_id("<s>"))])
  directory.mkdir(parents=True, exist_ok=True)
  hf.save(str(directory / "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>"}
  (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return hf.get_vocab_size(with_added_tokens=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  """(HFLM, kiln run directory) for one small random Llama."""
  import torch
  import transformers
  from lm_eval.models.huggingface import HFLM

  from hf.convert import import_hf

  root = tmp_path_factory.mktemp("eval")
  hf_dir, run = root / "hf", str(root / "run")
  vocab = _write_tokenizer(hf_dir)
  torch.manual_seed(0)
  config = transformers.LlamaConfig(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    vocab_size=vocab, max_position_embeddings=SEQ_LEN, bos_token_id=1, eos_token_id=2, pad_token_id=0,
  )  # fmt: skip
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name:
        p.add_(0.5 * torch.randn_like(p))
      elif "embed" in name or "lm_head" in name:
        p.mul_(10.0)  # a confident model: greedy choices far from ties, generations that end on their own
  model.eval()
  model.save_pretrained(str(hf_dir))
  import_hf(str(hf_dir), run)
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(hf_dir))
  hflm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, max_length=SEQ_LEN, device="cpu")
  return hflm, run


def _kiln_lm(run, mesh=None, **kwargs):
  from evaluation.harness import KilnLM
  from generation.run import load_run

  loaded = load_run(run, mesh=mesh)
  return KilnLM(loaded.decoder, loaded.params, loaded.tokenizer, **kwargs)


def _responses(lm, task: str) -> list:
  """Every request's response, in the task's order, from lm-eval's own run of the task."""
  from evaluation.tasks import run_tasks

  results = run_tasks(lm, [os.path.join(TASKS, f"{task}.yaml")], log_samples=True)
  return [resp for sample in results["samples"][task] for resp in sample["resps"]]


@pytest.fixture(scope="module")
def hf_answers(models):
  hflm, _ = models
  return {task: _responses(hflm, task) for task in ("kiln_mc", "kiln_ppl", "kiln_gen")}


@needs_torch
def test_loglikelihoods_rolling_and_generations_equal_lm_evals_hf_model(models, hf_answers):
  _, run = models
  lm = _kiln_lm(run, batch_size=4)
  mc = _responses(lm, "kiln_mc")
  assert len(mc) == 32
  np.testing.assert_allclose([r[0][0] for r in mc], [r[0][0] for r in hf_answers["kiln_mc"]], atol=1e-4, rtol=0)
  assert [r[0][1] for r in mc] == [r[0][1] for r in hf_answers["kiln_mc"]]
  assert lm.device_calls <= 4  # about 3 requests per row of 128 tokens; one request per row would take 8 calls
  ppl = _responses(lm, "kiln_ppl")
  np.testing.assert_allclose([r[0] for r in ppl], [r[0] for r in hf_answers["kiln_ppl"]], atol=1e-4, rtol=0)
  generations = _responses(lm, "kiln_gen")
  assert generations == hf_answers["kiln_gen"]
  assert len({len(g[0]) for g in generations}) > 1  # some rows end at a stop string, others at max_gen_toks


@needs_torch
def test_a_sharded_layout_gives_the_one_device_answers(models, hf_answers):
  import jax

  from configs.base import base_config
  from evaluation.tasks import run_tasks
  from parallel.mesh import make_mesh

  _, run = models
  mesh_cfg = base_config().mesh
  mesh_cfg.update(data=2, fsdp=2, tensor=2)
  lm = _kiln_lm(run, mesh=make_mesh(mesh_cfg, jax.devices()[:8]), batch_size=3, pack=False)
  assert lm.rows_per_call == 4  # a whole number of batch shards
  mc = _responses(lm, "kiln_mc")
  np.testing.assert_allclose([r[0][0] for r in mc], [r[0][0] for r in hf_answers["kiln_mc"]], atol=1e-4, rtol=0)
  results = run_tasks(lm, [os.path.join(TASKS, "kiln_gen.yaml")], log_samples=True)
  assert [s["resps"] for s in results["samples"]["kiln_gen"]] == [[r] for r in hf_answers["kiln_gen"]]
