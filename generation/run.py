"""A run directory (or an export) made ready to decode: its tokenizer, model and parameters on one device.

The run is opened by storage/run.py, which rebuilds the model as training built it. The mesh has every axis
of size 1, so the logical axes of the parameters and the KV cache are annotated as in training and map to a
single device.
"""

import dataclasses
import sys

import jax
import ml_collections
import numpy as np
from jax.sharding import AxisType, Mesh

from data.tokenizer import Tokenizer
from generation.decoding import Decoder
from model import quant
from parallel.mesh import MESH_AXES
from parallel.rules import DEFAULT_RULES, parse_rules
from settings import ConfigError
from storage.checkpoint import CheckpointError
from storage.run import open_run


@dataclasses.dataclass
class LoadedRun:
  cfg: ml_collections.ConfigDict
  tokenizer: Tokenizer
  decoder: Decoder
  params: dict
  source: str  # the checkpoint or export the parameters came from
  quantize: str | None = None  # int8 | int4: the projections' weights as the devices hold them (model/quant.py)
  params_bytes_per_device: int = 0


def one_device_mesh() -> Mesh:
  devices = np.array(jax.devices()[:1]).reshape((1,) * len(MESH_AXES))
  return Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def load_run(
  workdir: str,
  checkpoint: str | None = None,
  *,
  compute_dtype: str | None = None,
  quantize: str | None = None,
  group_size: int = 128,
  mesh: Mesh | None = None,
) -> LoadedRun:
  """Config, tokenizer, decoder and parameters of a run, on `mesh` (default one device); bad input raises a
  one-line ConfigError, DataError or CheckpointError. `quantize` (int8 | int4, int4 in groups of `group_size`
  inputs): the projections' weights are quantized once loaded, and the device holds only the quantized ones. A
  quantized export (scripts/export_params.py --quantize) loads quantized as it was saved; asking for another
  quantization of it is an error."""
  run = open_run(workdir, checkpoint, compute_dtype=compute_dtype)
  tokenizer = Tokenizer(run.tokenizer_path)
  # Rules of runs made before a logical name existed fall back to its default.
  rules = {**parse_rules(DEFAULT_RULES), **parse_rules(run.cfg.mesh.rules)}
  decoder = Decoder(run.model_cfg, tokenizer.vocab_size, mesh or one_device_mesh(), rules)
  saved = quant.saved_quantization(run.source)
  if saved is not None:
    if quantize and (quantize, group_size if quantize == "int4" else 0) != (saved["mode"], saved["group_size"]):
      raise CheckpointError(
        f"{run.source} is an export quantized as {saved['mode']}; load it without --quantize (or with the same "
        "settings), or quantize the full-precision run instead"
      )
    abstract = quant.abstract_quantized(decoder.abstract_sharded_params(), saved["mode"], saved["group_size"])
    params, quantize = run.load_params(abstract), saved["mode"]
  else:
    params = run.load_params(decoder.abstract_sharded_params())
    if quantize:
      try:
        params = quant.quantize_params(params, quantize, group_size)
      except ValueError as e:
        raise ConfigError(str(e)) from None
  return LoadedRun(
    cfg=run.cfg, tokenizer=tokenizer, decoder=decoder, params=params, source=run.source, quantize=quantize or None,
    params_bytes_per_device=quant.bytes_per_device(params),
  )  # fmt: skip


def report_quantization(loaded: LoadedRun) -> None:
  """One stderr line: how the weights are held and their bytes per device (stdout stays the script's output)."""
  if loaded.quantize:
    print(
      f"weights: projections {loaded.quantize}, {loaded.params_bytes_per_device / 2**20:.2f} MiB of parameters "
      "per device",
      file=sys.stderr,
    )
