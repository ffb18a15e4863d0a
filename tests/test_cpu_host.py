"""A CPU run's steps reuse their host memory (trainer/cpu_host.py): repeated steps touch no new pages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A "step" with a 64 MiB temporary (the barrier keeps XLA from fusing it away), run until warm, then the minor
# page faults of 4 more runs. Each fault is one 4 KiB page touched for the first time.
_STEPS = """
import json, resource, sys
sys.path.insert(0, {repo!r})
import jax, jax.numpy as jnp
from trainer import cpu_host
applied = cpu_host.prepare() if {prepare} else False
step = jax.jit(lambda x: jnp.sum(jax.lax.optimization_barrier(jnp.sin(x)) * x))
x = jnp.ones((4096, 4096), jnp.float32)
for _ in range(3):
  step(x).block_until_ready()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  step(x).block_until_ready()
print(json.dumps({{"applied": applied, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}}))
"""


def _run(prepare: bool) -> dict:
  # No allocator settings from the caller's environment: the plain run must show glibc's defaults.
  env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
  code = _STEPS.format(repo=str(REPO), prepare=prepare)
  out = subprocess.run(
    [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**env, "JAX_PLATFORMS": "cpu"}
  )
  assert out.returncode == 0, out.stderr[-2000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_steps_reuse_their_memory():
  plain, prepared = _run(prepare=False), _run(prepare=True)
  pages_per_step = 64 * 2**20 // 4096
  # Without the settings every run faults its temporary in again; with them, (almost) nothing.
  assert plain["faults"] >= 4 * pages_per_step * 0.9, plain
  assert prepared["applied"] and prepared["faults"] < pages_per_step / 4, prepared


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
