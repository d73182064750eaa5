"""The device mesh and how arrays are laid out on it.

Mesh axes: ``data`` (pure data parallelism) and ``fsdp`` (fully-sharded data parallelism: the
batch is split over it too, and every large parameter and optimizer-state array is split along
one of its dimensions). Axis types are ``Auto``: the compiler propagates shardings through the
Linen model, which has no sharding annotations of its own.
"""

from __future__ import annotations

import collections
import concurrent.futures
import math
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jvit.errors import ConfigError

BATCH_AXES = ("data", "fsdp")


def validate(mesh_config: Any) -> list[str]:
    """Errors of the config's ``mesh`` section."""
    m = mesh_config
    checks = (
        (m.data == -1 or m.data >= 1, f"mesh.data={m.data} must be -1 or >= 1"),
        (m.fsdp >= 1, f"mesh.fsdp={m.fsdp} must be >= 1"),
        (m.fsdp_min_size >= 0, f"mesh.fsdp_min_size={m.fsdp_min_size} must be >= 0"),
    )
    return [message for ok, message in checks if not ok]


def make_mesh(data: int = -1, fsdp: int = 1, devices: list[jax.Device] | None = None) -> Mesh:
    """A ``(data, fsdp)`` mesh over ``devices`` (all by default); ``data=-1`` takes the rest."""
    devices = jax.devices() if devices is None else devices
    n = len(devices)
    if n % fsdp:
        raise ConfigError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
    data = n // fsdp if data == -1 else data
    if data * fsdp != n:
        raise ConfigError(f"mesh data={data} x fsdp={fsdp} = {data * fsdp}, but there are {n} devices")
    return jax.make_mesh((data, fsdp), ("data", "fsdp"), axis_types=(AxisType.Auto, AxisType.Auto), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over every device; other dimensions whole."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def fsdp_spec(shape: tuple[int, ...], fsdp: int, min_size: int) -> P:
    """Shard the largest dimension divisible by ``fsdp`` (the last one on ties); arrays below
    ``min_size`` elements, or with no such dimension, stay replicated."""
    if fsdp == 1 or math.prod(shape) < min_size:
        return P()
    candidates = [(d, i) for i, d in enumerate(shape) if d % fsdp == 0]
    if not candidates:
        return P()
    _, axis = max(candidates)
    return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def state_shardings(abstract_tree: Any, mesh: Mesh, min_size: int) -> Any:
    """``NamedSharding`` for every leaf of ``abstract_tree`` (params, optimizer moments, EMA, ...).

    The rule depends only on the shape, so a parameter and its Adam moments land alike.
    """
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), fsdp, min_size)), abstract_tree)


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assemble each host's rows into global arrays sharded along the batch dimension."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


class DevicePrefetch:
    """The global batches of a host iterator, ``size`` of them placed on the devices ahead of use by a
    background thread, so the host-to-device copy overlaps the running step.

    Checkpointable like the iterator it wraps: :meth:`get_state` is the position after the last batch
    handed out (not after the prefetched ones), so a checkpoint resumes at exactly the next batch;
    :meth:`set_state` drops what was prefetched. ``size=0`` fetches synchronously.
    """

    def __init__(self, iterator: Any, mesh: Mesh, size: int = 2):
        self._iterator, self._mesh, self._size = iterator, mesh, size
        self._state = iterator.get_state()
        self._queue: collections.deque[concurrent.futures.Future] = collections.deque()
        self._executor = (
            concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="device_prefetch") if size else None
        )

    def _fetch(self) -> tuple[dict[str, jax.Array], Any]:
        local = next(self._iterator)
        return global_batch(local, self._mesh), self._iterator.get_state()

    def __iter__(self) -> DevicePrefetch:
        return self

    def __next__(self) -> dict[str, jax.Array]:
        if self._executor is None:
            batch, self._state = self._fetch()
            return batch
        while len(self._queue) <= self._size:
            self._queue.append(self._executor.submit(self._fetch))
        batch, self._state = self._queue.popleft().result()
        return batch

    def get_state(self) -> Any:
        return self._state

    def set_state(self, state: Any) -> None:
        concurrent.futures.wait(self._queue)
        self._queue.clear()
        self._iterator.set_state(state)
        self._state = state

    def close(self) -> None:
        """Stop prefetching (batches in flight are dropped)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
