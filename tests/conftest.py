"""Shared test setup: four fake CPU devices, a persistent compilation cache, tiny configs."""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=4"
# The tests run tiny programs, where XLA's CPU compile time (tens of seconds for a ResNet
# train step at full optimisation) dwarfs the run time.
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (must come after XLA_FLAGS is set)
import pytest  # noqa: E402

# Identical programs compiled by different tests (or test processes) are read back from
# disk instead of being compiled again.
# Subprocesses that run main.py inherit the same cache through the environment.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/ihcc-test-jax-cache")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared")


def tiny_config():
    """Return the tiny config: a train step compiles and runs in seconds."""
    from configs import tiny

    return tiny.get_config()


@pytest.fixture
def config():
    return tiny_config()
