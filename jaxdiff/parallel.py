"""Data-parallel plumbing: one device mesh, replicated state, batch-sharded data.

Training is data parallel in the simplest form ``jax.jit`` supports: one 1-D
:class:`jax.sharding.Mesh` over every device of every process, the train state replicated (``P()``)
and the batch split along its leading axis (``P('data')``). XLA inserts the gradient all-reduce;
there is no ``pmap`` and no explicit collective in the library.

Multi-host runs call :func:`initialize_distributed` first, before any other JAX call; every host
then reads only its own slice of each global batch (see ``jaxdiff.data``) and :func:`shard_batch`
assembles the global array from the host-local pieces.

>>> mesh = make_mesh()
>>> batch = shard_batch(mesh, {"image": np.zeros((jax.device_count() * 2, 8, 8, 1), np.float32)})
>>> batch["image"].sharding.spec
PartitionSpec('data',)
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = [
    "DATA_AXIS",
    "make_mesh",
    "replicated_sharding",
    "batch_sharding",
    "check_batch_size",
    "shard_batch",
    "replicate",
    "initialize_distributed",
]

PyTree = Any

DATA_AXIS = "data"


def make_mesh(axis_name: str = DATA_AXIS, devices: list[jax.Device] | None = None) -> Mesh:
    """Builds a 1-D mesh over all devices (of all processes) with a single data axis.

    Args:
      axis_name: name of the mesh axis that the batch is split along.
      devices: devices to use; all global devices by default.

    Returns:
      A :class:`jax.sharding.Mesh` of shape ``(num_devices,)``.
    """
    n = len(devices) if devices is not None else jax.device_count()
    return jax.make_mesh((n,), (axis_name,), devices=devices)


def _axis(mesh: Mesh) -> str:
    if len(mesh.axis_names) != 1:
        raise ValueError(f"expected a 1-D data-parallel mesh, got axes {mesh.axis_names}")
    return mesh.axis_names[0]


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """The sharding of a fully replicated array (the train state): ``NamedSharding(mesh, P())``."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, *, batch_axis: int = 0) -> NamedSharding:
    """The sharding of a batch split along its leading axis: ``NamedSharding(mesh, P('data'))``.

    ``batch_axis=1`` splits the second axis instead (``P(None, 'data')``): batches stacked for several train
    steps per call.
    """
    return NamedSharding(mesh, P(*([None] * batch_axis), _axis(mesh)))


def check_batch_size(global_batch_size: int, mesh: Mesh | None = None) -> int:
    """Checks that a global batch divides evenly over the devices and the processes.

    Args:
      global_batch_size: the batch size summed over all devices.
      mesh: the mesh; all devices when omitted.

    Returns:
      The per-process (host-local) batch size.

    Raises:
      ValueError: if the batch does not divide by the number of devices.
    """
    n_dev = mesh.size if mesh is not None else jax.device_count()
    n_proc = jax.process_count()
    if global_batch_size <= 0 or global_batch_size % n_dev:
        raise ValueError(
            f"global batch size {global_batch_size} must be a positive multiple of the number of "
            f"devices ({n_dev}); try {max(n_dev, global_batch_size // n_dev * n_dev)}"
        )
    return global_batch_size // n_proc


def shard_batch(mesh: Mesh, local_batch: PyTree, *, batch_axis: int = 0) -> PyTree:
    """Places a host-local numpy batch on the global mesh, split along the batch axis.

    Each process passes its own slice of the global batch (``global / process_count`` examples);
    ``jax.make_array_from_process_local_data`` stitches the slices into one global array, so the
    same call is right on one host and on many.

    Args:
      mesh: the data-parallel mesh from :func:`make_mesh`.
      local_batch: a pytree of arrays with a common batch dimension.
      batch_axis: which axis is the batch: 0, or 1 for batches stacked along a new leading axis (several train
        steps per call).

    Returns:
      The same pytree of global ``jax.Array`` sharded as ``P('data')`` (``P(None, 'data')``).

    Raises:
      ValueError: if the global batch does not divide by the number of devices.
    """
    if batch_axis not in (0, 1):
        raise ValueError(f"batch_axis must be 0 or 1, got {batch_axis!r}")
    sharding = batch_sharding(mesh, batch_axis=batch_axis)
    n_proc = jax.process_count()

    def put(x):
        x = np.asarray(x)
        if x.ndim <= batch_axis:
            raise ValueError(f"batch leaves need a batch dimension at axis {batch_axis}, got shape {x.shape}")
        check_batch_size(x.shape[batch_axis] * n_proc, mesh)
        global_shape = x.shape[:batch_axis] + (x.shape[batch_axis] * n_proc,) + x.shape[batch_axis + 1 :]
        return jax.make_array_from_process_local_data(sharding, x, global_shape)

    return jax.tree.map(put, local_batch)


def replicate(mesh: Mesh, tree: PyTree) -> PyTree:
    """Replicates a pytree (e.g. the train state) over every device of the mesh."""
    return jax.device_put(tree, replicated_sharding(mesh))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    **kwargs: Any,
) -> None:
    """Initialises multi-process JAX, or does nothing for a single process.

    Call it before any other JAX call. On clusters that JAX detects itself (Slurm, TPU pods, ...)
    call it with no arguments from every process. With ``num_processes == 1``, or with no arguments
    outside a cluster, it does nothing. On CPU the gloo cross-process collectives are switched on
    first, as CPU multi-process runs need.

    Args:
      coordinator_address: ``host:port`` of process 0.
      num_processes: total number of processes.
      process_id: this process's index.
      **kwargs: passed through to :func:`jax.distributed.initialize`.
    """
    if num_processes == 1:
        return
    if coordinator_address is None and num_processes is None and process_id is None and not kwargs:
        # Rely on cluster auto-detection; outside a cluster this is a single process.
        try:
            _set_cpu_collectives()
            jax.distributed.initialize()
        except ValueError as e:  # no cluster detected: this is a single process
            if "coordinator_address" not in str(e):
                raise
        return
    _set_cpu_collectives()
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        **kwargs,
    )


def _set_cpu_collectives() -> None:
    """Uses gloo for cross-process CPU collectives (must precede initialisation)."""
    platforms = jax.config.jax_platforms or ""
    if platforms in ("", "cpu") or platforms.startswith("cpu"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
