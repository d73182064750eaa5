"""Test-wide settings: 8 fake CPU devices (for sharding tests) and fp32 matmuls everywhere.

Both must be set before jax is imported anywhere, hence here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import pytest  # noqa: E402
from jax.experimental.compilation_cache import compilation_cache as jax_cache  # noqa: E402

# Parity needs true fp32 matmuls on GPU/TPU too (TF32/bf16 passes are far outside tolerance).
jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
    """A persistent compilation cache for the module that asks for it (``pytestmark =
    pytest.mark.usefixtures("compilation_cache")``): a rerun of a training run (resume, restart, a
    reference run beside an interrupted one) loads what the first run compiled."""
    names = (
        "jax_compilation_cache_dir",
        "jax_persistent_cache_min_compile_time_secs",
        "jax_persistent_cache_min_entry_size_bytes",
    )
    before = {n: getattr(jax.config, n) for n in names}
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    jax_cache.reset_cache()  # jax decides once per process whether the cache is on
    yield
    for n, v in before.items():
        jax.config.update(n, v)
    jax_cache.reset_cache()
