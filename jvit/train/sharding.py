"""The device mesh and how arrays are laid out on it.

Mesh axes: ``data`` (pure data parallelism) and ``fsdp`` (fully-sharded data parallelism: the
batch is split over it too, and every large parameter and optimizer-state array is split along
one of its dimensions). Axis types are ``Auto``: the compiler propagates shardings through the
Linen model, which has no sharding annotations of its own.
"""

from __future__ import annotations

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
