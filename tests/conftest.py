"""Every test sees 8 emulated CPU devices, so sharded layouts run on a laptop."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from compat import check_flax_matches_jax  # noqa: E402

check_flax_matches_jax()  # a flax too old for this jax: one line naming both, not flax's own import error

jax.config.update("jax_default_matmul_precision", "highest")
