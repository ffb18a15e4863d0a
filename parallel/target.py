"""The target a program is compiled for: its platform, chips and their memory, resolved once per run.

A run's target is the devices it runs on. `--dry_run --topology NAME` makes it a TPU slice that is not attached:
libtpu (installed with `jax[tpu]` on any x86 Linux machine) describes the slice's devices, and the train step is
compiled for them by the TPU compiler, as MaxText's train_compile does. Every per-platform choice (what
`model.attention=auto` stands for, the CPU-only backward passes, the MoE dropless exchange) follows the
target's platform, never `jax.default_backend()`, so a program compiled for a TPU from a CPU host takes the TPU's
code paths.

TPU names come in two forms:
- JAX's, `FAMILY:AxB[xC]` in chips: `v5p:4x4x4`, `v5e:4x4`, `v6e:16x16`, `v4:2x2x4`;
- Cloud TPU's, `FAMILY-N`: v4 and v5p names count TensorCores (two per chip, run as one "megacore" device:
  `v5p-128` is 64 chips, 4x4x4), v5e and v6e names count chips (`v5litepod-16` is 16 chips, 4x4).
A slice is described as the real one is: chips per host, and torus wraparound where the hardware has it
(v4/v5p slices whose every side is a multiple of 4; v5e/v6e sides of 16, the full pod).
"""

import dataclasses
import math
import os
import re

import jax
from jax.experimental import topologies


class TargetError(ValueError):
  """A topology name that does not describe a TPU slice, or a TPU compiler that is not installed."""


@dataclasses.dataclass(frozen=True)
class TpuFamily:
  jax_name: str  # the family's prefix in libtpu's topology names
  device_kind: str
  hbm_bytes: int  # per chip
  dims: int  # 3: a 3-D torus of megacore chips (v4, v5p); 2: a 2-D grid of single-core chips (v5e, v6e)
  cloud_name: str  # Cloud TPU's accelerator-type prefix


_GIB = 1 << 30
TPU_FAMILIES = {
  "v4": TpuFamily("v4", "TPU v4", 32 * _GIB, 3, "v4"),
  "v5p": TpuFamily("v5", "TPU v5", 95 * _GIB, 3, "v5p"),
  "v5e": TpuFamily("v5e", "TPU v5 lite", 16 * _GIB, 2, "v5litepod"),
  "v6e": TpuFamily("v6e", "TPU v6 lite", 32 * _GIB, 2, "v6e"),
}
# Other spellings of a family in either form.
_ALIASES = {"v5": "v5p", "v5litepod": "v5e", "v5lite": "v5e", "v6": "v6e"}


@dataclasses.dataclass(frozen=True)
class Target:
  """Where a program runs, or is compiled to run: `devices` are live devices or a TPU slice's descriptions."""

  platform: str  # cpu | gpu | tpu
  device_kind: str
  devices: tuple
  topology: str | None = None  # JAX's name of a compile-only TPU slice; None for live devices
  slices: int = 1
  hbm_bytes_per_chip: int | None = None  # None where unknown (CPU: host memory)

  @property
  def chips(self) -> int:
    return len(self.devices)

  def describe(self) -> dict:
    """plan.json's `target` entry, before the compiled program's bytes are added."""
    return {
      "platform": self.platform,
      "device_kind": self.device_kind,
      "topology": self.topology,
      "chips": self.chips,
      "num_slices": self.slices,
      "hbm_bytes_per_chip": self.hbm_bytes_per_chip,
    }


def live_target(devices=None) -> Target:
  """The target of a run on `devices` (default all of JAX's): the first device's platform and memory."""
  devices = tuple(devices if devices is not None else jax.devices())
  first = devices[0]
  hbm = None
  if first.platform != "cpu":
    try:
      hbm = (first.memory_stats() or {}).get("bytes_limit")
    except Exception:  # a device without stats (some plugins): unknown, not an error
      hbm = None
  return Target(first.platform, first.device_kind, devices, slices=_slice_count(devices), hbm_bytes_per_chip=hbm)


def mesh_platform(mesh) -> str:
  """The platform of the devices a mesh is laid over: the target's, for a topology's device descriptions too."""
  return mesh.devices.flat[0].platform


@dataclasses.dataclass(frozen=True)
class TpuSlice:
  family: str  # a key of TPU_FAMILIES
  shape: tuple[int, ...]  # chips along each side

  @property
  def spec(self) -> TpuFamily:
    return TPU_FAMILIES[self.family]

  @property
  def chips(self) -> int:
    return math.prod(self.shape)

  @property
  def jax_name(self) -> str:
    return f"{self.spec.jax_name}:{'x'.join(map(str, self.shape))}"

  @property
  def cloud_name(self) -> str:
    cores = self.chips * (2 if self.spec.dims == 3 else 1)
    return f"{self.spec.cloud_name}-{cores}"

  @property
  def wrap(self) -> tuple[bool, bool, bool]:
    """Which sides close into a ring (torus links), as in the real slice."""
    if self.spec.dims == 3:
      return (all(side % 4 == 0 for side in self.shape),) * 3
    return tuple(side == 16 for side in self.shape) + (False,)

  @property
  def chips_per_host(self) -> tuple[int, int, int]:
    """A host's chips along each side: 2 x 2 (fewer on a smaller slice)."""
    x, y = self.shape[0], self.shape[1]
    return (min(x, 2), min(y, 2), 1)


def parse_tpu_name(name: str) -> TpuSlice:
  """A TPU slice from JAX's (`v5p:4x4x4`) or Cloud TPU's (`v5p-128`) name; TargetError naming the forms otherwise."""
  text = name.strip().lower()
  m = re.fullmatch(r"([a-z0-9]+):(\d+(?:x\d+)*)", text)
  if m:
    family = _family(m.group(1), name)
    shape = tuple(int(s) for s in m.group(2).split("x"))
    if len(shape) == 2 and TPU_FAMILIES[family].dims == 3:
      shape = (*shape, 1)
    if len(shape) != TPU_FAMILIES[family].dims or min(shape) < 1:
      raise TargetError(
        f"--topology {name}: a {family} slice has {TPU_FAMILIES[family].dims} sides, e.g. "
        f"{_example(family)}; give one size per side"
      )
    return TpuSlice(family, shape)
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", text)
  if m:
    family = _family(m.group(1), name)
    count = int(m.group(2))
    spec = TPU_FAMILIES[family]
    chips = count // 2 if spec.dims == 3 else count
    if chips < 1 or chips & (chips - 1) or (spec.dims == 3 and count % 2):
      raise TargetError(
        f"--topology {name}: {count} is not a power-of-two slice of {family}; name the shape instead, e.g. "
        f"{_example(family)}"
      )
    return TpuSlice(family, _default_shape(chips, spec.dims))
  raise TargetError(
    f"--topology {name!r} is not a TPU name; use JAX's form (v5p:4x4x4, v5e:4x4, v6e:16x16, v4:2x2x4) or Cloud "
    "TPU's (v5p-128, v5litepod-16, v6e-256, v4-32)"
  )


def _family(prefix: str, name: str) -> str:
  family = _ALIASES.get(prefix, prefix)
  if family not in TPU_FAMILIES:
    raise TargetError(f"--topology {name}: unknown TPU family {prefix!r}; use one of {', '.join(TPU_FAMILIES)}")
  return family


def _example(family: str) -> str:
  return {"v4": "v4:2x2x4", "v5p": "v5p:4x4x4", "v5e": "v5e:4x4", "v6e": "v6e:16x16"}[family]


def _default_shape(chips: int, dims: int) -> tuple[int, ...]:
  """The shape Cloud TPU gives a slice of `chips` (a power of two): from one chip (and 2x2x1 for 3-D slices of 4
  or more), the last of the smallest sides doubles until the count is reached, e.g. 2x2x4 -> 2x4x4 -> 4x4x4."""
  shape = [1] * dims
  if dims == 3 and chips >= 4:
    shape = [2, 2, 1]
  while math.prod(shape) < chips:
    smallest = min(shape)
    last = max(i for i, side in enumerate(shape) if side == smallest)
    shape[last] *= 2
  return tuple(shape)


def tpu_target(name: str, num_slices: int = 1) -> Target:
  """The devices of `num_slices` TPU slices named `name`, described by libtpu with no TPU attached."""
  tpu = parse_tpu_name(name)
  if num_slices < 1:
    raise TargetError(f"--num_slices={num_slices}: give 1 or more slices")
  # libtpu probes the cloud metadata server and the accelerator type on load; the slice is described here, so
  # it must not look for hardware. Nor does it hold a TPU: other processes may load libtpu at the same time
  # (by default the first one locks it).
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
  os.environ.setdefault("TPU_ACCELERATOR_TYPE", tpu.cloud_name)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")  # else libtpu logs that it found no TPU workers
  try:
    description = topologies.get_topology_desc(
      platform="tpu",
      topology_name=tpu.jax_name,
      chip_config_name="megacore" if tpu.spec.dims == 3 else "default",
      chips_per_host_bounds=tpu.chips_per_host,
      num_slices=num_slices,
      wrap=tpu.wrap,
    )
  except Exception as e:  # no libtpu, or a slice it cannot build: its own first line, and where libtpu comes from
    message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise TargetError(
      f"--topology {name}: libtpu could not describe the slice ({message}); the TPU compiler comes with "
      "pip install -r requirements-dev.txt (jax[tpu])"
    ) from None
  devices = tuple(description.devices)
  return Target(
    "tpu",
    devices[0].device_kind,
    devices,
    topology=tpu.jax_name,
    slices=num_slices,
    hbm_bytes_per_chip=tpu.spec.hbm_bytes,
  )


def _slice_count(devices) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})
