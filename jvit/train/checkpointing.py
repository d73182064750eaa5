"""Train checkpoints: the state and the input pipeline's position, saved together with orbax.

``<workdir>/checkpoints/<step>/`` holds ``state`` (the :class:`TrainState`, written asynchronously
from the devices' shards) and ``data`` (one JSON file per host with that host's grain iterator
state). Restoring both gives the exact next batch and the exact next update, so a run that is
killed and rerun in the same workdir ends where an uninterrupted one ends, bit for bit.
"""

from __future__ import annotations

import json
import os
from typing import Any

import grain
import orbax.checkpoint as ocp


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


class Checkpointer:
    """Save/restore :class:`TrainState` + iterator position under ``<workdir>/checkpoints``."""

    def __init__(self, workdir: str, *, keep: int, use_async: bool):
        self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, iterator: grain.DatasetIterator) -> None:
        """Start saving ``state`` and ``iterator``'s position as checkpoint ``step`` (async)."""
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            data=grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator, iterator.get_state())),
        )
        self.manager.save(step, args=args, force=True)

    def restore(self, step: int, abstract_state: Any, iterator: grain.DatasetIterator | None) -> Any:
        """The state of checkpoint ``step`` laid out as ``abstract_state`` (shapes + shardings);
        ``iterator`` (if given) is moved to the saved position."""
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        if iterator is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(_IteratorSnapshot(iterator))
        return self.manager.restore(step, args=ocp.args.Composite(**items))["state"]

    def wait(self) -> None:
        """Block until pending saves are on disk."""
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
