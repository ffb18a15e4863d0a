"""Tests of the data pipeline against independent references: direct tokenization, a naive packer, set algebra,
Python's glob, and one process against several.

Every test writes its caches under a tmp dir. The shared corpus is the standard library's email package
(29 files, ~380 KB) with a 400-piece tokenizer, trained once per module.
"""

import glob
import json
import logging
import math
import os
import socket
import subprocess
import sys
import sysconfig
import time
import tracemalloc

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import data
import storage
from configs.base import base_config
from data import cache, pipeline, sources, token_cache
from data.packing import PackedRows, to_model_inputs
from data.permutation import permutation_key, permute
from data.sources import Corpus

STDLIB = sysconfig.get_paths()["stdlib"]
EMAIL_GLOB = os.path.join(STDLIB, "email", "**", "*.py")
VOCAB_SIZE = 400
FIELDS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_data_cfg(cache_dir, **overrides):
  cfg = base_config().data
  cfg.cache_dir = str(cache_dir)
  cfg.vocab_size = VOCAB_SIZE
  cfg.tokenizer_sample_bytes = 200_000
  cfg.num_workers = 0  # in-process tokenization keeps tests fast; one test covers worker processes
  cfg.update(overrides)
  return cfg


def batch_sharding(shape=(1,), names=("data",), devices=None):
  """Batch rows over `data`, other mesh axes replicating them, on the first devices (or those given)."""
  devices = jax.devices()[: math.prod(shape)] if devices is None else devices
  return NamedSharding(Mesh(np.array(devices).reshape(shape), names), PartitionSpec("data", None))


def one_device():
  return batch_sharding()


def train_iterator(cfg, tokenizer, batch_size, seed, sharding=None, start_row=0):
  return data.make_train_iterator(
    cfg, tokenizer, global_batch_size=batch_size, seed=seed, sharding=sharding or one_device(), start_row=start_row
  )


def eval_batches(cfg, tokenizer, batch_size, num_batches, sharding=None):
  return data.make_eval_batches(
    cfg, tokenizer, global_batch_size=batch_size, num_batches=num_batches, sharding=sharding or one_device()
  )


def host(batch):
  return {name: np.asarray(value) for name, value in batch.items()}


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


def batch_rows(batch):
  """Packed rows (L + 1 tokens: inputs plus the last target) of one batch."""
  batch = host(batch)
  return np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)


def take_rows(iterator, num_rows):
  """The first num_rows packed rows of a batch iterator."""
  rows = []
  while len(rows) < num_rows:
    rows.extend(batch_rows(next(iterator)))
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


@pytest.mark.fast
def test_default_corpus_is_the_standard_library_source():
  corpus = Corpus(make_data_cfg("unused"))
  keys = [document.key for document in corpus.documents()]
  assert len(keys) > 1000
  assert keys == sorted(keys)
  assert all(key.endswith(".py") and not key.startswith("/") for key in keys)
  assert not any("site-packages" in key or "__pycache__" in key for key in keys)
  assert "json/decoder.py" in keys


@pytest.mark.fast
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
  row_len = 8
  rows = PackedRows(
    lambda d, lo, hi: documents[d][lo:hi],
    np.array(lengths),
    row_len=row_len,
    bos_id=2,
    eos_id=3,
    pad_id=0,
    seed=0,
    shuffle=False,
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


@pytest.mark.fast
@pytest.mark.parametrize("unit_bytes", [1 << 20, 100])
def test_batches_match_a_naive_packer_at_document_boundaries(tokenizer, tmp_path, unit_bytes):
  texts = numbered_documents(12)
  cfg = make_data_cfg(tmp_path / "cache", files=write_documents(tmp_path / "docs", texts), seq_len=16)
  cfg.eval_fraction, cfg.shuffle, cfg.unit_bytes = 0.0, False, unit_bytes
  assert (len(Corpus(cfg).units) > 3) == (unit_bytes == 100), "small units must cut the corpus, large ones not"
  expected = naive_features(naive_rows([tokenizer.encode(t) for t in texts], 17, tokenizer.bos_id, tokenizer.eos_id))
  num_rows = len(expected["inputs"])
  assert any(len(tokenizer.encode(t)) + 2 > 17 for t in texts), "some document must span rows"
  iterator = train_iterator(cfg, tokenizer, 1, seed=0)
  batches = [host(next(iterator)) for _ in range(num_rows)]
  for name in FIELDS:
    got = np.concatenate([batch[name] for batch in batches])
    assert got.dtype == (np.float32 if name == "loss_mask" else np.int32)
    np.testing.assert_array_equal(got, expected[name], err_msg=name)


def test_an_epoch_holds_every_training_token_once(tokenizer, tmp_path):
  cfg = make_data_cfg(tmp_path / "cache", files=EMAIL_GLOB, seq_len=64, eval_fraction=0.0, unit_bytes=50_000)
  reference = []
  for path in sorted(glob.glob(EMAIL_GLOB, recursive=True)):
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if text:
      reference += [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id]
  num_rows = math.ceil(len(reference) / 65)
  rows = take_rows(train_iterator(cfg, tokenizer, 8, seed=3), 2 * num_rows)
  expected_counts = np.bincount(reference, minlength=VOCAB_SIZE)
  for epoch in (rows[:num_rows], rows[num_rows:]):
    np.testing.assert_array_equal(np.bincount(epoch[epoch != 0], minlength=VOCAB_SIZE), expected_counts)
  assert not np.array_equal(rows[:num_rows], rows[num_rows:]), "each epoch is shuffled anew"
  # Two seeds, two orders.
  other = take_rows(train_iterator(cfg, tokenizer, 8, seed=4), num_rows)
  assert not np.array_equal(other, rows[:num_rows])


# The per-index shuffle (data/permutation.py)


@pytest.mark.fast
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 64, 1000, 1023, 1025, 10007])
def test_the_permutation_is_a_bijection_of_every_range(n):
  for seed in range(4):
    order = permute(np.arange(n), n, permutation_key(11, seed, 0))
    assert sorted(order.tolist()) == list(range(n)), f"n={n} seed={seed}"


def test_a_range_too_large_for_a_table_still_sends_distinct_indices_to_distinct_positions():
  huge = 2**40 + 3
  indices = np.arange(huge - 5000, huge)
  positions = permute(indices, huge, permutation_key(11, 0, 0))
  assert len(set(positions.tolist())) == len(indices) and positions.min() >= 0 and positions.max() < huge


def test_seeds_and_epochs_give_different_orders_each_position_equally_likely():
  for n in (10, 64, 1025):
    orders = {
      tuple(permute(np.arange(n), n, permutation_key(11, seed, epoch)).tolist())
      for seed in range(3)
      for epoch in range(3)
    }
    assert len(orders) == 9, f"n={n}: 9 (seed, epoch) pairs, {len(orders)} orders"
  # Over many keys, index i lands at each position j about equally often: Pearson's chi-square of the counts
  # against keys / n each, per degree of freedom, is about 1 for a uniform shuffle.
  for n in (5, 6):
    keys = 3000
    counts = np.zeros((n, n))
    for key in range(keys):  # one index at a time: the cheaper path for so few
      counts[np.arange(n), [permute(i, n, permutation_key(11, key)) for i in range(n)]] += 1
    chi_square = np.sum((counts - keys / n) ** 2 / (keys / n)) / (n - 1) ** 2
    assert chi_square < 3, f"n={n}: chi-square per degree of freedom {chi_square:.2f}\n{counts}"


@pytest.mark.parametrize("n", [1, 3, 1000, 10007])
def test_one_index_at_a_time_agrees_with_an_array_of_them(n):
  key = permutation_key(11, 5, 2)
  order = permute(np.arange(n), n, key)
  one_by_one = [permute(i, n, key) for i in range(n)]
  assert all(type(position) is int for position in one_by_one)
  assert one_by_one == order.tolist()
  grid = np.arange(n - n % 2).reshape(-1, 2) if n > 1 else np.zeros((1, 1), dtype=np.int64)
  np.testing.assert_array_equal(permute(grid, n, key), order[grid])


def test_serving_a_whole_document_row_does_not_hold_the_epoch_order():
  num_documents = 200_000
  rows = PackedRows(
    lambda d, lo, hi: np.full(hi - lo, 7, dtype=np.int32),
    np.full(num_documents, 2),
    row_len=4,  # each document fills its own row: [BOS 7 7 EOS]
    bos_id=2,
    eos_id=3,
    pad_id=0,
    seed=0,
    shuffle=True,
    whole_documents=True,
  )
  assert rows.rows_per_epoch == num_documents
  tracemalloc.start()
  try:
    row = rows[3 * rows.rows_per_epoch + 12345]
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  np.testing.assert_array_equal(row["tokens"], [2, 7, 7, 3])
  table_bytes = 8 * rows.rows_per_epoch  # what an int64 visiting order of one epoch would take
  assert peak < table_bytes / 100, f"serving one row peaked at {peak} bytes; an epoch's order takes {table_bytes}"


# The global batch: one stream, whatever the processes and devices

B, STEPS = 8, 4


def small_corpus(directory):
  """Text files and a JSONL file, cut into several units by data.unit_bytes=200."""
  docs = write_documents(directory / "text", numbered_documents(12))
  lines = [json.dumps({"text": f"record {i}: " + "y = x + 1\n" * (i % 4)}) + "\n" for i in range(20)]
  (directory / "records.jsonl").write_text("".join(lines))
  return f"{docs},{directory / 'records.jsonl'}"


@pytest.mark.fast
def test_global_batches_are_the_same_on_every_mesh_and_resume_at_a_row(tokenizer, tmp_path):
  cfg = make_data_cfg(tmp_path / "cache", files=small_corpus(tmp_path), seq_len=16, unit_bytes=200, eval_fraction=0.1)
  layouts = {
    "data1": batch_sharding((1,)),
    "data2": batch_sharding((2,)),
    "data8": batch_sharding((8,)),
    "data2_tensor4": batch_sharding((2, 4), ("data", "tensor")),
    "data8_reversed": batch_sharding((8,), devices=jax.devices()[::-1]),
  }
  runs = {}
  for name, sharding in layouts.items():
    iterator = train_iterator(cfg, tokenizer, B, seed=5, sharding=sharding)
    batches = [next(iterator) for _ in range(STEPS)]
    assert all(batch[field].sharding == sharding for batch in batches for field in FIELDS)
    runs[name] = [host(batch) for batch in batches]
  for name, batches in runs.items():
    for step in range(STEPS):
      for field in FIELDS:
        np.testing.assert_array_equal(batches[step][field], runs["data1"][step][field], err_msg=f"{name} {field}")
  # The stream is the same rows whatever the batch size: 2 steps of 8 rows are 4 steps of 4 and, started at a
  # row cursor, the iterator continues where another left off.
  rows = np.concatenate([batch_rows(batch) for batch in runs["data1"]])
  halves = take_rows(train_iterator(cfg, tokenizer, B // 2, seed=5), STEPS * B)
  np.testing.assert_array_equal(halves, rows)
  resumed = take_rows(train_iterator(cfg, tokenizer, B, seed=5, sharding=layouts["data8"], start_row=2 * B), 2 * B)
  np.testing.assert_array_equal(resumed, rows[2 * B :])


@pytest.mark.fast
def test_the_next_batch_is_built_in_the_background_and_errors_reach_the_caller(tokenizer, tmp_path, monkeypatch):
  cfg = make_data_cfg(tmp_path / "cache", files=small_corpus(tmp_path), seq_len=16, unit_bytes=200)
  built = []
  get_row = PackedRows.__getitem__
  monkeypatch.setattr(PackedRows, "__getitem__", lambda self, r: built.append(r) or get_row(self, r))
  iterator = train_iterator(cfg, tokenizer, B, seed=0)
  next(iterator)
  deadline = time.monotonic() + 30
  while len(built) < 2 * B and time.monotonic() < deadline:
    time.sleep(0.01)
  assert sorted(built[: 2 * B]) == list(range(2 * B)), "batch 1 was not built before it was asked for"
  time.sleep(0.2)
  assert len(built) <= 3 * B, "the background thread runs more than a batch ahead"
  failing = pipeline._Prefetcher(lambda i: i if i < 2 else 1 // 0)
  assert [next(failing), next(failing)] == [0, 1]
  for _ in range(2):
    with pytest.raises(ZeroDivisionError):
      next(failing)


_EXIT_WHILE_BUILDING = r"""
import json, sys, time
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict
import data

# The second batch's first field waits ~1 s inside JAX's C++ runtime (GIL released), and the main thread
# exits meanwhile: a thread still in there when the interpreter finalizes aborts the process.
slow = jax.jit(lambda x: jax.lax.fori_loop(0, 400, lambda i, y: jnp.tanh(y @ y), x))
x = jnp.ones((256, 256))
slow(x).block_until_ready()  # compiled before the clock starts
calls, started = [], []
make_array = jax.make_array_from_callback
def slow_make_array(*args):
  calls.append(1)
  if len(calls) == 6:
    started.append(1)
    slow(x).block_until_ready()
  return make_array(*args)
jax.make_array_from_callback = slow_make_array
cfg = ConfigDict(json.loads(sys.argv[1]))
sharding = NamedSharding(Mesh(jax.devices(), ("data",)), PartitionSpec("data", None))
iterator = data.make_train_iterator(cfg, data.Tokenizer(cfg.tokenizer), global_batch_size=8, seed=0, sharding=sharding)
next(iterator)
while not started:
  time.sleep(0.01)
"""


def test_exiting_while_the_next_batch_is_placed_on_the_devices_exits_cleanly(tokenizer, tmp_path):
  cfg = make_data_cfg(tmp_path / "cache", files=small_corpus(tmp_path), seq_len=16, unit_bytes=200)
  cfg.tokenizer = tokenizer.model_path
  env = {**os.environ, "PYTHONPATH": REPO, "JAX_PLATFORMS": "cpu"}
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # 5 fields x 8 devices: pieces per batch
  proc = subprocess.run(
    [sys.executable, "-c", _EXIT_WHILE_BUILDING, cfg.to_json()], env=env, cwd=REPO, capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr[-2000:]


_WORKER = r"""
import json, sys
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
port, count, index, out, cfg_json, steps, batch_size = sys.argv[1:]
count, index, steps, batch_size = int(count), int(index), int(steps), int(batch_size)
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=count, process_id=index)
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from ml_collections import ConfigDict
import data
from data import packing, token_cache

rows_read, built = [], []
get_row, build = packing.PackedRows.__getitem__, token_cache._Builder._build
packing.PackedRows.__getitem__ = lambda self, r: rows_read.append(int(r)) or get_row(self, r)
token_cache._Builder._build = lambda self, unit, path: built.append(unit.index) or build(self, unit, path)
cfg = ConfigDict(json.loads(cfg_json))
tokenizer = data.Tokenizer(cfg.tokenizer)
devices = sorted(jax.devices(), key=lambda d: d.id)
local = {d: i for p in range(count) for i, d in enumerate(x for x in devices if x.process_index == p)}
layouts = {
  "data8": (devices, (8,), ("data",)),
  "interleaved8": (sorted(devices, key=lambda d: (local[d], d.process_index)), (8,), ("data",)),
  "data2_tensor4": (devices, (2, 4), ("data", "tensor")),
}
report, gathered = {"built": built, "rows": {}, "mesh_processes": {}}, {}
for name, (order, shape, names) in layouts.items():
  mesh = Mesh(np.array(order).reshape(shape), names)
  sharding = NamedSharding(mesh, PartitionSpec("data", None))
  del rows_read[:]
  iterator = data.make_train_iterator(cfg, tokenizer, global_batch_size=batch_size, seed=5, sharding=sharding)
  batches = [next(iterator) for _ in range(steps)]
  for field in batches[0]:
    gathered[f"{name}/{field}"] = np.stack([multihost_utils.process_allgather(b[field], tiled=True) for b in batches])
  report["rows"][name] = sorted(set(rows_read))
  report["mesh_processes"][name] = [d.process_index for d in mesh.devices.flat]
with open(f"{out}/process_{index}.json", "w") as f:
  json.dump(report, f)
if index == 0:
  np.savez(f"{out}/batches.npz", **gathered)
"""


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_processes(count, cfg, out):
  """`count` local JAX processes (8 CPU devices in all) running _WORKER; their reports, and process 0's batches."""
  out.mkdir()
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // count}", "JAX_PLATFORMS": "cpu"}
  env["PYTHONPATH"] = REPO
  port = _free_port()
  args = [str(port), str(count), None, str(out), cfg.to_json(), str(STEPS), str(B)]
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", _WORKER, *args[:2], str(i), *args[3:]],
      env=env,
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
    )
    for i in range(count)
  ]
  for proc in procs:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output[-3000:]
  reports = [json.loads((out / f"process_{i}.json").read_text()) for i in range(count)]
  with np.load(out / "batches.npz") as batches:
    return reports, dict(batches)


def expected_rows(mesh_processes, shape, process):
  """Global rows of steps 0 .. STEPS - 1 that `process`'s devices hold, batch rows split over the first mesh axis."""
  per_index = len(mesh_processes) // shape[0]  # devices per `data` index
  mine = {position // per_index for position, p in enumerate(mesh_processes) if p == process}
  rows_per_index = B // shape[0]
  return {s * B + d * rows_per_index + r for s in range(STEPS) for d in mine for r in range(rows_per_index)}


@pytest.mark.slow
def test_processes_load_only_their_rows_tokenize_only_their_units_and_match_one_process(tokenizer, tmp_path):
  cfg = make_data_cfg(tmp_path / "cache", files=small_corpus(tmp_path), seq_len=16, unit_bytes=200, eval_fraction=0.1)
  cfg.tokenizer = tokenizer.model_path
  num_units = len(Corpus(cfg).units)
  assert num_units >= 4
  shapes = {"data8": (8,), "interleaved8": (8,), "data2_tensor4": (2, 4)}
  # Two processes on a fresh cache dir shared by both, then four on the same one: a second start.
  for count in (2, 4):
    reports, batches = run_processes(count, cfg, tmp_path / f"out{count}")
    built = [set(report["built"]) for report in reports]
    if count == 2:
      assert built == [{u for u in range(num_units) if u % 2 == p} for p in range(2)]
      assert built[0] | built[1] == set(range(num_units)) and not built[0] & built[1]
    else:
      assert built == [set()] * 4, "the second start tokenized again"
    for name, shape in shapes.items():
      for process, report in enumerate(reports):
        rows = {r for r in report["rows"][name] if r < STEPS * B}  # later rows: batches prefetched ahead
        assert rows == expected_rows(report["mesh_processes"][name], shape, process), (count, name, process)
    # The global batches are those of one process with 8 devices.
    reference = train_iterator(cfg, tokenizer, B, seed=5, sharding=batch_sharding((8,)))
    want = [host(next(reference)) for _ in range(STEPS)]
    for name in shapes:
      for field in FIELDS:
        np.testing.assert_array_equal(
          batches[f"{name}/{field}"], np.stack([w[field] for w in want]), err_msg=f"{count} {name} {field}"
        )


def test_a_unit_build_reads_only_its_files_and_a_cache_not_shared_is_completed(
  tokenizer, tmp_path, monkeypatch, caplog
):
  cfg = make_data_cfg(tmp_path / "cache", files=small_corpus(tmp_path), seq_len=16, unit_bytes=200)
  units = Corpus(cfg).units
  events = []
  build, parse = token_cache._Builder._build, Corpus._jsonl_text
  monkeypatch.setattr(
    token_cache._Builder,
    "_build",
    lambda self, unit, path: events.append(("unit", unit.index)) or build(self, unit, path),
  )
  monkeypatch.setattr(Corpus, "_jsonl_text", lambda self, *a: events.append(("line", a[1])) or parse(self, *a))
  # Process 1 of 2 alone, as on a host whose cache dir the other process's host does not see.
  with caplog.at_level(logging.WARNING):
    token_cache.load_token_cache(cfg, tokenizer, process_index=1, process_count=2)
  built = [index for kind, index in events if kind == "unit"]
  mine = [u.index for u in units if u.index % 2 == 1]
  assert built[: len(mine)] == mine, "its own units first"
  assert sorted(built[len(mine) :]) == [u.index for u in units if u.index % 2 == 0], "then the ones not shared"
  warnings = [r.getMessage() for r in caplog.records if "not shared" in r.getMessage()]
  assert len(warnings) == 1
  # Each JSONL line is parsed once, while building the unit whose byte range holds its first byte.
  lines, current = [], None
  for kind, value in events:
    if kind == "unit":
      current = units[value]
    else:
      assert current.fmt == "jsonl" and current.begin <= value < current.end
      lines.append(value)
  text = (tmp_path / "records.jsonl").read_bytes()
  assert sorted(lines) == [0] + [i + 1 for i, c in enumerate(text[:-1]) if c == ord("\n")]
  assert len({u.begin for u in units if u.fmt == "jsonl"}) > 2, "the JSONL file must span several units"
  events.clear()
  token_cache.load_token_cache(cfg, tokenizer, process_index=0, process_count=2)
  assert events == [], "a second start tokenized again"


# Held-out split


def test_no_held_out_document_reaches_training(tokenizer, tmp_path):
  texts = numbered_documents(60)
  cfg = make_data_cfg(tmp_path / "cache", files=write_documents(tmp_path / "docs", texts), seq_len=16)
  cfg.eval_fraction, cfg.shuffle = 0.25, False
  batches = eval_batches(cfg, tokenizer, 4, num_batches=1000)
  held_out = documents_in_stream(np.concatenate([batch_rows(b) for b in batches]).ravel(), tokenizer)
  rows = take_rows(train_iterator(cfg, tokenizer, 4, seed=0), 2 * len(texts) * 4)
  trained = set(documents_in_stream(rows.ravel(), tokenizer))
  assert 0 < len(held_out) < len(texts) / 2
  assert not trained & set(held_out)
  assert trained | set(held_out) == set(texts)
  assert held_out == [t for t in texts if t in set(held_out)], "eval keeps corpus order"


def test_eval_batches_are_fixed_padded_and_the_same_on_every_mesh(tokenizer, tmp_path):
  cfg = make_data_cfg(tmp_path / "cache", files=EMAIL_GLOB, seq_len=32, eval_fraction=0.3)
  single = [host(b) for b in eval_batches(cfg, tokenizer, 8, num_batches=1000)]
  assert 1 <= len(single) < 1000
  again = [host(b) for b in eval_batches(cfg, tokenizer, 8, num_batches=1000, sharding=batch_sharding((8,)))]
  for a, b in zip(single, again, strict=True):
    for name in FIELDS:
      np.testing.assert_array_equal(a[name], b[name])
  last = single[-1]
  assert (last["segment_ids"] == 0).all(axis=1).any(), "the last batch ends in rows of padding"
  assert last["loss_mask"][last["segment_ids"] == 0].sum() == 0
  assert len(eval_batches(cfg, tokenizer, 8, num_batches=2)) == 2
  # The held-out stream in corpus order, cut into rows: what the batches hold.
  keys = [d.key for d in Corpus(cfg).documents()]
  texts = [open(os.path.join(STDLIB, "email", k), encoding="utf-8").read() for k in keys]
  held = [t for k, t in zip(keys, texts) if sources.eval_hash(k) < 0.3 and t]
  expected = naive_rows([tokenizer.encode(t) for t in held], 33, tokenizer.bos_id, tokenizer.eos_id)
  got = np.concatenate([batch_rows(b) for b in single])
  np.testing.assert_array_equal(got[: len(expected)], np.array([tokens for tokens, _, _ in expected]))
  assert not got[len(expected) :].any()


def jsonl_corpus(path, count):
  """`count` JSONL documents in one file; (texts, keys) as the corpus names them (file name @ byte offset)."""
  texts = [f"document number {i}\n" * (1 + i % 3) for i in range(count)]
  lines = [json.dumps({"text": text}) + "\n" for text in texts]
  path.write_text("".join(lines))
  offsets = np.cumsum([0] + [len(line.encode()) for line in lines])[:-1]
  return texts, [f"{path.name}@{offset}" for offset in offsets]


def test_a_small_corpus_holds_out_exactly_one_document_and_trains(tokenizer, tmp_path):
  texts, keys = jsonl_corpus(tmp_path / "small.jsonl", 40)
  hashes = [sources.eval_hash(key) for key in keys]
  assert min(hashes) >= 0.01, "the corpus must be one where eval_fraction=0.01 selects nothing"
  cfg = make_data_cfg(tmp_path / "cache", files=str(tmp_path / "small.jsonl"), seq_len=16, eval_fraction=0.01)
  cfg.shuffle = False
  batches = eval_batches(cfg, tokenizer, 4, num_batches=8)
  held_out = documents_in_stream(np.concatenate([batch_rows(b) for b in batches]).ravel(), tokenizer)
  assert held_out == [texts[int(np.argmin(hashes))]]
  rows = take_rows(train_iterator(cfg, tokenizer, 4, seed=0), 200)
  assert set(documents_in_stream(rows.ravel(), tokenizer)) == set(texts) - set(held_out)


def test_a_one_document_corpus_trains_without_evaluation(tokenizer, tmp_path, caplog):
  texts = ["the only document\n" * 5]
  cfg = make_data_cfg(tmp_path / "cache", files=write_documents(tmp_path / "docs", texts), seq_len=16)
  cfg.eval_fraction, cfg.shuffle = 0.5, False
  with caplog.at_level(logging.INFO, logger="data"):
    assert eval_batches(cfg, tokenizer, 2, num_batches=4) == []
  lines = [r.getMessage() for r in caplog.records if "evaluation" in r.getMessage()]
  assert len(lines) == 1 and "no held-out document" in lines[0] and "trains without evaluation" in lines[0]
  rows = take_rows(train_iterator(cfg, tokenizer, 2, seed=0), 8)
  assert set(documents_in_stream(rows.ravel(), tokenizer)) == set(texts)
  cfg.eval_fraction = 0.0
  assert eval_batches(cfg, tokenizer, 2, num_batches=4) == []


# Sources, paths and bad input


@pytest.mark.fast
def test_jsonl_parquet_and_text_sources_in_units(tokenizer, tmp_path):
  import pyarrow
  import pyarrow.parquet

  source = tmp_path / "src"
  source.mkdir()
  jsonl = [{"text": "first line doc", "id": 1}, None, {"text": "second\n  doc"}] + [{"text": f"j{i}"} for i in range(9)]
  (source / "a.jsonl").write_text("".join("\n" if r is None else json.dumps(r) + "\n" for r in jsonl))
  table = pyarrow.table({"text": [f"parquet {i}" for i in range(5)], "other": list(range(5))})
  pyarrow.parquet.write_table(table, source / "b.parquet", row_group_size=2)
  (source / "c.txt").write_text("plain  text\n")
  cfg = make_data_cfg(tmp_path / "cache", files=str(source / "*"), seq_len=16, unit_bytes=40)
  cfg.eval_fraction, cfg.shuffle = 0.0, False
  formats = [unit.fmt for unit in Corpus(cfg).units]
  assert formats.count("jsonl") > 3 and formats.count("parquet") == 3 and formats.count("text") == 1
  rows = take_rows(train_iterator(cfg, tokenizer, 1, seed=0), 40)
  expected = [r["text"] for r in jsonl if r] + [f"parquet {i}" for i in range(5)] + ["plain  text\n"]
  assert documents_in_stream(rows.ravel(), tokenizer)[: len(expected)] == expected


def test_glob_follows_python_glob(tmp_path):
  for name in ["a.txt", "b.py", ".hidden.txt", "sub/c.txt", "sub/deeper/d.txt", ".hid/e.txt", "sub/.f.txt"]:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(name)
  patterns = ["*.txt", "**/*.txt", "**", "sub/**/*.txt", "s*/*", ".*", "*/deeper/?.txt", "[ab].*"]
  for pattern in [os.path.join(tmp_path, p) for p in patterns] + [EMAIL_GLOB]:
    expected = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    assert [path for path, _ in sources._glob(pattern)[1]] == expected, pattern


def test_the_remote_code_path_reads_the_same_batches(tokenizer, tmp_path, monkeypatch):
  cfg = make_data_cfg(tmp_path / "local", files=small_corpus(tmp_path), seq_len=16, unit_bytes=200)
  local = token_cache.load_token_cache(cfg, tokenizer)
  assert isinstance(local._units[0].tokens, np.memmap)
  want = take_rows(train_iterator(cfg, tokenizer, 4, seed=1), 12)
  # Every path treated as a URL: epath stat and glob, no file locks, token files read instead of mapped.
  monkeypatch.setattr(storage, "is_url", lambda path: True)
  monkeypatch.setattr(cache.fcntl, "flock", lambda *a: pytest.fail("locked a remote cache dir"))
  cfg.cache_dir = str(tmp_path / "remote")
  remote = token_cache.load_token_cache(cfg, tokenizer)
  # Only the bytes the rows need: ranged reads, never a whole unit file's tokens.
  monkeypatch.setattr(token_cache._UnitTokens, "tokens", property(lambda self: pytest.fail("read a whole unit")))
  read_range, fetched = storage.read_range, []
  monkeypatch.setattr(storage, "read_range", lambda p, a, b: fetched.append(b - a) or read_range(p, a, b))
  iterator = train_iterator(cfg, tokenizer, 4, seed=1)
  np.testing.assert_array_equal(take_rows(iterator, 12), want)
  iterator.close()
  rows_built = 12 + 4 * (pipeline._PREFETCH_DEPTH + 1)  # the prefetcher builds ahead
  assert 0 < sum(fetched) <= rows_built * 17 * 2 < int(remote.doc_length.sum()) * 2


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
    "bad unit size": ({"unit_bytes": 0}, r"data.unit_bytes=0 must be at least 1"),
  }


@pytest.mark.parametrize(
  "case",
  ["missing path", "empty glob", "directory", "empty corpus", "missing field", "invalid json", "bad policy",
   "bad unit size"],
)  # fmt: skip
def test_bad_input_gives_a_one_line_error(tokenizer, tmp_path, case):
  overrides, message = bad_input_cases(tmp_path)[case]
  cfg = make_data_cfg(tmp_path / "cache", **overrides)
  cfg.eval_fraction = 0.0
  with pytest.raises(data.DataError, match=message) as error:
    train_iterator(cfg, tokenizer, 1, seed=0)
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
    rows = take_rows(train_iterator(cfg, tokenizer, 1, seed=0), 4)
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
  first = host(next(train_iterator(cfg, tokenizer, 2, seed=0)))
  assert sum(calls) == 10
  eval_batches(cfg, tokenizer, 2, num_batches=1)  # the same cache holds the eval split
  second = host(next(train_iterator(cfg, tokenizer, 2, seed=0)))
  assert sum(calls) == 10, "the second run tokenized again"
  np.testing.assert_array_equal(first["inputs"], second["inputs"])
  (tmp_path / "docs" / "doc_000.txt").write_text("changed text, longer than before\n")
  next(train_iterator(cfg, tokenizer, 2, seed=0))
  assert sum(calls) == 20


def test_worker_processes_tokenize_like_the_main_process(tokenizer, tmp_path):
  def build(num_workers):
    cfg = make_data_cfg(tmp_path / f"cache{num_workers}", files=EMAIL_GLOB, num_workers=num_workers)
    cfg.unit_bytes = 100_000
    return token_cache.load_token_cache(cfg, tokenizer)

  in_process, workers = build(0), build(2)
  assert len(in_process._units) > 1
  np.testing.assert_array_equal(workers.doc_length, in_process.doc_length)
  np.testing.assert_array_equal(workers.eval_hash, in_process.eval_hash)
  for a, b in zip(workers._units, in_process._units, strict=True):
    np.testing.assert_array_equal(a.tokens, b.tokens)


# Hugging Face tokenizer.json


HF_TEXTS = ["def f(x):\n    return x * 2\n", "héllo wörld, 日本語 text\n\ttabs  and  spaces", "class A:\n    pass\n"]


def write_hf_tokenizer(directory, specials=("<pad>", "<s>", "</s>"), config=None):
  """A byte-level BPE trained on a few strings with the tokenizers library, saved as tokenizer.json (and a
  tokenizer_config.json when `config` is given); returns the tokenizer.json path."""
  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  hf = tokenizers.Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=320, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
  )
  hf.train_from_iterator(HF_TEXTS * 4, trainer=trainer)
  directory.mkdir(parents=True, exist_ok=True)
  hf.save(str(directory / "tokenizer.json"))
  if config is not None:
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
  return str(directory / "tokenizer.json"), hf


@pytest.mark.fast
def test_tokenizer_json_round_trip_ids_and_pickling(tmp_path):
  import pickle

  path, hf = write_hf_tokenizer(tmp_path / "hf")
  tok = data.Tokenizer(path)
  assert tok.kind == "tokenizer.json"
  # Ids as the tokenizers library itself looks them up.
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (
    hf.token_to_id("<pad>"),
    hf.token_to_id("<s>"),
    hf.token_to_id("</s>"),
  )
  assert tok.unk_id == -1 and tok.vocab_size == hf.get_vocab_size(with_added_tokens=True)
  for text in HF_TEXTS + ["unseen ✓ characters 🙂", "  leading and trailing  "]:
    ids = tok.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False).ids and tok.bos_id not in ids
    assert tok.decode(ids) == text
    assert tok.decode([tok.bos_id, *ids, tok.eos_id]) == text  # control tokens decode to nothing
  assert "".join(tok.id_to_piece(i) for i in tok.encode("def f")) == "defĠf"  # byte-level pieces as stored
  again = pickle.loads(pickle.dumps(tok))
  assert again.encode(HF_TEXTS[1]) == tok.encode(HF_TEXTS[1]) and again.eos_id == tok.eos_id


def test_tokenizer_json_specials_from_config_common_names_or_one_line_error(tmp_path):
  # tokenizer_config.json wins over the common names; AddedToken dicts are read too.
  config = {"bos_token": {"content": "<|begin|>"}, "eos_token": "<|end|>"}
  path, hf = write_hf_tokenizer(tmp_path / "cfg", ("<s>", "</s>", "<|begin|>", "<|end|>"), config)
  tok = data.Tokenizer(path)
  assert (tok.bos_id, tok.eos_id) == (hf.token_to_id("<|begin|>"), hf.token_to_id("<|end|>"))
  # GPT-2 style: one <|endoftext|> serves as BOS and EOS.
  path, hf = write_hf_tokenizer(tmp_path / "gpt2", ("<|endoftext|>",))
  tok = data.Tokenizer(path)
  assert tok.bos_id == tok.eos_id == hf.token_to_id("<|endoftext|>")
  path, _ = write_hf_tokenizer(tmp_path / "none", ("<sep>",))
  with pytest.raises(data.DataError, match=r"cannot tell the BOS and EOS.*add a tokenizer_config.json") as e:
    data.Tokenizer(path)
  assert "\n" not in str(e.value)
  bad = tmp_path / "bad.json"
  bad.write_text("{not json")
  with pytest.raises(data.DataError, match="not a Hugging Face tokenizer.json"):
    data.Tokenizer(str(bad))


def test_tokenizer_kind_is_told_by_content_without_a_suffix(tmp_path, tokenizer):
  path, _ = write_hf_tokenizer(tmp_path / "hf")
  for source, kind in ((path, "tokenizer.json"), (tokenizer.model_path, "sentencepiece")):
    plain = tmp_path / f"plain_{kind}"
    plain.write_bytes(open(source, "rb").read())
    assert data.Tokenizer(str(plain)).kind == kind


def test_tokenizer_json_run_copy_and_data_pipeline(tmp_path):
  config = {"bos_token": "<s>", "eos_token": "</s>"}
  path, hf = write_hf_tokenizer(tmp_path / "hf", config=config)
  texts = numbered_documents(12)
  cfg = make_data_cfg(tmp_path / "cache", files=write_documents(tmp_path / "docs", texts), seq_len=16, tokenizer=path)
  cfg.eval_fraction, cfg.shuffle = 0.0, False
  workdir = tmp_path / "run"
  tok = data.load_tokenizer(cfg, str(workdir))
  # The run keeps the file under its own suffix, with the config that names its specials.
  assert tok.model_path == str(workdir / "tokenizer.json")
  assert (workdir / "tokenizer.json").read_bytes() == open(path, "rb").read()
  assert json.loads((workdir / "tokenizer_config.json").read_text()) == config
  assert not (workdir / "tokenizer.model").exists()
  # Reference: the tokenizers library's own ids, packed by the naive packer.
  encoded = [hf.encode(t, add_special_tokens=False).ids for t in texts]
  expected = naive_features(naive_rows(encoded, 17, hf.token_to_id("<s>"), hf.token_to_id("</s>")))
  iterator = train_iterator(cfg, tok, 1, seed=0)
  batches = [host(next(iterator)) for _ in range(len(expected["inputs"]))]
  for name in FIELDS:
    np.testing.assert_array_equal(np.concatenate([b[name] for b in batches]), expected[name], err_msg=name)
  cache_ = data.load_token_cache(cfg, tok)
  assert [cache_.tokens(d, 0, int(cache_.doc_length[d])).tolist() for d in range(len(cache_))] == encoded
  # Resuming from the run directory (no data.tokenizer) keeps the tokenizer.json; another file is refused.
  cfg.tokenizer = ""
  assert data.load_tokenizer(cfg, str(workdir)).encode(texts[0]) == encoded[0]
  other, _ = write_hf_tokenizer(tmp_path / "other", ("<s>", "</s>", "<extra>"))
  cfg.tokenizer = other
  with pytest.raises(data.DataError, match="a run keeps its tokenizer"):
    data.load_tokenizer(cfg, str(workdir))


# Weighted mixtures (data/mixture.py) and prepared caches (data/prepared.py)

MIXTURE_WEIGHTS = {"email": 0.6, "json": 0.3, "http": 0.1}


def mixture_cfg(cache_dir, **overrides):
  files = ",".join(f"{w}:{os.path.join(STDLIB, name, '*.py')}" for name, w in MIXTURE_WEIGHTS.items())
  return make_data_cfg(cache_dir, files=files, seq_len=16, eval_fraction=0.2, **overrides)


@pytest.mark.fast
def test_mixture_rows_follow_the_weights_and_read_each_source_in_order(tokenizer, tmp_path):
  from data import mixture

  cfg = mixture_cfg(tmp_path / "cache")
  mixed = token_cache.load_token_cache(cfg, tokenizer)
  assert [(n, w) for n, w, _ in mixed.sources] == list(MIXTURE_WEIGHTS.items())
  rows = pipeline.train_rows(mixed, cfg, tokenizer, seed=3)
  names = list(MIXTURE_WEIGHTS)
  for first in (0, 4321):  # any window of 1,000 rows
    source, _ = mixture.source_rows(np.arange(first, first + 1000), rows.counts, seed=3)
    shares = np.bincount(source, minlength=3) / 1000
    assert np.all(np.abs(shares - np.array(list(MIXTURE_WEIGHTS.values()))) <= 0.02), (first, shares)
  # Over whole blocks each source's rows are read in order, none skipped or repeated.
  source, index = mixture.source_rows(np.arange(3 * mixture.BLOCK_ROWS), rows.counts, seed=3)
  for s, name in enumerate(names):
    assert sorted(index[source == s]) == list(range(3 * round(MIXTURE_WEIGHTS[name] * mixture.BLOCK_ROWS)))
  # Row r is that row of its source's own stream; sources' own held-out documents stay out of training.
  for name, _, source_cache in mixed.sources:
    held = source_cache.held_out(cfg.eval_fraction)
    assert held.any() and not held.all(), name
  for r in (0, 1, 999, 1000, 5000):
    s, j = mixture.source_rows(np.array([r]), rows.counts, seed=3)
    want = rows._rows[int(s[0])][int(j[0])]
    assert all(np.array_equal(rows[r][k], want[k]) for k in want)


@pytest.mark.fast
def test_mixture_batches_are_the_same_for_any_layout_and_resume_exactly(tokenizer, tmp_path):
  cfg = mixture_cfg(tmp_path / "cache")
  one = [host(b) for b, _ in zip(train_iterator(cfg, tokenizer, 8, seed=1), range(4))]
  # Two devices each building their half, as two processes would; then resumed at row 16 (step 2).
  two = [host(b) for b, _ in zip(train_iterator(cfg, tokenizer, 8, seed=1, sharding=batch_sharding((2,))), range(4))]
  resumed = [host(b) for b, _ in zip(train_iterator(cfg, tokenizer, 8, seed=1, start_row=16), range(2))]
  for step in range(4):
    for field in FIELDS:
      np.testing.assert_array_equal(two[step][field], one[step][field])
      if step >= 2:
        np.testing.assert_array_equal(resumed[step - 2][field], one[step][field])
  evals = eval_batches(cfg, tokenizer, 4, 2)
  assert list(evals) == list(MIXTURE_WEIGHTS) and all(1 <= len(b) <= 2 for b in evals.values())


def test_mixture_items_are_checked():
  assert sources.mixture("a/*.txt,b/*.txt") is None
  with pytest.raises(data.DataError, match="has no weight while other items do"):
    sources.mixture("0.5:a/*.txt,b/*.txt")
  with pytest.raises(data.DataError, match="must be above 0"):
    sources.mixture("0:a/*.txt,1:b/*.txt")
  from data import mixture

  with pytest.raises(data.DataError, match="'b'.*never be read"):
    mixture.block_counts([1.0, 1e-4], ["a", "b"])


def prepared_cache(tmp_path):
  """A self-built cache given the manifest scripts/prepare_data.py writes after its pipeline (the same call)."""
  from data import prepared

  files = small_corpus(tmp_path)
  cfg = make_data_cfg(tmp_path / "prep", files=files, seq_len=16, unit_bytes=200, eval_fraction=0.1, vocab_size=300)
  tok = data.load_tokenizer(cfg, None)
  corpus, paths = token_cache.unit_plan(cfg, tok)
  token_cache.load_token_cache(cfg, tok)
  root = str(cache.cache_root(cfg.cache_dir))
  prepared.write_manifest(cfg, tok.model_path, [("", cfg.files, [os.path.relpath(str(p), root) for p in paths])])
  return cfg, tok, paths


@pytest.mark.fast
def test_a_prepared_cache_is_read_without_listing_the_corpus_or_tokenizing(tmp_path, monkeypatch):
  cfg, tok, _ = prepared_cache(tmp_path)
  want = take_rows(train_iterator(cfg, tok, 4, seed=2), 8)
  monkeypatch.setattr(Corpus, "__init__", lambda *a: pytest.fail("listed the corpus of a prepared cache"))
  monkeypatch.setattr(token_cache._Builder, "_build", lambda *a: pytest.fail("tokenized with a prepared cache"))
  assert data.load_tokenizer(cfg, str(tmp_path / "run")).vocab_size == tok.vocab_size
  np.testing.assert_array_equal(take_rows(train_iterator(cfg, tok, 4, seed=2), 8), want)


def test_each_bad_prepared_cache_is_one_line_and_changes_nothing(tmp_path, tokenizer):
  from tests.helpers import tree_snapshot

  cfg, tok, paths = prepared_cache(tmp_path)
  root = cache.cache_root(cfg.cache_dir)

  def refused(cfg, tok, match):
    before = tree_snapshot(root)
    with pytest.raises(data.DataError, match=match) as error:
      data.load_tokenizer(cfg, None)
      token_cache.load_token_cache(cfg, tok)
    assert "\n" not in str(error.value) and "prepare_data.py" in str(error.value)
    assert tree_snapshot(root) == before

  other = cfg.copy_and_resolve_references()
  other.vocab_size = 290
  refused(other, tok, "prepared with data.vocab_size=300, this config has data.vocab_size=290")
  other = cfg.copy_and_resolve_references()
  other.files = EMAIL_GLOB
  refused(other, tok, "prepared with data.files=.*this config has data.files=")
  other = cfg.copy_and_resolve_references()
  other.tokenizer = tokenizer.model_path
  refused(other, tok, "prepared with a tokenizer trained on the corpus.*this config has a given data.tokenizer")
  # A run directory keeps its own tokenizer: a cache tokenized with another one is refused.
  refused(cfg, tokenizer, "tokenized with another tokenizer")
  paths[1].write_bytes(paths[1].read_bytes()[:-3])
  refused(cfg, tok, "not a readable token cache unit")
  paths[1].unlink()
  refused(cfg, tok, r"lacks 1 of its \d+ unit files")
  (root / "prepared.json").write_text("{")
  refused(cfg, tok, "not a readable manifest")


def test_inspect_data_reports_the_trainers_rows(tokenizer, tmp_path, capsys):
  sys.path.insert(0, os.path.join(REPO, "scripts"))
  import inspect_data

  cache_dir = tmp_path / "cache"
  overrides = {**mixture_cfg(cache_dir, tokenizer=tokenizer.model_path), "eval_fraction": 0.2}
  args = [f"--config.data.{k}={overrides[k]}" for k in ("files", "cache_dir", "tokenizer", "seq_len", "eval_fraction")]
  args += ["--config.data.num_workers=0", "--config.train.global_batch_size=8", "--config.train.seed=4"]
  assert inspect_data.main(["--config", os.path.join(REPO, "configs/tiny.py"), *args, "--steps=25", "--rows=1"]) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  # The reference: the trainer's own batches of those 25 steps, their sources read from their tokens.
  cfg = mixture_cfg(cache_dir, tokenizer=tokenizer.model_path)
  batches = [host(b) for b, _ in zip(train_iterator(cfg, tokenizer, 8, seed=4), range(25))]
  segments = np.concatenate([b["segment_ids"] for b in batches])
  assert summary["rows"] == 200
  padding = np.mean(segments == 0)  # the inputs' padding; the script counts the L + 1 tokens of each row
  assert abs(summary["padding_fraction"] - padding) < 0.01
  shares = {name: s["token_share"] for name, s in summary["sources"].items()}
  assert list(shares) == list(MIXTURE_WEIGHTS) and abs(sum(shares.values()) - 1) < 1e-9
  for name, weight in MIXTURE_WEIGHTS.items():
    assert abs(summary["sources"][name]["weight"] - weight) < 1e-9 and abs(shares[name] - weight) < 0.1, name
