"""A run directory (or an export) made ready to decode: its tokenizer, model and parameters on one device.

The run is opened by storage/run.py, which rebuilds the model as training built it. The mesh has every axis
of size 1, so the logical axes of the parameters and the KV cache are annotated as in training and map to a
single device.
"""

import dataclasses

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh

from data.tokenizer import Tokenizer
from generation.decoding import Decoder
from parallel.mesh import MESH_AXES
from parallel.rules import DEFAULT_RULES, parse_rules
from storage.run import open_run


@dataclasses.dataclass
class LoadedRun:
  cfg: ml_collections.ConfigDict
  tokenizer: Tokenizer
  decoder: Decoder
  params: dict
  source: str  # the checkpoint or export the parameters came from


def one_device_mesh() -> Mesh:
  devices = np.array(jax.devices()[:1]).reshape((1,) * len(MESH_AXES))
  return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def load_run(
  workdir: str, checkpoint: str | None = None, *, compute_dtype: str | None = None, mesh: Mesh | None = None
) -> LoadedRun:
  """Config, tokenizer, decoder and parameters of a run, on `mesh` (default one device); bad input raises a
  one-line ConfigError, DataError or CheckpointError."""
  run = open_run(workdir, checkpoint, compute_dtype=compute_dtype)
  tokenizer = Tokenizer(run.tokenizer_path)
  # Rules of runs made before a logical name existed fall back to its default.
  rules = {**parse_rules(DEFAULT_RULES), **parse_rules(run.cfg.mesh.rules)}
  decoder = Decoder(run.model_cfg, tokenizer.vocab_size, mesh or one_device_mesh(), rules)
  params = run.load_params(decoder.abstract_sharded_params())
  return LoadedRun(cfg=run.cfg, tokenizer=tokenizer, decoder=decoder, params=params, source=run.source)
