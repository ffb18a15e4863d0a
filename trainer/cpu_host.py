"""Settings for a run whose backend is the CPU, made before JAX creates its backends.

XLA:CPU takes each step's temporary buffers (activations, gradients: 1.7 GB for bench_peer) from malloc and frees
them when the step ends. glibc serves a request that large with a fresh mmap and unmaps it on free, so every step
first-touches all of its temporaries again: bench_peer spent 0.67 CPU-s per step in 413k page faults. Three things
make the memory stay and be reused:
- glibc keeps large blocks in its heap and never trims it (`mallopt`: no mmap for large blocks, no trimming), so the
  process's resident memory stays at its peak rather than going back to the OS between steps;
- one heap (arena) for all threads. A thread other than the main one allocates from its own arena, which serves
  any block over 64 MB by mmap whatever the first setting says, and unmaps it on free. XLA's worker threads make
  such blocks (operand scratch of the large matmuls) in some runs and not in others, depending on which thread
  first runs what: those runs of bench_peer faulted 160 MB in per step (40k faults, 1.90 against 1.65 s). glibc
  hands a new thread an existing arena, so this holds only if it is set before any thread has allocated: before
  JAX is imported (`prepare_heap`). The cost is compile time, whose threads now share one heap (bench_peer
  about 1.7 -> 2.5 s, once per run);
- steps are dispatched synchronously, so each step's temporaries are allocated on the calling thread, in the heap
  the previous step freed them to, not on a worker thread.
With all three, the page faults per step drop to a few hundred or none.

On a GPU or TPU host nothing changes: there the device holds the temporaries.
"""

import ctypes
import glob
import importlib.util
import logging
import os
import pkgutil
import sys
from importlib import metadata

_log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8


# Device files by which libtpu finds TPU chips: v4 and v5e VMs have /dev/accel*, v5p and v6e /dev/vfio/N.
_TPU_DEVICE_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*")


def accelerator_attached() -> bool:
  """Whether JAX would find a GPU or TPU (the checks of JAX's own plugin discovery: libtpu, the `jax_plugins`
  namespace package and entry points). libtpu counts only with TPU chips attached: it is installed on CPU
  machines too, to compile for TPUs (`--dry_run --topology`). A GPU plugin counts as installed."""
  if importlib.util.find_spec("libtpu") is not None and any(glob.glob(p) for p in _TPU_DEVICE_FILES):
    return True
  if importlib.util.find_spec("jax_plugins") is not None:
    import jax_plugins

    if any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
      return True
  return bool(metadata.entry_points(group="jax_plugins"))


def runs_on_cpu() -> bool:
  """Whether JAX's default backend will be the CPU, decided without creating any backend (a multi-process run
  must not create one before `jax.distributed.initialize`). Before JAX is imported, JAX_PLATFORMS says."""
  jax = sys.modules.get("jax")
  platforms = jax.config.jax_platforms if jax is not None else os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not accelerator_attached()


def keep_freed_memory() -> bool:
  """glibc: large blocks from the heap, one heap for every thread, never returned to the OS. False where the C
  library has no mallopt. Threads that have allocated before keep their own heap: call it before JAX starts any."""
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  settings = ((_M_MMAP_MAX, 0), (_M_ARENA_MAX, 1), (_M_TRIM_THRESHOLD, -1))  # -1: never trim
  return all([bool(mallopt(param, value)) for param, value in settings])


def prepare_heap() -> bool:
  """On a CPU backend: the heap settings, made before JAX is imported (its import starts a thread). The first
  thing an entry point does. Returns whether it applied them."""
  return runs_on_cpu() and keep_freed_memory()


def prepare() -> bool:
  """On a CPU backend: the CPU platform alone, synchronous dispatch and a heap that keeps freed memory (the single
  heap only if `prepare_heap` ran before JAX's import). Call before JAX creates its backends (later, the dispatch
  setting no longer applies). Returns whether it applied them."""
  if not runs_on_cpu():
    return False
  import jax

  # No accelerator is attached: JAX must not try an installed plugin (libtpu probes for a TPU and logs errors).
  jax.config.update("jax_platforms", "cpu")
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  kept = keep_freed_memory()
  _log.debug("CPU backend: synchronous dispatch; freed memory kept in the heap: %s", kept)
  return True
