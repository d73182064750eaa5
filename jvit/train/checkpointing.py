"""Train checkpoints: the state and the input pipeline's position, saved together with orbax.

``<workdir>/checkpoints/<step>/`` holds ``state`` (the :class:`TrainState`, written asynchronously
from the devices' shards) and ``data`` (one JSON file per host with that host's grain iterator
state). Restoring both gives the exact next batch and the exact next update, so a run that is
killed and rerun in the same workdir ends where an uninterrupted one ends, bit for bit.

Failures end cleanly:

* a save that cannot be written (read-only or full disk, a vanished directory) raises
  :class:`CheckpointWriteError` naming the step, the path and the OS error, whether it fails while
  starting or later in orbax's background thread (checked every step by :meth:`Checkpointer.check`);
  checkpoints saved before it are left as they are.
* a restore verifies before use: only committed steps are listed (orbax renames a step's
  temporary directory into place after it is complete), and every restored array must have the
  expected shape and dtype and be finite. A step that fails is reported, moved aside to
  ``<workdir>/damaged_checkpoints/<step>`` and the previous step is tried.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any

import grain
import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

log = logging.getLogger("jvit.train")

_PROBE_BYTES = 1 << 16  # enough to need fresh disk blocks: a full disk fails here


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written; the message names the step, the path and the OS error."""


class NoUsableCheckpointError(RuntimeError):
    """Every checkpoint in the workdir failed verification."""


class _IteratorSnapshot:
    """An iterator's state as JSON bytes, the form grain's orbax handler reads and writes for a
    non-``DatasetIterator`` item (one file per host).

    Saving captures the state at save time: the async save may run after the loop has pulled
    further batches. Restoring hands the saved dict to the wrapped iterator's ``set_state``.
    """

    def __init__(self, iterator: Any, state: dict[str, Any] | None = None):
        self._iterator, self._state = iterator, state

    def get_state(self) -> bytes:
        return json.dumps(self._state, indent=2).encode()

    def set_state(self, state: bytes) -> None:
        self._iterator.set_state(json.loads(state))

    def start_prefetch(self) -> None:
        """Called by grain's handler after a restore; prefetching restarts on the next ``next``."""


def _root_cause(error: BaseException) -> BaseException:
    """The innermost ``OSError`` of an exception chain (orbax wraps the one that says what failed)."""
    seen, found, e = set(), None, error
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError):
            found = e
        e = e.__cause__ or e.__context__
    return found or error


class Checkpointer:
    """Save/restore :class:`TrainState` + iterator position under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, *, keep: int, use_async: bool):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._pending: int | None = None  # the step whose async save may still be running
        self._failed = False

    def latest_step(self) -> int | None:
        """The newest committed step (``None`` when there is none)."""
        return self.manager.latest_step()

    def _fail(self, step: int | None, error: BaseException) -> CheckpointWriteError:
        self._failed = True
        cause = _root_cause(error)
        where = os.path.join(self.directory, str(step)) if step is not None else self.directory
        reason = (
            f"{cause.strerror} ({getattr(cause, 'filename', None) or where})"
            if isinstance(cause, OSError) and cause.strerror
            else f"{type(cause).__name__}: {cause}"
        )
        return CheckpointWriteError(
            f"cannot write checkpoint {step} to {where}: {reason}. Stopping; the checkpoints saved before it are "
            "intact and a rerun with the same --workdir resumes from the latest one once the directory is writable"
        )

    def check(self) -> None:
        """Raise :class:`CheckpointWriteError` if a background save has failed (cheap: no waiting)."""
        if self._pending is None:
            return
        try:
            self.manager.check_for_errors()
        except Exception as e:  # orbax re-raises the background thread's exception here
            raise self._fail(self._pending, e) from e

    def save(self, step: int, state: Any, iterator: grain.DatasetIterator) -> None:
        """Start saving ``state`` and ``iterator``'s position as checkpoint ``step`` (async)."""
        self.check()
        try:
            self._probe(step)
        except OSError as e:
            raise self._fail(step, e) from e
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator, iterator.get_state())),
        )
        try:
            self.manager.save(step, args=args, force=True)
        except Exception as e:  # the synchronous part (directory creation, host copy) failed
            raise self._fail(step, e) from e
        self._pending = step

    def _probe(self, step: int) -> None:
        """Create, fill and remove a small file where the step will go. orbax creates the step's
        directory in a background thread and, when that fails, its other threads wait for it until a
        timeout (minutes): a read-only or full disk must be caught here, synchronously."""
        probe = os.path.join(self.directory, f".write-probe-{step}-{jax.process_index()}")
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, bytes(_PROBE_BYTES))
            os.fsync(fd)
        finally:
            os.close(fd)
            os.unlink(probe)

    def restore(self, step: int, abstract_state: Any, iterator: grain.DatasetIterator | None) -> Any:
        """The state of checkpoint ``step`` laid out as ``abstract_state`` (shapes + shardings);
        ``iterator`` (if given) is moved to the saved position. Raises if the step is damaged."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(_IteratorSnapshot(iterator))
        state = self.manager.restore(step, args=ocp.args.Composite(**items))["state"]
        verify_state(state, abstract_state)
        return state

    def restore_latest(self, abstract_state: Any, iterator: grain.DatasetIterator | None) -> tuple[int, Any] | None:
        """``(step, state)`` of the newest checkpoint that restores and verifies, or ``None`` without
        checkpoints. A damaged step is reported, moved to ``<workdir>/damaged_checkpoints`` and the
        previous one is tried; :class:`NoUsableCheckpointError` if none is usable."""
        steps = sorted(self.manager.all_steps(), reverse=True)
        for step in steps:
            try:
                return step, self.restore(step, abstract_state, iterator)
            except Exception as e:  # any failure to read or verify means the step cannot be trusted
                aside = self._move_aside(step)
                log.warning(
                    "checkpoint step %d in %s is damaged and was not used (%s: %s); moved it to %s and "
                    "trying the previous step",
                    step,
                    self.directory,
                    type(e).__name__,
                    str(e).splitlines()[0][:300] if str(e) else "",
                    aside,
                )
        if steps:
            raise NoUsableCheckpointError(
                f"none of the checkpoints {steps} in {self.directory} could be restored (see the warnings above); "
                f"they were moved to {os.path.join(self.workdir, 'damaged_checkpoints')}. Rerunning starts afresh"
            )
        return None

    def _move_aside(self, step: int) -> str:
        target = os.path.join(self.workdir, "damaged_checkpoints", f"{step}-{int(time.time())}")
        if jax.process_index() == 0:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def wait(self) -> None:
        """Block until pending saves are on disk; raises :class:`CheckpointWriteError` if one failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            raise self._fail(self._pending, e) from e
        self._pending = None

    def close(self) -> None:
        """Finish pending saves and release orbax's threads. After a reported write failure the
        (already reported) background error is not raised again."""
        try:
            self.manager.close()
        except Exception as e:
            if not self._failed:
                raise self._fail(self._pending, e) from e


def verify_state(state: Any, abstract_state: Any) -> None:
    """Check that every restored array has the shape and dtype of ``abstract_state`` and that every
    floating array is finite (a saved state always is: the loop checks the loss before saving)."""
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    expected = jax.tree.leaves(abstract_state)
    if len(flat) != len(expected):
        raise ValueError(f"restored {len(flat)} arrays, expected {len(expected)}")
    floating = []
    for (path, value), want in zip(flat, expected):
        name = jax.tree_util.keystr(path)
        if tuple(value.shape) != tuple(want.shape) or value.dtype != want.dtype:
            raise ValueError(
                f"array {name} is {value.dtype}{list(value.shape)}, expected {want.dtype}{list(want.shape)}"
            )
        if jnp.issubdtype(value.dtype, jnp.inexact):
            floating.append((name, value))
    finite = jax.device_get(jax.jit(lambda xs: [jnp.isfinite(x).all() for x in xs])([v for _, v in floating]))
    bad = [name for (name, _), ok in zip(floating, finite) if not ok]
    if bad:
        raise ValueError(f"non-finite values in {', '.join(bad[:5])}")
