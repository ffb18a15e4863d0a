"""Tests of the data pipeline against independent references: direct tokenization, a naive packer, set algebra.

Every test writes its caches under a tmp dir. The shared corpus is the standard library's email package
(29 files, ~380 KB) with a 400-piece tokenizer, trained once per module.
"""

import glob
import json
import logging
import math
import os
import sysconfig

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import data
from configs.base import base_config
from data import token_cache
from data.packing import PackedRows, to_model_inputs
from data.sources import Corpus

STDLIB = sysconfig.get_paths()["stdlib"]
EMAIL_GLOB = os.path.join(STDLIB, "email", "**", "*.py")
VOCAB_SIZE = 400
FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


def make_data_cfg(cache_dir, **overrides):
  cfg = base_config().data
  cfg.cache_dir = str(cache_dir)
  cfg.vocab_size = VOCAB_SIZE
  cfg.tokenizer_sample_bytes = 200_000
  cfg.num_workers = 0  # in-process tokenization keeps tests fast; one test covers worker processes
  cfg.update(overrides)
  return cfg


@pytest.fixture(scope="module")
def module_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def tokenizer(module_dir):
  return data.load_tokenizer(make_data_cfg(module_dir / "cache", files=EMAIL_GLOB), str(module_dir / "run"))


def write_documents(directory, texts):
  """One .txt file per text, named so that sorted order is list order."""
  directory.mkdir(parents=True, exist_ok=True)
  for i, text in enumerate(texts):
    (directory / f"doc_{i:03d}.txt").write_text(text)
  return str(directory / "*.txt")


def numbered_documents(count):
  """Distinct documents of varied length, some longer than a 16-token row."""
  return [f"def f{i}():\n" + "".join(f"    x{j} = {i} * {j}\n" for j in range(i % 5)) for i in range(count)]


def take_rows(iterator, num_rows):
  """The first num_rows packed rows (L + 1 tokens: inputs plus the last target) of a batch iterator."""
  rows = []
  while len(rows) < num_rows:
    batch = next(iterator)
    rows.extend(np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1))
  return np.stack(rows[:num_rows])


def documents_in_stream(tokens, tokenizer):
  """Texts of the complete [BOS ... EOS] spans in a token stream (padding is 0 and skipped)."""
  texts, current = [], None
  for token in tokens[tokens != tokenizer.pad_id]:
    if token == tokenizer.bos_id:
      current = []
    elif token == tokenizer.eos_id:
      if current is not None:
        texts.append(tokenizer.decode(current))
      current = None
    elif current is not None:
      current.append(token)
  return texts


def naive_rows(documents, row_len, bos, eos):
  """Reference packer: the stream [BOS doc EOS]... cut into rows; (tokens, segment ids, positions) per row."""
  stream = [(token, d) for d, ids in enumerate(documents) for token in [bos, *ids, eos]]
  rows = []
  for start in range(0, len(stream), row_len):
    chunk = stream[start : start + row_len]
    tokens, segments, positions = [0] * row_len, [0] * row_len, [0] * row_len
    segment, position = 0, 0
    for i, (token, d) in enumerate(chunk):
      if i == 0 or d != chunk[i - 1][1]:
        segment, position = segment + 1, 0
      tokens[i], segments[i], positions[i] = token, segment, position
      position += 1
    rows.append((tokens, segments, positions))
  return rows


def naive_features(rows):
  """Reference model inputs from naive rows, with loss_mask spelled out position by position."""
  out = {name: [] for name in FIELDS}
  for tokens, segments, positions in rows:
    out["inputs"].append(tokens[:-1])
    out["targets"].append(tokens[1:])
    out["segment_ids"].append(segments[:-1])
    out["positions"].append(positions[:-1])
    out["loss_mask"].append(
      [1.0 if segments[i + 1] != 0 and segments[i + 1] == segments[i] else 0.0 for i in range(len(tokens) - 1)]
    )
  return {name: np.array(values) for name, values in out.items()}


# Default corpus and tokenizer


def test_default_corpus_is_the_standard_library_source():
  corpus = Corpus(make_data_cfg("unused"))
  keys = [document.key for document in corpus.documents()]
  assert len(keys) > 1000
  assert keys == sorted(keys)
  assert all(key.endswith(".py") and not key.startswith("/") for key in keys)
  assert not any("site-packages" in key or "__pycache__" in key for key in keys)
  assert "json/decoder.py" in keys


def test_tokenizer_ids_cache_and_run_copy(tokenizer, module_dir, monkeypatch):
  assert (tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2, 3)
  assert tokenizer.vocab_size == VOCAB_SIZE
  assert tokenizer.model_path == str(module_dir / "run" / "tokenizer.model")
  # A second run with the same corpus and settings reuses the cached model: training would fail here.
  monkeypatch.setattr(data.tokenizer, "_train", lambda *args: pytest.fail("retrained a cached tokenizer"))
  again = data.load_tokenizer(make_data_cfg(module_dir / "cache", files=EMAIL_GLOB), str(module_dir / "run2"))
  with open(again.model_path, "rb") as a, open(tokenizer.model_path, "rb") as b:
    assert a.read() == b.read()


@pytest.mark.parametrize("name", ["textwrap.py", "argparse.py", "json/decoder.py", "email/utils.py"])
def test_decode_inverts_encode_on_source_files(tokenizer, name):
  with open(os.path.join(STDLIB, name), encoding="utf-8") as f:
    text = f.read()
  ids = tokenizer.encode(text)
  assert tokenizer.unk_id not in ids  # byte fallback: nothing is unknown
  assert tokenizer.decode(ids) == text


@pytest.mark.parametrize(
  "text", ["", " ", "  lead", "trail  \n", "\n\n\n", "\t\tx = 1\r\n\r\n", "if x:\n\n        pass\n", "é中文😀\x00"]
)
def test_decode_inverts_encode_on_whitespace_and_rare_characters(tokenizer, text):
  assert tokenizer.decode(tokenizer.encode(text)) == text


# Packing


@pytest.mark.parametrize("lengths", [[3, 9, 1, 20, 2], [7, 7, 6], [1]])
def test_packed_rows_match_a_naive_packer(lengths):
  rng = np.random.default_rng(0)
  documents = [rng.integers(4, 100, size=n) for n in lengths]
  flat = np.concatenate(documents)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
  row_len = 8
  rows = PackedRows(
    flat, starts, np.array(lengths), row_len=row_len, bos_id=2, eos_id=3, pad_id=0, seed=0, shuffle=False
  )
  expected = naive_rows(documents, row_len, bos=2, eos=3)
  assert rows.rows_per_epoch == len(expected)
  got = [rows[i] for i in range(2 * len(expected))]  # two epochs: the unshuffled second one repeats the first
  for i, row in enumerate(got):
    tokens, segments, positions = expected[i % len(expected)]
    np.testing.assert_array_equal(row["tokens"], tokens)
    np.testing.assert_array_equal(row["segment_ids"], segments)
    np.testing.assert_array_equal(row["positions"], positions)
  stacked = {k: np.stack([row[k] for row in got[: len(expected)]]) for k in got[0]}
  features = to_model_inputs(stacked)
  for name, value in naive_features(expected).items():
    np.testing.assert_array_equal(features[name], value, err_msg=name)


def test_batches_match_a_naive_packer_at_document_boundaries(tokenizer, tmp_path):
  texts = numbered_documents(12)
  cfg = make_data_cfg(tmp_path / "cache", files=write_documents(tmp_path / "docs", texts), seq_len=16)
  cfg.eval_fraction, cfg.shuffle = 0.0, False
  expected = naive_features(naive_rows([tokenizer.encode(t) for t in texts], 17, tokenizer.bos_id, tokenizer.eos_id))
  num_rows = len(expected["inputs"])
  assert any(len(tokenizer.encode(t)) + 2 > 17 for t in texts), "some document must span rows"
  iterator = data.make_train_iterator(cfg, tokenizer, batch_size=1, seed=0)
  batches = [next(iterator) for _ in range(num_rows)]
  for name in FIELDS:
    got = np.concatenate([batch[name] for batch in batches])
    assert got.dtype == (np.float32 if name == "loss_mask" else np.int32)
    np.testing.assert_array_equal(got, expected[name], err_msg=name)


def test_an_epoch_holds_every_training_token_once(tokenizer, tmp_path):
  cfg = make_data_cfg(tmp_path / "cache", files=EMAIL_GLOB, seq_len=64, eval_fraction=0.0)
  reference = []
  for path in sorted(glob.glob(EMAIL_GLOB, recursive=True)):
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if text:
      reference += [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
  num_rows = math.ceil(len(reference) / 65)
  iterator = data.make_train_iterator(cfg, tokenizer, batch_size=8, seed=3)
  rows = take_rows(iterator, 2 * num_rows)
  expected_counts = np.bincount(reference, minlength=VOCAB_SIZE)
  for epoch in (rows[:num_rows], rows[num_rows:]):
    np.testing.assert_array_equal(np.bincount(epoch[epoch != 0], minlength=VOCAB_SIZE), expected_counts)
  assert not np.array_equal(rows[:num_rows], rows[num_rows:]), "each epoch is shuffled anew"
  # Two seeds, two orders.
  other = take_rows(data.make_train_iterator(cfg, tokenizer, batch_size=8, seed=4), num_rows)
  assert not np.array_equal(other, rows[:num_rows])


def test_process_shards_are_disjoint_and_cover_the_corpus(tokenizer, tmp_path):
  texts = numbered_documents(15)
  cfg = make_data_cfg(tmp_path / "cache", files=write_documents(tmp_path / "docs", texts), seq_len=16)
  cfg.eval_fraction, cfg.shuffle = 0.0, False
  whole_stream = sum(len(tokenizer.encode(t)) + 2 for t in texts)
  shards = []
  for process_index in range(2):
    iterator = data.make_train_iterator(
      cfg, tokenizer, batch_size=2, seed=0, process_index=process_index, process_count=2
    )
    # Two epochs of the whole corpus are at least two of a shard: every document appears whole at least once.
    rows = take_rows(iterator, 2 * math.ceil(whole_stream / 17))
    shards.append(set(documents_in_stream(rows.ravel(), tokenizer)))
  assert shards[0] and shards[1]
  assert not shards[0] & shards[1]
  assert shards[0] | shards[1] == set(texts)


def test_one_process_serving_two_shards_sees_the_batches_of_two_processes(tokenizer, tmp_path):
  cfg = make_data_cfg(tmp_path / "cache", files=EMAIL_GLOB, seq_len=32)
  two = [
    data.make_train_iterator(cfg, tokenizer, batch_size=2, seed=3, process_index=p, process_count=2) for p in range(2)
  ]
  cfg.shards = 2
  one = data.make_train_iterator(cfg, tokenizer, batch_size=4, seed=3)
  for _ in range(3):
    parts = [next(iterator) for iterator in two]
    whole = next(one)
    for name in FIELDS:
      np.testing.assert_array_equal(whole[name], np.concatenate([part[name] for part in parts]))
  state = one.get_state()
  expected = next(one)
  restored = data.make_train_iterator(cfg, tokenizer, batch_size=4, seed=3)
  restored.set_state(state)
  np.testing.assert_array_equal(next(restored)["inputs"], expected["inputs"])


# Held-out split


def test_no_held_out_document_reaches_training(tokenizer, tmp_path):
  texts = numbered_documents(60)
  cfg = make_data_cfg(tmp_path / "cache", files=write_documents(tmp_path / "docs", texts), seq_len=16)
  cfg.eval_fraction, cfg.shuffle = 0.25, False
  eval_batches = data.make_eval_batches(cfg, tokenizer, batch_size=4, num_batches=1000)
  eval_rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in eval_batches])
  held_out = documents_in_stream(eval_rows.ravel(), tokenizer)
  rows = take_rows(data.make_train_iterator(cfg, tokenizer, batch_size=4, seed=0), 2 * len(texts) * 4)
  trained = set(documents_in_stream(rows.ravel(), tokenizer))
  assert 0 < len(held_out) < len(texts) / 2
  assert not trained & set(held_out)
  assert trained | set(held_out) == set(texts)
  assert held_out == [t for t in texts if t in set(held_out)], "eval keeps corpus order"


def test_eval_batches_are_fixed_padded_and_split_across_processes(tokenizer, tmp_path):
  cfg = make_data_cfg(tmp_path / "cache", files=EMAIL_GLOB, seq_len=32, eval_fraction=0.3)
  single = data.make_eval_batches(cfg, tokenizer, batch_size=6, num_batches=1000)
  assert 1 <= len(single) < 1000
  again = data.make_eval_batches(cfg, tokenizer, batch_size=6, num_batches=1000)
  for a, b in zip(single, again, strict=True):
    for name in FIELDS:
      np.testing.assert_array_equal(a[name], b[name])
  last = single[-1]
  assert last["loss_mask"][last["segment_ids"] == 0].sum() == 0
  assert len(data.make_eval_batches(cfg, tokenizer, batch_size=6, num_batches=2)) == 2
  # Two processes with 3 rows each make the same global batches as one process with 6.
  halves = [
    data.make_eval_batches(cfg, tokenizer, batch_size=3, num_batches=1000, process_index=p, process_count=2)
    for p in range(2)
  ]
  assert len(halves[0]) == len(halves[1]) == len(single)
  for whole, first, second in zip(single, *halves):
    for name in FIELDS:
      np.testing.assert_array_equal(whole[name], np.concatenate([first[name], second[name]]))


# Checkpointing


def test_restored_iterator_yields_the_same_batches(tokenizer, tmp_path):
  cfg = make_data_cfg(tmp_path / "cache", files=EMAIL_GLOB, seq_len=32)
  iterator = data.make_train_iterator(cfg, tokenizer, batch_size=4, seed=7)
  for _ in range(3):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))  # a checkpoint stores it as JSON
  expected = [next(iterator) for _ in range(5)]
  fresh = data.make_train_iterator(cfg, tokenizer, batch_size=4, seed=7)
  fresh.set_state(state)
  for want, got in zip(expected, [next(fresh) for _ in range(5)]):
    for name in FIELDS:
      np.testing.assert_array_equal(got[name], want[name])


def test_iterator_round_trips_through_an_orbax_checkpoint(tokenizer, tmp_path):
  cfg = make_data_cfg(tmp_path / "cache", files=EMAIL_GLOB, seq_len=32)
  iterator = data.make_train_iterator(cfg, tokenizer, batch_size=2, seed=1)
  next(iterator)
  with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
    manager.save(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
    manager.wait_until_finished()
    expected = next(iterator)
    fresh = data.make_train_iterator(cfg, tokenizer, batch_size=2, seed=1)
    manager.restore(1, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  np.testing.assert_array_equal(next(fresh)["inputs"], expected["inputs"])


# Sources and bad input


def test_jsonl_parquet_and_text_sources(tokenizer, tmp_path):
  import pyarrow
  import pyarrow.parquet

  source = tmp_path / "src"
  source.mkdir()
  (source / "a.jsonl").write_text('{"text": "first line doc", "id": 1}\n\n{"text": "second\\n  doc"}\n')
  table = pyarrow.table({"text": ["parquet one", "parquet two"], "other": [1, 2]})
  pyarrow.parquet.write_table(table, source / "b.parquet")
  (source / "c.txt").write_text("plain  text\n")
  cfg = make_data_cfg(tmp_path / "cache", files=str(source / "*"), seq_len=16)
  cfg.eval_fraction, cfg.shuffle = 0.0, False
  rows = take_rows(data.make_train_iterator(cfg, tokenizer, batch_size=1, seed=0), 20)
  expected = ["first line doc", "second\n  doc", "parquet one", "parquet two", "plain  text\n"]
  assert documents_in_stream(rows.ravel(), tokenizer)[:5] == expected


def bad_input_cases(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "a.txt").write_text("")
  (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"body": "no text field"}\n')
  (tmp_path / "broken.jsonl").write_text('{"text": "fine"}\n{"text": \n')
  return {
    "missing path": ({"files": str(tmp_path / "nope.txt")}, r"no such file .*nope\.txt'; fix the path"),
    "empty glob": ({"files": str(tmp_path / "*.nothing")}, r"\*\.nothing' matches no files; fix the glob"),
    "directory": ({"files": str(tmp_path / "empty")}, r"empty' is a directory; name its files with a glob"),
    "empty corpus": ({"files": str(tmp_path / "empty" / "*.txt")}, r"no training documents .*add documents"),
    "missing field": ({"files": str(tmp_path / "bad.jsonl")}, r"bad\.jsonl:2: no 'text' field; set data.text_field"),
    "invalid json": ({"files": str(tmp_path / "broken.jsonl")}, r"broken\.jsonl:2: not valid JSON"),
    "bad policy": ({"invalid_utf8": "ignore"}, r"data.invalid_utf8='ignore' is not a policy"),
  }


@pytest.mark.parametrize(
  "case",
  ["missing path", "empty glob", "directory", "empty corpus", "missing field", "invalid json", "bad policy"],
)
def test_bad_input_gives_a_one_line_error(tokenizer, tmp_path, case):
  overrides, message = bad_input_cases(tmp_path)[case]
  cfg = make_data_cfg(tmp_path / "cache", **overrides)
  cfg.eval_fraction = 0.0
  with pytest.raises(data.DataError, match=message) as error:
    data.make_train_iterator(cfg, tokenizer, batch_size=1, seed=0)
  assert "\n" not in str(error.value)


def test_missing_or_conflicting_tokenizer_gives_a_one_line_error(tokenizer, tmp_path):
  cfg = make_data_cfg(tmp_path / "cache", tokenizer=str(tmp_path / "nope.model"))
  with pytest.raises(data.DataError, match=r"data.tokenizer: no such file .*nope\.model") as error:
    data.load_tokenizer(cfg, None)
  assert "\n" not in str(error.value)
  run = tmp_path / "run"
  run.mkdir()
  (run / "tokenizer.model").write_bytes(b"another model")
  cfg.tokenizer = tokenizer.model_path
  with pytest.raises(data.DataError, match=r"a run keeps its tokenizer") as error:
    data.load_tokenizer(cfg, str(run))
  assert "\n" not in str(error.value)


def test_impossible_vocab_size_gives_a_one_line_error(tmp_path):
  cfg = make_data_cfg(tmp_path / "cache", files=write_documents(tmp_path / "docs", numbered_documents(5)))
  cfg.vocab_size = 100  # fewer than the 256 byte pieces alone
  with pytest.raises(data.DataError, match=r"training a tokenizer on .* failed .*; raise data.vocab_size") as error:
    data.load_tokenizer(cfg, None)
  assert "\n" not in str(error.value)


@pytest.mark.parametrize("policy", ["replace", "skip"])
def test_invalid_utf8_is_replaced_or_skipped(tokenizer, tmp_path, caplog, policy):
  docs = tmp_path / "docs"
  docs.mkdir()
  (docs / "a_good.txt").write_text("good text\n")
  (docs / "b_bad.txt").write_bytes(b"bad \xff\xfe bytes\n")
  cfg = make_data_cfg(tmp_path / "cache", files=str(docs / "*.txt"), invalid_utf8=policy, seq_len=16)
  cfg.eval_fraction, cfg.shuffle = 0.0, False
  with caplog.at_level(logging.WARNING):
    rows = take_rows(data.make_train_iterator(cfg, tokenizer, batch_size=1, seed=0), 4)
  expected = ["good text\n", "bad \ufffd\ufffd bytes\n"] if policy == "replace" else ["good text\n"]
  assert documents_in_stream(rows.ravel(), tokenizer)[: len(expected)] == expected
  if policy == "skip":
    assert set(documents_in_stream(rows.ravel(), tokenizer)) == {"good text\n"}
  warnings = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith("1 file(s)")


# Token cache


def test_token_cache_is_reused_and_rebuilt_when_a_file_changes(tokenizer, tmp_path, monkeypatch):
  calls = []
  encode = token_cache._encode_batch
  monkeypatch.setattr(token_cache, "_encode_batch", lambda texts: calls.append(len(texts)) or encode(texts))
  texts = numbered_documents(10)
  cfg = make_data_cfg(tmp_path / "cache", files=write_documents(tmp_path / "docs", texts), eval_fraction=0.3)
  first = next(data.make_train_iterator(cfg, tokenizer, batch_size=2, seed=0))
  assert sum(calls) == 10
  data.make_eval_batches(cfg, tokenizer, batch_size=2, num_batches=1)  # the same cache holds the eval split
  second = next(data.make_train_iterator(cfg, tokenizer, batch_size=2, seed=0))
  assert sum(calls) == 10, "the second run tokenized again"
  np.testing.assert_array_equal(first["inputs"], second["inputs"])
  (tmp_path / "docs" / "doc_000.txt").write_text("changed text, longer than before\n")
  next(data.make_train_iterator(cfg, tokenizer, batch_size=2, seed=0))
  assert sum(calls) == 20


def test_worker_processes_tokenize_like_the_main_process(tokenizer, tmp_path):
  def build(num_workers):
    cfg = make_data_cfg(tmp_path / f"cache{num_workers}", files=EMAIL_GLOB, num_workers=num_workers)
    return token_cache.load_token_cache(cfg, tokenizer, process_index=0, process_count=1)

  in_process, workers = build(0), build(2)
  np.testing.assert_array_equal(workers.tokens, in_process.tokens)
  np.testing.assert_array_equal(workers.offsets, in_process.offsets)
  np.testing.assert_array_equal(workers.held_out, in_process.held_out)


# Global batch


def test_global_batch_lays_local_rows_out_on_the_mesh(tokenizer, tmp_path):
  devices = jax.devices()
  mesh = jax.sharding.Mesh(np.array(devices), ("batch",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("batch", None))
  cfg = make_data_cfg(tmp_path / "cache", files=EMAIL_GLOB, seq_len=8)
  local = next(data.make_train_iterator(cfg, tokenizer, batch_size=2 * len(devices), seed=0))
  batch = data.global_batch(local, sharding)
  assert set(batch) == set(FIELDS)
  for name in FIELDS:
    assert batch[name].sharding == sharding
    np.testing.assert_array_equal(np.asarray(batch[name]), local[name])
