"""Settings for a run whose backend is the CPU, made before JAX creates its backends.

XLA:CPU takes each step's temporary buffers (activations, gradients: 1.7 GB for bench_peer) from malloc and frees
them when the step ends. glibc serves a request that large with a fresh mmap and unmaps it on free, so every step
first-touches all of its temporaries again: bench_peer spent 0.67 CPU-s per step in 413k page faults. Two things
make the memory stay and be reused:
- glibc keeps large blocks in its heap and never trims it (`mallopt`: no mmap for large blocks, no trimming), so the
  process's resident memory stays at its peak rather than going back to the OS between steps;
- steps are dispatched synchronously, so each step's temporaries are allocated on the calling thread, in the heap
  the previous step freed them to. With asynchronous dispatch they are allocated on XLA's worker threads, in
  glibc's per-thread arenas, and faulted in again.
With both, the page faults per step drop to a few hundred and bench_peer's fp32 step goes from ~2.2 s to ~1.85 s.

On a GPU or TPU host nothing changes: there the device holds the temporaries.
"""

import ctypes
import importlib.util
import logging
import pkgutil
from importlib import metadata

import jax

_log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def accelerator_installed() -> bool:
  """Whether JAX would find a GPU or TPU plugin (the checks of its own plugin discovery: libtpu, the
  `jax_plugins` namespace package and entry points)."""
  if importlib.util.find_spec("libtpu") is not None:
    return True
  if importlib.util.find_spec("jax_plugins") is not None:
    import jax_plugins

    if any(True for _ in pkgutil.iter_modules(jax_plugins.__path__)):
      return True
  return bool(metadata.entry_points(group="jax_plugins"))


def runs_on_cpu() -> bool:
  """Whether JAX's default backend will be the CPU, decided without creating any backend (a multi-process run
  must not create one before `jax.distributed.initialize`)."""
  platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not accelerator_installed()


def keep_freed_memory() -> bool:
  """glibc: large blocks from the heap, never returned to the OS. False where the C library has no mallopt."""
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):  # not glibc (macOS, musl without mallopt)
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, -1))  # -1: never trim


def prepare() -> bool:
  """On a CPU backend: synchronous dispatch and a heap that keeps freed memory. Call before JAX creates its
  backends (later, the dispatch setting no longer applies). Returns whether it applied them."""
  if not runs_on_cpu():
    return False
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  kept = keep_freed_memory()
  _log.debug("CPU backend: synchronous dispatch; freed memory kept in the heap: %s", kept)
  return True
