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
jax.config.update(
    "jax_compilation_cache_dir", os.environ.get("IHCC_TEST_JAX_CACHE", "/tmp/ihcc-test-jax-cache")
)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED_DIR = os.path.join(os.path.dirname(REPO_ROOT), "shared")


def tiny_config():
    """Return the default config shrunk so that a train step compiles and runs in seconds."""
    from configs import default

    config = default.get_config()
    config.data.image_size = 16
    config.model.depth = 18
    config.model.feature_dim = 16
    config.model.class_num = 8
    config.train.batch_size = 8
    config.train.num_epochs = 2
    config.train.log_every_steps = 1
    config.train.checkpoint_every_epochs = 1
    config.assign.batch_size = 8
    config.data.synthetic.num_participants = 3
    config.data.synthetic.num_types = 2
    config.data.synthetic.envs_per_participant = 2
    config.data.synthetic.photos_per_env = 4
    return config


@pytest.fixture
def config():
    return tiny_config()
