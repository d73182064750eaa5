"""Checking the files of an image folder before they are read: the scan-time half of the bad-input
policy documented in :mod:`jvit.data.sources`.

A class folder can hold entries that are named like images but cannot be read as one: a broken
symlink, a directory called ``x.jpg``, a device or FIFO, a file without read permission. They are
found while the folder is listed, so a run learns about them at start and not from a traceback in
an input thread. In training each is skipped (counted and logged with its path); in evaluation,
where a missing image would change the score, the first one is an error naming it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

from jvit.errors import ConfigError, CorruptImageError

log = logging.getLogger("jvit.data")


def list_images(class_dir: str, extensions: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """``(usable file names, [(name, why unusable), ...])`` of ``class_dir``'s entries with an image
    extension (hidden names ignored), both sorted; an unreadable directory is a :class:`ConfigError`."""
    try:
        entries = sorted(os.scandir(class_dir), key=lambda e: e.name)
    except OSError as e:
        raise ConfigError(f"cannot list the image folder {class_dir}: {e.strerror}") from e
    good, bad = [], []
    for entry in entries:
        if entry.name.startswith(".") or not entry.name.lower().endswith(tuple(extensions)):
            continue
        why = _unusable(entry)
        if why:
            bad.append((entry.name, why))
        else:
            good.append(entry.name)
    return good, bad


def _unusable(entry: os.DirEntry) -> str:
    """Why ``entry`` cannot be read as an image file ('' if it can)."""
    try:
        if entry.is_symlink() and not os.path.exists(entry.path):
            return f"broken symlink (to {os.readlink(entry.path)})"
        if entry.is_dir():
            return "a directory"
        if not entry.is_file():
            return "not a regular file"
    except OSError as e:
        return f"cannot stat: {e.strerror}"
    if not os.access(entry.path, os.R_OK):
        return "not readable (permission denied)"
    return ""


def apply_policy(bad: list[tuple[str, str]], *, root: str, train: bool, split: str) -> None:
    """Training: log every unusable entry (``root``-relative) and their count; evaluation: raise
    :class:`ConfigError` naming the first one."""
    if not bad:
        return
    if not train:
        name, why = bad[0]
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise ConfigError(
            f"evaluation split {split} has an unusable image {os.path.join(root, name)}: {why}{more}. "
            "Evaluation scores every example: remove or replace it"
        )
    for name, why in bad:
        log.warning("skipping %s in %s: %s", os.path.join(root, name), split, why)
    log.warning("skipped %d unusable entries named like images in %s (listed above)", len(bad), split)


def read_file(path: str) -> bytes:
    """The bytes of ``path``; a file that vanished or became unreadable since the scan raises the
    data layer's :class:`~jvit.errors.CorruptImageError` naming it, so the policy applies."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CorruptImageError(f"cannot read image file {path}: {e.strerror}") from e
