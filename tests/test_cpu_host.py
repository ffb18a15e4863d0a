"""A CPU run's steps reuse their host memory (trainer/cpu_host.py): repeated steps touch no new pages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# As train.py starts (the heap settings before JAX's import, then the dispatch setting), a "step" with a 64 MiB
# temporary (the barrier keeps XLA from fusing it away), run until warm, then the minor page faults of 4 more runs.
# Each fault is one 4 KiB page touched for the first time. Warm means the heap has reached its high-water mark:
# jax 0.10.2 got there within 3 runs; with jax 0.11.2 and 0.12.0.1 up to 3 of the first 12 runs grew the heap (brk)
# by a whole temporary and faulted it in, and none did after.
_STEPS = """
import json, resource, sys
sys.path.insert(0, {repo!r})
from trainer import cpu_host
heap = cpu_host.prepare_heap() if {prepare} else False
import jax, jax.numpy as jnp
applied = heap and cpu_host.prepare()
step = jax.jit(lambda x: jnp.sum(jax.lax.optimization_barrier(jnp.sin(x)) * x))
x = jnp.ones((4096, 4096), jnp.float32)
for _ in range(16):
  step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  step(x).block_until_ready()
print(json.dumps({{"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}}))
"""


# As train.py starts: the heap settings, then JAX's import and a computation on XLA's worker threads; then the
# number of glibc heaps (arenas) in the process, from malloc_info's XML.
_HEAPS = """
import ctypes, json, sys, tempfile
sys.path.insert(0, {repo!r})
from trainer import cpu_host
applied = cpu_host.prepare_heap() if {prepare} else False
import jax, jax.numpy as jnp
jax.jit(lambda x: (x @ x).sum())(jnp.ones((512, 512))).block_until_ready()
libc = ctypes.CDLL(None)
libc.fopen.restype, libc.fopen.argtypes = ctypes.c_void_p, (ctypes.c_char_p, ctypes.c_char_p)
libc.malloc_info.argtypes, libc.fclose.argtypes = (ctypes.c_int, ctypes.c_void_p), (ctypes.c_void_p,)
path = tempfile.mkstemp()[1]
report = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, report)
libc.fclose(report)
print(json.dumps({{"applied": applied, "heaps": open(path).read().count("<heap nr=")}}))
"""


def _run(prepare: bool, script: str = _STEPS) -> dict:
  # No allocator settings from the caller's environment: the plain run must show glibc's defaults.
  env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
  code = script.format(repo=str(REPO), prepare=prepare)
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**env, "JAX_PLATFORMS": "cpu"}
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.fast
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_steps_reuse_their_memory():
  plain, prepared = _run(prepare=False), _run(prepare=True)
  pages_per_step = 64 * 2**20 // 4096
  # Without the settings every run faults its temporary in again; with them, (almost) nothing.
  assert plain["faults"] >= 4 * pages_per_step * 0.9, plain
  assert prepared["applied"] and prepared["faults"] < pages_per_step / 4, prepared


@pytest.mark.fast
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_info")
def test_every_thread_allocates_from_one_heap():
  """A thread with a heap of its own gets blocks over 64 MB by mmap and unmaps them on free, whatever M_MMAP_MAX
  says: XLA's worker threads must share the main heap, which prepare_heap() (before JAX's import) arranges."""
  plain, prepared = _run(prepare=False, script=_HEAPS), _run(prepare=True, script=_HEAPS)
  assert plain["heaps"] > 1, plain  # the control: glibc's default gives threads heaps of their own
  assert prepared["applied"] and prepared["heaps"] == 1, prepared


@pytest.mark.fast
def test_accelerator_platforms_are_left_alone():
  import jax

  from trainer import cpu_host

  original = jax.config.jax_platforms
  try:
    jax.config.update("jax_platforms", "cuda,cpu")
    assert not cpu_host.runs_on_cpu() and not cpu_host.prepare()
    jax.config.update("jax_platforms", "cpu")
    assert cpu_host.runs_on_cpu()
  finally:
    jax.config.update("jax_platforms", original)


def test_libtpu_without_tpu_chips_leaves_the_host_a_cpu_host(monkeypatch):
  """requirements-dev.txt installs libtpu to compile for TPUs; only attached chips make a host a TPU host."""
  import glob
  import importlib.util

  from trainer import cpu_host

  if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu comes with requirements-dev.txt")
  if importlib.util.find_spec("jax_plugins") is not None:
    pytest.skip("a GPU plugin is installed: the host counts as a GPU host whatever libtpu finds")
  monkeypatch.setattr(glob, "glob", lambda pattern: [])
  assert not cpu_host.accelerator_attached()
  monkeypatch.setattr(glob, "glob", lambda pattern: ["/dev/accel0"] if pattern.startswith("/dev/accel") else [])
  assert cpu_host.accelerator_attached()
