"""Saving and loading converted model variables as orbax checkpoints.

A converted model is a directory holding ``variables/`` (an orbax ``StandardCheckpointer``
checkpoint of the variables tree) and ``jvit.json`` (which model, classes, input size, and where the
weights came from), so it can be rebuilt without remembering how it was made.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import orbax.checkpoint as ocp

METADATA_FILE = "jvit.json"


def save_variables(directory: str | os.PathLike, variables: dict[str, Any], metadata: dict[str, Any]) -> str:
    """Write ``variables`` and ``metadata`` (must include ``model``) to ``directory``; returns its path.

    The directory must not exist yet, so nothing is overwritten by accident.
    """
    if "model" not in metadata:
        raise ValueError("metadata must name the model ('model': registered name)")
    directory = os.path.abspath(os.fspath(directory))
    if os.path.exists(directory):
        raise FileExistsError(f"{directory} already exists; choose a new output directory")
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(directory, "variables"), variables)
    checkpointer.wait_until_finished()
    with open(os.path.join(directory, METADATA_FILE), "w") as f:
        json.dump(metadata, f, indent=2, sort_keys=True)
    return directory


def load_variables(directory: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a directory written by :func:`save_variables`: ``(variables, metadata)``."""
    directory = os.path.abspath(os.fspath(directory))
    meta_path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{directory} is not a jvit checkpoint (no {METADATA_FILE})")
    with open(meta_path) as f:
        metadata = json.load(f)
    variables = ocp.StandardCheckpointer().restore(os.path.join(directory, "variables"))
    return {k: _as_numpy(v) for k, v in variables.items()}, metadata


def _as_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _as_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
