"""The device mesh: axes `stage, data, fsdp, expert, context, tensor` (outermost first), sizes from `config.mesh`."""

import math

import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh

# `context` splits the sequence (parallel/context.py); inside tensor, so a ring step is a neighbour's transfer when
# tensor = 1, and beside it, so tensor keeps the innermost (fastest) links.
MESH_AXES = ("stage", "data", "fsdp", "expert", "context", "tensor")


class MeshError(ValueError):
  """A mesh that does not fit the devices, or a dimension that does not divide its mesh axis."""


def mesh_shape(mesh_cfg, num_devices: int) -> dict[str, int]:
  """Resolves `config.mesh` to {axis: size} over all slices; -1 on one axis takes the remaining devices."""
  dcn = {a: mesh_cfg[f"dcn_{a}"] for a in MESH_AXES}
  ici = {a: mesh_cfg[a] for a in MESH_AXES}
  for a in MESH_AXES:
    if ici[a] == 0 or ici[a] < -1 or dcn[a] < 1:
      raise MeshError(f"config.mesh.{a}={ici[a]} (dcn_{a}={dcn[a]}) is not a valid size; use a positive size or -1")
  fill = [a for a in MESH_AXES if ici[a] == -1]
  if len(fill) > 1:
    raise MeshError(f"config.mesh has -1 on {', '.join(fill)}; at most one axis may fill the remaining devices")
  fixed = math.prod(ici[a] for a in MESH_AXES if ici[a] != -1) * math.prod(dcn.values())
  if fill:
    if num_devices % fixed:
      raise MeshError(
        f"the fixed mesh axes multiply to {fixed}, which does not divide the {num_devices} devices; "
        "change config.mesh so the sizes divide the device count"
      )
    ici[fill[0]] = num_devices // fixed
  shape = {a: ici[a] * dcn[a] for a in MESH_AXES}
  if math.prod(shape.values()) != num_devices:
    sizes = " x ".join(f"{a}={n}" for a, n in shape.items() if n > 1) or "1"
    raise MeshError(
      f"config.mesh ({sizes}) covers {math.prod(shape.values())} devices but there are {num_devices}; "
      "make the product of the axis sizes equal the device count, or set one axis to -1"
    )
  return shape


def _blocks_as_slices(ici: list[int], dcn: list[int], devices: list) -> np.ndarray:
  """The hybrid mesh's layout when devices carry no `slice_index`: slice k is devices [k * n, (k + 1) * n) for
  n = prod(ici), and each axis is its dcn factor (outer) times its ici factor (inner)."""
  n = len(ici)
  blocks = np.array(devices, dtype=object).reshape(*dcn, *ici)
  return blocks.transpose([x for a in range(n) for x in (a, n + a)]).reshape([d * i for d, i in zip(dcn, ici)])


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """Builds the mesh; with any `dcn_<axis>` > 1, a hybrid mesh whose outer factor spans slices (multi-slice)."""
  devices = list(devices if devices is not None else jax.devices())
  shape = mesh_shape(mesh_cfg, len(devices))
  dcn = [mesh_cfg[f"dcn_{a}"] for a in MESH_AXES]
  if math.prod(dcn) > 1:
    ici = [shape[a] // d for a, d in zip(MESH_AXES, dcn)]
    if all(hasattr(d, "slice_index") for d in devices):
      device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    else:  # emulated devices (CPU) have no slices: take consecutive blocks of devices as the slices
      device_array = _blocks_as_slices(ici, dcn, devices)
  else:
    try:
      device_array = mesh_utils.create_device_mesh([shape[a] for a in MESH_AXES], devices)
    except (ValueError, NotImplementedError, AssertionError):
      device_array = np.array(devices).reshape([shape[a] for a in MESH_AXES])
  return Mesh(device_array, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))
