"""Small configs, synthetic batches and a few-step runner shared by the tests."""

import os

import jax
import numpy as np

from configs.base import base_config
from data import synthetic
from parallel.mesh import MESH_AXES, make_mesh
from trainer.experiment import build

VOCAB = 200  # a tokenizer's size; the model pads its embedding to a multiple of 128


def small_config(**overrides):
  """A model small enough that a train step compiles in about a second; overrides as {"group.key": value}."""
  c = base_config()
  c.model.num_layers = 2
  c.model.d_model = 32
  c.model.num_heads = 4
  c.model.num_kv_heads = 2
  c.model.mlp_dim = 64
  c.data.seq_len = 16
  c.train.global_batch_size = 8
  c.train.steps = 10
  c.optim.warmup_steps = 2
  c.optim.peak_lr = 1e-2
  c.optim.final_lr = 1e-3
  c.mesh.data = 1
  for key, value in overrides.items():
    group, name = key.split(".", 1)
    if "." in name:
      sub, name = name.split(".")
      c[group][sub][name] = value
    else:
      c[group][name] = value
  return c


def packed_batch(rng: np.random.Generator, batch: int, length: int, docs_per_row: int = 3) -> dict:
  """A synthetic batch over the tests' vocabulary (data.synthetic.packed_batch)."""
  return synthetic.packed_batch(rng, batch, length, VOCAB, docs_per_row)


def run_steps(cfg, batches: list[dict], devices=None):
  """Initialises from cfg.train.seed and runs one train step per batch; returns (losses, final params on host)."""
  exp = build(cfg, VOCAB, mesh_for(cfg, devices))
  state = exp.init_state()
  losses = []
  for batch in batches:
    state, metrics = exp.train_step(state, jax.device_put(batch, exp.batch_sharding), {})
    losses.append(float(metrics["loss"]))
  return np.array(losses), jax.device_get(state.params), exp


def mesh_for(cfg, devices=None):
  """The config's mesh over the first devices it needs (all 8 emulated ones where a size is -1)."""
  if devices is None:
    sizes = [cfg.mesh[axis] for axis in MESH_AXES]
    devices = jax.devices() if -1 in sizes else jax.devices()[: int(np.prod(sizes))]
  return make_mesh(cfg.mesh, devices)


def mini_run_args(workdir, cache_dir, *, steps: int = 12, every: int = 4) -> list[str]:
  """train.py arguments for a seconds-long real run: a few stdlib modules as corpus, a 2-layer model."""
  return ["train.py", "--config", "configs/tiny.py", f"--workdir={workdir}"] + [
    f"--config.{k}={v}" for k, v in mini_run_overrides(cache_dir, steps=steps, every=every).items()
  ]


def mini_run_config(cache_dir, **overrides):
  """configs/tiny.py with the overrides of `mini_run_args` (and `overrides`), for an in-process run."""
  from settings.load import load_config_file

  cfg = load_config_file("configs/tiny.py")
  for key, value in {**mini_run_overrides(cache_dir), **overrides}.items():
    group, name = key.split(".")
    cfg[group][name] = value
  return cfg


def mini_run_overrides(cache_dir, *, steps: int = 12, every: int = 4) -> dict:
  import sysconfig

  stdlib = sysconfig.get_paths()["stdlib"]
  return {
    "data.files": f"{stdlib}/json/*.py,{stdlib}/email/*.py",
    "data.vocab_size": 512,
    "data.cache_dir": str(cache_dir),
    "data.eval_fraction": 0.2,
    "data.seq_len": 32,
    "data.num_workers": 1,
    "model.num_layers": 2,
    "model.d_model": 32,
    "model.num_heads": 2,
    "model.num_kv_heads": 2,
    "model.mlp_dim": 64,
    "model.dropout_rate": 0.1,  # exercises the per-step dropout key on resume
    "train.steps": steps,
    "train.global_batch_size": 4,
    "train.log_every": 1,
    "train.eval_every": 1000,
    "train.eval_batches": 1,
    "optim.warmup_steps": 2,
    "checkpoint.every_steps": every,
    "mesh.data": 1,
  }


def tree_snapshot(directory) -> dict[str, bytes]:
  """Every file under `directory` by relative path, with its bytes: equal snapshots mean nothing changed."""
  snapshot = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        snapshot[os.path.relpath(path, directory)] = f.read()
  return snapshot
