"""Joining a multi-process run: ``config.distributed`` -> ``jax.distributed.initialize``.

Two ways to launch, chosen by the fields that are set:

* auto-detection (``distributed.enabled=True`` and no ``coordinator_address``): JAX reads the
  cluster from its environment (TPU pod metadata, SLURM's ``SLURM_*`` or Open MPI's ``OMPI_*``
  variables), so every worker runs the same command;
* explicit (``coordinator_address=HOST:PORT``, ``num_processes=N``, ``process_id=I``; setting the
  address turns distributed on by itself): for clusters without a detectable launcher and for N
  processes on one machine. ``local_device_ids`` restricts a process to some local accelerators
  (one process per GPU).

On CPU, cross-process collectives need an implementation chosen before the backend starts; we pick
gloo, the one jaxlib ships for CPU. It affects only the CPU backend, so it is set unconditionally.

A process (other than 0) that cannot reach the coordinator within ``initialization_timeout`` seconds stops with a
:class:`DistributedInitError` naming the address and the fields, instead of hanging.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

import jax

from jvit.errors import ConfigError

log = logging.getLogger("jvit.train")


class DistributedInitError(RuntimeError):
    """This process could not join the multi-process run (coordinator unreachable or timed out)."""


def wanted(dist: Any) -> bool:
    """Whether ``config.distributed`` asks for a multi-process run (``enabled``, or an explicit
    coordinator address)."""
    return bool(dist.enabled or dist.coordinator_address)


def check(dist: Any) -> list[str]:
    """Problems with the ``distributed`` fields, each naming the field (empty when consistent)."""
    errors = []
    if dist.coordinator_address:
        host, _, port = dist.coordinator_address.rpartition(":")
        if not host or not port.isdigit():
            errors.append(f"distributed.coordinator_address={dist.coordinator_address!r} must be HOST:PORT")
        if dist.num_processes is None or dist.process_id is None:
            errors.append("distributed.coordinator_address needs distributed.num_processes and distributed.process_id")
    elif dist.num_processes is not None or dist.process_id is not None:
        errors.append(
            "distributed.num_processes/process_id need distributed.coordinator_address "
            "(leave all three unset to auto-detect a TPU pod / SLURM / Open MPI cluster)"
        )
    if dist.num_processes is not None and dist.num_processes < 1:
        errors.append(f"distributed.num_processes={dist.num_processes} must be >= 1")
    if dist.process_id is not None and dist.num_processes is not None and not 0 <= dist.process_id < dist.num_processes:
        errors.append(f"distributed.process_id={dist.process_id} must be in [0, {dist.num_processes})")
    if dist.initialization_timeout <= 0:
        errors.append(f"distributed.initialization_timeout={dist.initialization_timeout} must be > 0 seconds")
    return errors


def initialize(dist: Any) -> None:
    """Join the run described by ``config.distributed`` (no-op unless :func:`wanted`).

    Must run before anything touches a JAX backend. Raises :class:`DistributedInitError` when the
    coordinator is not reached within ``dist.initialization_timeout`` seconds.
    """
    if not wanted(dist):
        return
    errors = check(dist)
    if errors:
        raise ConfigError("; ".join(errors))
    explicit = (
        {
            "coordinator_address": dist.coordinator_address,
            "num_processes": dist.num_processes,
            "process_id": dist.process_id,
        }
        if dist.coordinator_address
        else {}
    )
    local = tuple(dist.local_device_ids) or None
    where = (
        f"coordinator {dist.coordinator_address} as process {dist.process_id} of {dist.num_processes}"
        if explicit
        else "the auto-detected cluster (TPU pod / SLURM / Open MPI)"
    )
    log.info("joining %s (timeout %d s)", where, dist.initialization_timeout)
    hint = (
        "check that every process was started with the same coordinator_address and num_processes, that "
        "process 0 runs, and that the port is reachable from this host"
    )
    if explicit and dist.process_id != 0:
        _wait_for_coordinator(dist.coordinator_address, dist.initialization_timeout, where, hint)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # jaxlib terminates the process itself (a C++ fatal error, not a Python exception) when the other
    # processes do not all register in time; this line is what that log's reader needs.
    log.info(
        "waiting up to %d s for all processes to register; a DEADLINE_EXCEEDED abort means one did not: %s",
        dist.initialization_timeout,
        hint,
    )
    jax.distributed.initialize(
        **explicit, local_device_ids=local, initialization_timeout=int(dist.initialization_timeout)
    )
    log.info(
        "process %d of %d: %d local / %d global devices",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
    )


def _wait_for_coordinator(address: str, timeout: float, where: str, hint: str) -> None:
    """Poll ``address`` until it accepts a TCP connection; :class:`DistributedInitError` after ``timeout`` s.

    jaxlib's own connect aborts the process on timeout, so a non-coordinator process checks first.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise DistributedInitError(
                    f"could not reach {where} within distributed.initialization_timeout={timeout} s ({e}); {hint}"
                ) from e
            time.sleep(0.5)
