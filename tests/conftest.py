"""Every test sees 8 emulated CPU devices, so sharded layouts run on a laptop."""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402

from compat import check_flax_matches_jax  # noqa: E402

check_flax_matches_jax()  # a flax too old for this jax: one line naming both, not flax's own import error

jax.config.update("jax_default_matmul_precision", "highest")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mini_run_cache(tmp_path_factory):
  """The data cache of every mini run (tests.helpers.mini_run_args, mini_run_config): the tokenizer, the token
  cache and the compiled programs of the same corpus, built once a session rather than once a module (about 7 s
  each). Building a cache from nothing stays covered: the session's first mini run does, test_end_to_end and
  test_data do."""
  return tmp_path_factory.mktemp("mini_run_cache")
