"""The run's working directory: opening it, one writer at a time, and reporting a finished run.

``<workdir>/LOCK`` holds ``{"host", "pid", "start"}`` of the run writing there. The file is locked
with ``flock`` for the run's lifetime, so the kernel releases it when the process dies however it
dies (SIGKILL, OOM, preemption); the JSON inside is what names the holder. A second run on the same
workdir stops at once naming the holder. A lock left by a dead process on this host is taken over
with a warning. A lock written by another host cannot be checked from here and is refused (remove
the file if that run is gone). Multi-host runs take the lock on process 0 only.
"""

from __future__ import annotations

import dataclasses
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from typing import Any

from jvit.errors import ConfigError

log = logging.getLogger("jvit.train")

LOCK_NAME = "LOCK"


class WorkdirError(ConfigError):
    """The workdir cannot be used: not a directory, not writable, or held by another run."""


def make_workdir(workdir: str) -> str:
    """Create ``workdir`` if needed; a clear :class:`WorkdirError` when it is a file or cannot be made/written."""
    path = os.path.abspath(os.path.expanduser(workdir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise WorkdirError(f"--workdir {workdir} is a file, not a directory; choose another path")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise WorkdirError(f"cannot create --workdir {workdir}: {e.strerror} ({e.filename or path})") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise WorkdirError(f"--workdir {workdir} is not writable by this user")
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclasses.dataclass
class WorkdirLock:
    """A held ``<workdir>/LOCK`` (see the module docstring); :meth:`release` gives it up."""

    path: str
    fd: int | None

    def release(self) -> None:
        """Remove the lock file and unlock (idempotent)."""
        if self.fd is None:
            return
        _HELD.pop(self.path, None)
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        os.close(self.fd)
        self.fd = None


_HELD: dict[str, WorkdirLock] = {}  # locks held by this process, by path


def _describe(holder: dict[str, Any]) -> str:
    return f"pid {holder.get('pid')} on host {holder.get('host')}, started {holder.get('start')}"


def _read_holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 4096).decode(errors="replace").strip()
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"host": "?", "pid": "?", "start": f"unparsable lock file content {text[:80]!r}"}


def acquire(workdir: str, *, primary: bool = True) -> WorkdirLock:
    """Create ``workdir`` and take its lock (process 0 only when ``primary`` is false elsewhere).

    Raises :class:`WorkdirError` naming the holder if another live run has it.
    """
    path = os.path.join(make_workdir(workdir), LOCK_NAME)
    if not primary:
        return WorkdirLock(path, None)
    if path in _HELD:  # a previous run in this process ended without releasing (an exception): it is over
        _HELD[path].release()
    host = socket.gethostname()
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EACCES):
                os.close(fd)
                raise
            holder = _read_holder(fd)
            os.close(fd)
            raise WorkdirError(
                f"--workdir {workdir} is in use by another run ({_describe(holder)}); "
                f"wait for it to finish or use another workdir"
            ) from None
        try:
            same_file = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same_file = False
        if same_file:
            break
        os.close(fd)  # the previous holder removed the file between our open and flock: retry on the new one
    previous = _read_holder(fd)
    if previous:
        if previous.get("host") == host and isinstance(previous.get("pid"), int) and not _pid_alive(previous["pid"]):
            log.warning(
                "taking over the stale lock of a run that is no longer alive (%s) in %s", _describe(previous), workdir
            )
        elif previous.get("host") != host:
            os.close(fd)
            raise WorkdirError(
                f"--workdir {workdir} has a lock from another host ({_describe(previous)}) that "
                f"cannot be checked from here; if that run is gone, delete {path}"
            )
    start = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps({"host": host, "pid": os.getpid(), "start": start}) + "\n").encode())
    os.fsync(fd)
    lock = _HELD[path] = WorkdirLock(path, fd)
    return lock


def report_finished(workdir: str, step: int) -> dict[str, Any]:
    """For a run restarted after its last step: say so and print the metrics it recorded last
    (from ``metrics.jsonl``) on the ``final:`` line. Returns them with ``step``."""
    last: dict[str, float] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by a kill
                    continue
                if record.get("step", 0) <= step:
                    last.update({k: v for k, v in record.items() if k != "step"})
    keep = {k: v for k, v in last.items() if k == "train/loss" or k.startswith("eval")}
    log.info(
        "the run in %s already finished (step %d = num_train_steps); nothing to train. To train longer, raise "
        "num_train_steps (or num_epochs); to start over, use a new --workdir",
        workdir,
        step,
    )
    summary = " ".join(f"{k}={v:.4f}" for k, v in keep.items()) or "(no metrics recorded)"
    print(f"final: step={step} {summary} (already finished)", flush=True)
    return {"step": step, **keep}
