"""Reading Hugging Face safetensors weights lazily (one tensor at a time) and writing them in size-capped shards."""

import contextlib
import json
import os
from collections.abc import Callable, Iterable, Iterator

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from storage.checkpoint import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


@contextlib.contextmanager
def open_weights(hf_dir: str) -> Iterator[tuple[list[str], Callable[[str], np.ndarray]]]:
  """(tensor names, read(name) -> numpy array) over `hf_dir`'s `model.safetensors.index.json` shards or its
  single `model.safetensors`; each read loads only that tensor. CheckpointError (one line) when neither exists
  or a shard is missing or unreadable."""
  index_path, single_path = os.path.join(hf_dir, INDEX), os.path.join(hf_dir, SINGLE)
  if os.path.isfile(index_path):
    try:
      weight_map = json.load(open(index_path))["weight_map"]
    except (ValueError, KeyError) as e:
      raise CheckpointError(f"{index_path} is not a safetensors index ({e}); re-download the checkpoint") from None
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(single_path):
    weight_map, files = None, [SINGLE]
  else:
    raise CheckpointError(f"{hf_dir} has neither {INDEX} nor {SINGLE}; pass --hf_dir a Hugging Face model directory")
  with contextlib.ExitStack() as stack:
    handles = {}
    for name in files:
      path = os.path.join(hf_dir, name)
      if not os.path.isfile(path):
        raise CheckpointError(f"{path} is listed in {INDEX} but missing; re-download the checkpoint")
      try:
        handles[name] = stack.enter_context(safe_open(path, framework="numpy"))
      except Exception as e:  # noqa: BLE001
        raise CheckpointError(f"cannot read {path} as safetensors ({str(e).splitlines()[0][:200]})") from None
    if weight_map is None:
      weight_map = {key: SINGLE for key in handles[SINGLE].keys()}

    def read(name: str) -> np.ndarray:
      if name not in weight_map:
        raise CheckpointError(f"{hf_dir} has no tensor {name!r}, which the config implies; is config.json its own?")
      return handles[weight_map[name]].get_tensor(name)

    yield sorted(weight_map), read


def write_sharded(
  out_dir: str, tensors: Iterable[tuple[str, Callable[[], np.ndarray], tuple, np.dtype]], max_shard_bytes: int
) -> list[str]:
  """Writes (name, make array, shape, dtype) tensors as `model.safetensors`, or as `model-0000i-of-0000n`
  shards of at most `max_shard_bytes` (a larger single tensor gets a shard of its own) plus the index. Only one
  shard's arrays exist at a time. Returns the file names written."""
  tensors = list(tensors)
  shards: list[list] = [[]]
  shard_bytes = 0
  for entry in tensors:
    size = int(np.prod(entry[2])) * entry[3].itemsize
    if shards[-1] and shard_bytes + size > max_shard_bytes:
      shards.append([])
      shard_bytes = 0
    shards[-1].append(entry)
    shard_bytes += size
  names = (
    [SINGLE]
    if len(shards) == 1
    else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  )
  weight_map, total = {}, 0
  for file_name, shard in zip(names, shards):
    arrays = {}
    for name, make, shape, dtype in shard:
      array = make()
      assert array.shape == shape and array.dtype == dtype, (name, array.shape, shape, array.dtype, dtype)
      arrays[name] = array
      weight_map[name] = file_name
      total += array.nbytes
    # transformers refuses safetensors files without this metadata.
    save_file(arrays, os.path.join(out_dir, file_name), metadata={"format": "pt"})
  if len(shards) > 1:
    with open(os.path.join(out_dir, INDEX), "w") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    names.append(INDEX)
  return names
