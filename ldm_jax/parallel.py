"""Devices of all processes as one Mesh; batch sharding; multi-host start-up.

The train step is one `jax.jit` program over the global mesh. The batch is split along the
`data` axis; parameters and optimiser state are replicated (an `fsdp` axis can be added to the
mesh and to `state_sharding` for models too large to replicate).
"""
from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, local_device_count: int = 0) -> None:
    """Start jax.distributed from explicit flags, from the environment, or not at all.

    Explicit flags win. Otherwise JAX's own cluster detection is used when the environment
    names a coordinator (JAX_COORDINATOR_ADDRESS) or a known scheduler (SLURM, TPU pods, ...)
    and LDM_JAX_DISTRIBUTED=1 is set. Single-process runs call nothing.
    """
    if coordinator_address:
        if num_processes < 1 or process_id < 0:
            raise ValueError("--coordinator_address needs --num_processes and --process_id too")
        kwargs = {}
        if local_device_count:
            kwargs["local_device_ids"] = list(range(local_device_count))
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id, **kwargs)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("LDM_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize()


def make_mesh(devices=None) -> Mesh:
    """A 1-D data-parallel mesh over every device of every process, grouped by process.

    Grouping by process keeps each process's devices contiguous along `data`, so the rows a
    process feeds land on its own devices.
    """
    devices = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(DATA_AXIS))


def state_sharding(mesh: Mesh, abstract_state):
    """Sharding for every leaf of the train state: replicated for data parallelism."""
    return jax.tree_util.tree_map(lambda _: replicated(mesh), abstract_state)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assemble the process-local rows of every process into one global sharded batch."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def wait_for_all_processes(name: str, timeout_s: int = 1800) -> None:
    """Barrier through the coordination service, not through a collective.

    Gloo (CPU) sets up its context at the first collective and gives up when the other
    processes arrive more than 30 s later, e.g. while one is still compiling. Meeting here
    first puts every process at that collective together. No-op in a single process.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client jax.distributed.initialize created
    distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=timeout_s * 1000)
