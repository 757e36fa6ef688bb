"""Devices of all processes as one Mesh; batch and state shardings; multi-host start-up.

The train step is one `jax.jit` program over the global mesh, whose axes are `data` and `fsdp`
(config.parallel). The batch is split over both axes; each train-state leaf is split over `fsdp`
by the rules in sharding_rules.py (fsdp.py) and replicated along `data`. With fsdp=1 (the
default) every device holds the whole state: plain data parallelism.
"""
from __future__ import annotations

import os
import sys
import time

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
# The batch's leading axis is split over every device of the mesh, data-major.
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)
# A process that stops sending heartbeats for this long (killed, lost host) makes the
# coordination service terminate every other process, instead of leaving them at a barrier.
DEFAULT_HEARTBEAT_TIMEOUT_S = 45
_FAILED_KEY = "ldm_jax/failed/"


class PeerFailedError(RuntimeError):
    """Another process of the job reported a failure."""


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1, local_device_count: int = 0,
                           heartbeat_timeout_s: int = DEFAULT_HEARTBEAT_TIMEOUT_S) -> None:
    """Start jax.distributed from explicit flags, from the environment, or not at all.

    Explicit flags win. Otherwise JAX's own cluster detection is used when the environment
    names a coordinator (JAX_COORDINATOR_ADDRESS) or a known scheduler (SLURM, TPU pods, ...)
    and LDM_JAX_DISTRIBUTED=1 is set. Single-process runs call nothing.
    """
    if coordinator_address:
        if num_processes < 1 or process_id < 0:
            raise ValueError("--coordinator_address needs --num_processes and --process_id too")
        kwargs = {"heartbeat_timeout_seconds": heartbeat_timeout_s}
        if local_device_count:
            kwargs["local_device_ids"] = list(range(local_device_count))
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id, **kwargs)
    elif os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("LDM_JAX_DISTRIBUTED") == "1":
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)


def mesh_shape(num_devices: int, data: int = -1, fsdp: int = 1) -> tuple[int, int]:
    """(data, fsdp) sizes over `num_devices`; one of them may be -1 (the rest)."""
    from ldm_jax.config_checks import ConfigError
    if data == -1 and fsdp == -1:
        raise ConfigError("parallel.data and parallel.fsdp cannot both be -1; set one of them")
    for name, value in (("data", data), ("fsdp", fsdp)):
        if value == 0 or value < -1:
            raise ConfigError(f"parallel.{name}={value} must be a positive device count or -1")
    known = fsdp if data == -1 else data
    if num_devices % known:
        raise ConfigError(f"parallel.data={data} x parallel.fsdp={fsdp} does not divide the "
                          f"{num_devices} devices; choose sizes whose product is {num_devices}")
    data = num_devices // fsdp if data == -1 else data
    fsdp = num_devices // data if fsdp == -1 else fsdp
    if data * fsdp != num_devices:
        raise ConfigError(f"parallel.data={data} x parallel.fsdp={fsdp} is {data * fsdp} "
                          f"devices, but there are {num_devices}; use -1 for one of them")
    return data, fsdp


def make_mesh(devices=None, parallel=None) -> Mesh:
    """A (data, fsdp) mesh over every device of every process, grouped by process; the shape
    comes from `parallel` (config.parallel), default all devices on `data`.

    Devices are sorted by process, so each process's devices are contiguous in the mesh's
    row-major order: the batch rows a process feeds land on its own devices, and an fsdp group
    no larger than a host's devices stays inside that host.
    """
    devices = sorted(devices or jax.devices(), key=lambda d: (d.process_index, d.id))
    data, fsdp = (-1, 1) if parallel is None else (parallel.data, parallel.fsdp)
    shape = mesh_shape(len(devices), data, fsdp)
    return Mesh(np.asarray(devices).reshape(shape), (DATA_AXIS, FSDP_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def state_sharding(mesh: Mesh, abstract_state, parallel=None):
    """Sharding for every leaf of the train state: split over `fsdp` by the rules, replicated
    along `data` (all replicated when the fsdp axis has one device)."""
    from ldm_jax import fsdp
    min_size = 0 if parallel is None else parallel.fsdp_min_size
    return fsdp.state_shardings(mesh, abstract_state, min_size)


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
    """Assemble the process-local rows of every process into one global sharded batch."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local_batch.items()}


def _client():
    from jax._src import distributed  # the client jax.distributed.initialize created
    return distributed.global_state.client


def local_device_count(mesh: Mesh) -> int:
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def global_flags(local_flags: np.ndarray, mesh: Mesh) -> jax.Array:
    """One value per device (this process supplies its own devices' values), sharded on `data`."""
    return jax.make_array_from_process_local_data(batch_sharding(mesh), local_flags)


def wait_for_all_processes(name: str, timeout_s: int = 1800, poll_s: float = 0.5) -> None:
    """Barrier through the coordination service's key-value store, not through a collective.

    Gloo (CPU) sets up its context at the first collective and gives up when the other
    processes arrive more than 30 s later, e.g. while one is still compiling. Meeting here
    first puts every process at that collective together. While waiting, a failure reported
    by another process (`report_failure`) ends this one at once with that process's message.
    No-op in a single process.
    """
    if jax.process_count() == 1:
        return
    client = _client()
    prefix = f"ldm_jax/barrier/{name}/"
    client.key_value_set(prefix + str(jax.process_index()), "arrived", allow_overwrite=True)
    deadline = time.time() + timeout_s
    while True:
        failures = client.key_value_dir_get(_FAILED_KEY)
        if failures:
            key, message = sorted(failures)[0]
            raise PeerFailedError(f"process {key.rsplit('/', 1)[-1]} of the job failed "
                                  f"({message}); see its log")
        if len(client.key_value_dir_get(prefix)) == jax.process_count():
            return
        if time.time() > deadline:
            raise PeerFailedError(f"processes did not all reach '{name}' within {timeout_s} s")
        time.sleep(poll_s)


def report_failure(message: str) -> None:
    """Tell the other processes (waiting in `wait_for_all_processes`) that this one failed."""
    if jax.process_count() == 1:
        return
    try:
        _client().key_value_set(_FAILED_KEY + str(jax.process_index()), message[:500],
                                allow_overwrite=True)
    except Exception:  # the service may be gone already; the heartbeat timeout covers that
        pass


def exit_without_shutdown(code: int) -> None:
    """End a failed process of a multi-process job now.

    A normal exit runs jax.distributed's shutdown barrier, which waits minutes for processes
    that are not coming; the others learn of the failure from `report_failure` or heartbeats.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
