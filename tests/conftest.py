"""Shared test setup: four fake CPU devices unless the caller set XLA_FLAGS."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
