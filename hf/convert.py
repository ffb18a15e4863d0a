"""Hugging Face directory <-> kiln run directory, end to end (scripts/convert_hf.py is the command line).

Import never holds more than kiln's parameter tree plus one Hugging Face tensor: weights are read one tensor
at a time into preallocated stacked arrays, which orbax then writes. Export holds the restored tree plus one
shard. Both write into `<out>.partial` and rename it at the end, so a failure leaves no half-written `out`.
"""

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from configs.base import base_config
from hf.config import architecture, export_family, hf_config, kiln_fields
from hf.safetensors_io import open_weights, write_sharded
from hf.weights import fill_params, hf_tensors, tensor_map
from model.params import abstract_model
from parallel.partition import with_shardings
from settings.validate import validate
from storage.checkpoint import CheckpointError, load_params
from storage.run import model_config, read_run_config

TOKENIZER_FILES = (
  "tokenizer.json",
  "tokenizer.model",
  "tokenizer_config.json",
  "special_tokens_map.json",
  "generation_config.json",
)
# The imported checkpoint's own config.json, kept in the run: export takes from it what the weights do not
# determine (context length, special token ids, init range).
HF_CONFIG_COPY = "hf_config.json"
_KEPT_HF_FIELDS = ("max_position_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
# Buffers some checkpoints carry that kiln computes instead.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _check_new(out: str) -> None:
  if os.path.exists(out):
    raise CheckpointError(f"{out} exists; pass an --out that does not, so nothing is overwritten")


def _read_json(path: str, what: str) -> dict[str, Any]:
  if not os.path.isfile(path):
    raise CheckpointError(f"{path} does not exist; {what}")
  try:
    return json.load(open(path))
  except ValueError as e:
    raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def kiln_config(hf: dict[str, Any]) -> ml_collections.ConfigDict:
  """base_config() with the model, moe and data fields of a Hugging Face config."""
  cfg = base_config()
  fields = kiln_fields(hf)
  for group in ("model", "moe", "data"):
    cfg[group].update(fields[group])
  cfg.data.seq_len = min(cfg.data.seq_len, hf.get("max_position_embeddings") or cfg.data.seq_len)
  return cfg


def import_hf(hf_dir: str, out: str, dtype: str = "float32") -> dict[str, Any]:
  """Writes the kiln run directory `out` (config.json, params/, tokenizer files) of the Hugging Face model in
  `hf_dir`; returns a summary. ConfigError / CheckpointError (one line) for what cannot be converted."""
  _check_new(out)
  hf = _read_json(os.path.join(hf_dir, "config.json"), "pass --hf_dir a Hugging Face model directory")
  cfg = kiln_config(hf)
  if dtype != "float32":
    cfg.model.param_dtype, cfg.model.allow_low_precision_params = dtype, True
  validate(cfg)
  model_cfg = model_config(cfg, cfg.data.vocab_size)
  family = architecture(hf)
  _, abstract, _ = abstract_model(model_cfg)
  np_dtype = np.dtype(jax.numpy.dtype(dtype))
  params = jax.tree.map(lambda s: np.zeros(s.shape, np_dtype), abstract)
  tensors = tensor_map(model_cfg, family)
  with open_weights(hf_dir) as (names, read):
    fill_params(tensors, params, lambda name: read(name).astype(np_dtype), CheckpointError)
    used = {t.hf_name for t in tensors}
    if model_cfg.tie_embeddings:
      used.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
    unused = [n for n in names if n not in used and not n.endswith(_IGNORED_SUFFIXES)]
  if unused:
    raise CheckpointError(
      f"{hf_dir} has {len(unused)} tensors this config does not use (first: {unused[0]}); kiln cannot import it"
    )
  partial = out.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(os.path.abspath(os.path.join(partial, "params")), {"params": params})
  copied = _copy_tokenizer_files(hf_dir, partial)
  shutil.copy(os.path.join(hf_dir, "config.json"), os.path.join(partial, HF_CONFIG_COPY))
  for name in ("tokenizer.json", "tokenizer.model"):
    if name in copied:
      cfg.data.tokenizer = os.path.abspath(os.path.join(out, name))
      break
  with open(os.path.join(partial, "config.json"), "w") as f:
    f.write(cfg.to_json_best_effort(indent=2, sort_keys=True))
  with open(os.path.join(partial, "config.py"), "w") as f:
    f.write(_CONFIG_PY)
  os.rename(partial, out)
  count = sum(x.size for x in jax.tree.leaves(params))
  return {"family": family, "params": count, "tokenizer_files": copied, "out": out}


# A config file for train.py: this run's config.json, starting from its parameters.
_CONFIG_PY = '''"""Fine-tune the imported model: python train.py --config <this file> [--config.<group>.<key>=...]"""

import json
import os

import ml_collections


def get_config():
  here = os.path.dirname(os.path.abspath(__file__))
  cfg = ml_collections.ConfigDict(json.load(open(os.path.join(here, "config.json"))))
  cfg.checkpoint.init_from = here
  return cfg
'''


def _copy_tokenizer_files(source: str, dest: str) -> list[str]:
  copied = []
  for name in TOKENIZER_FILES:
    if os.path.isfile(os.path.join(source, name)):
      shutil.copy(os.path.join(source, name), os.path.join(dest, name))
      copied.append(name)
  return copied


def _params_dir(run: str) -> str:
  """The latest `run/checkpoints/<step>/state`, else `run/params` (an import or an export_params output)."""
  root = os.path.join(run, "checkpoints")
  steps = sorted(int(n) for n in os.listdir(root) if n.isdigit()) if os.path.isdir(root) else []
  for candidate in ([os.path.join(root, str(steps[-1]), "state")] if steps else []) + [os.path.join(run, "params")]:
    if os.path.isdir(candidate):
      return candidate
  raise CheckpointError(f"{run} holds no checkpoints/<step>/state and no params/; pass --to_hf a kiln run directory")


def export_hf(run: str, out: str, dtype: str | None = None, max_shard_bytes: int = 5 << 30) -> dict[str, Any]:
  """Writes the Hugging Face directory `out` (config.json, safetensors, tokenizer files) of the kiln run `run`;
  `dtype` None keeps the stored dtype. Returns a summary (with `notes` on what Hugging Face does differently)."""
  _check_new(out)
  _read_json(os.path.join(run, "config.json"), "pass --to_hf a kiln run directory")  # a readable config.json
  cfg = read_run_config(run, "--to_hf")
  state_dir = _params_dir(run)
  try:
    stored = ocp.StandardCheckpointer().metadata(state_dir).item_metadata.tree["params"]
    vocab = stored["embed_VxD"].shape[0]
  except Exception as e:  # noqa: BLE001
    raise CheckpointError(f"cannot read the parameters in {state_dir} ({str(e).splitlines()[0][:200]})") from None
  model_cfg = model_config(cfg, vocab)
  family = export_family(model_cfg)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  _, abstract, _ = abstract_model(model_cfg)
  abstract = with_shardings(abstract, jax.tree.map(lambda _: device, abstract))
  params, _ = load_params(run, abstract)  # the same choice of checkpoint as `_params_dir`
  params = jax.tree.map(np.asarray, params)
  out_dtype = np.dtype(jax.numpy.dtype(dtype)) if dtype else np.dtype(model_cfg.weight_dtype)
  extra = {}
  for name in ("generation_config.json", HF_CONFIG_COPY):  # the second wins
    path = os.path.join(run, name)
    if os.path.isfile(path):
      extra.update({k: v for k, v in _read_json(path, "").items() if k in _KEPT_HF_FIELDS})
  hf = hf_config(model_cfg, dtype=str(out_dtype), extra=extra)
  entries = [
    (name, lambda make=make: make().astype(out_dtype), shape, out_dtype)
    for name, make, shape, _ in hf_tensors(tensor_map(model_cfg, family), params)
  ]
  partial = out.rstrip("/") + ".partial"
  shutil.rmtree(partial, ignore_errors=True)
  os.makedirs(partial)
  files = write_sharded(partial, entries, max_shard_bytes)
  with open(os.path.join(partial, "config.json"), "w") as f:
    json.dump(hf, f, indent=2, sort_keys=True)
  copied = _copy_tokenizer_files(run, partial)
  os.rename(partial, out)
  notes = []
  if model_cfg.num_experts > 0 and model_cfg.capacity_factor > 0:
    notes.append(
      f"this run routed with moe.capacity_factor={model_cfg.capacity_factor} (tokens over capacity dropped); "
      "Hugging Face routes every token, so logits can differ where the run dropped tokens"
    )
  return {"family": family, "files": files + copied, "out": out, "notes": notes}
