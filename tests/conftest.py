"""Test-wide settings: 8 fake CPU devices (for sharding tests) and fp32 matmuls everywhere.

Both must be set before jax is imported anywhere, hence here.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402

# Parity needs true fp32 matmuls on GPU/TPU too (TF32/bf16 passes are far outside tolerance).
jax.config.update("jax_default_matmul_precision", "highest")
