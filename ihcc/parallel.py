"""Device mesh and sharding helpers for data-parallel training and inference.

Training is `jax.jit` over a one-dimensional mesh whose axis `DATA_AXIS` spans every device
of every process. Batches are sharded along that axis and the train state is replicated, so
the losses are written on global arrays: XLA gathers the contrastive negatives and the
cluster statistics across devices, and BatchNorm uses global-batch statistics. On several
hosts, start each process with `jax.distributed.initialize()` before anything else; every
process then feeds its own slice of each global batch.
"""

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Return a 1-D mesh over `devices` (all global devices by default)."""
    devices = jax.devices() if devices is None else list(devices)
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """Return the per-process batch size, or raise if the global batch does not divide evenly."""
    num_devices = mesh.devices.size
    if global_batch_size % num_devices:
        raise ValueError(
            f"train.batch_size={global_batch_size} is not divisible by the {num_devices} devices; "
            f"set --config.train.batch_size to a multiple of {num_devices}."
        )
    return global_batch_size // jax.process_count()


def process_slice(global_batch_size: int) -> slice:
    """Return this process's rows of a global batch."""
    per_process = global_batch_size // jax.process_count()
    start = jax.process_index() * per_process
    return slice(start, start + per_process)


def shard_batch(local_batch, mesh: Mesh):
    """Assemble global arrays sharded over `DATA_AXIS` from this process's rows."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch
    )
