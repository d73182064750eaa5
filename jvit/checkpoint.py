"""Saving and loading model variables: one story for converted weights and training runs.

A converted model is a directory holding ``variables/`` (an orbax ``StandardCheckpointer``
checkpoint of the variables tree) and ``jvit.json`` (which model, classes, input size, and where the
weights came from), so it can be rebuilt without remembering how it was made.

A ``jvit.main`` run directory (``<workdir>``) or one of its steps (``<workdir>/checkpoints/<step>``)
is read the same way: its ``state`` item (the trainer's ``TrainState`` pytree: ``step``, ``params``,
``opt_state``, ``collections``, ``ema``) is restored as a plain tree, without the trainer, and its
metadata come from ``<workdir>/jvit.json`` (written by :func:`write_run_metadata`) or, for runs made
before that file existed, from ``<workdir>/config.json``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from jvit import registry

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
    _write_json(os.path.join(directory, METADATA_FILE), metadata)
    return directory


def write_run_metadata(
    workdir: str | os.PathLike,
    *,
    model: str,
    num_classes: int,
    img_size: int,
    classes: Sequence[str] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    source: str = "jvit.main",
    **fields: Any,
) -> str:
    """Write ``<workdir>/jvit.json`` for a training run, the metadata a converted directory carries.

    Args:
      workdir: the run directory (created if missing).
      model: registered variant name.
      num_classes: classifier width.
      img_size: square input side the run trains at.
      classes: human-readable class names in label order, when the dataset has them.
      model_kwargs: ``create_model`` overrides of the run (JSON-serialisable; dtypes as strings).
      source: where the weights come from (e.g. ``"jvit.main"`` or the ``init_from`` path).
      **fields: further JSON-serialisable facts; ``crop_pct``, ``interpolation``, ``mean`` and ``std``
        (the run's eval transform) are used by ``jvit predict``.

    Returns the file's path.
    """
    if classes is not None and len(classes) != num_classes:
        raise ValueError(f"{len(classes)} class names for num_classes={num_classes}")
    metadata = {
        "model": model,
        "num_classes": int(num_classes),
        "img_size": int(img_size),
        "source": source,
        "classes": list(classes) if classes is not None else None,
        "model_kwargs": dict(model_kwargs or {}),
        **fields,
    }
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(os.path.abspath(os.fspath(workdir)), METADATA_FILE)
    _write_json(path, metadata)
    return path


def read_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The metadata of a converted directory, a run directory or a run's step directory.

    Always has ``model``, ``num_classes`` and ``img_size`` (``None`` where a converted directory
    predates them: use the variant's defaults); may have ``classes`` (names in label order),
    ``model_kwargs`` (``create_model`` overrides), ``source`` and, for a run, ``workdir`` and ``step``.
    """
    kind, directory, workdir = _classify(path)
    if kind == "converted":
        metadata = _read_json(os.path.join(directory, METADATA_FILE))
        metadata.setdefault("num_classes", None)
        metadata.setdefault("img_size", None)
        return metadata
    meta_path = os.path.join(workdir, METADATA_FILE)
    if os.path.isfile(meta_path):
        metadata = _read_json(meta_path)
    else:
        # A run written before the trainer wrote jvit.json: its resolved config has the same facts.
        config = _read_json(os.path.join(workdir, "config.json"))
        metadata = {
            "model": config["model"]["name"],
            "num_classes": config["model"]["num_classes"],
            "img_size": config["model"]["img_size"],
            "classes": None,
            "source": "jvit.main",
            "model_kwargs": config["model"].get("kwargs", {}),
            "crop_pct": config["input"].get("crop_pct"),
            "interpolation": config["input"].get("eval_interpolation"),
            "mean": config["input"].get("mean"),
            "std": config["input"].get("std"),
        }
    step_dir = directory if kind == "step" else _latest_step_dir(workdir)
    return {**metadata, "workdir": workdir, "step": int(os.path.basename(step_dir))}


def load_variables(path: str | os.PathLike, ema: bool = False) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(variables, metadata)`` of a converted directory (:func:`save_variables`), a ``jvit.main``
    run directory (its latest checkpoint) or a step directory ``<workdir>/checkpoints/<step>``.

    Args:
      path: one of the three directories.
      ema: take a run's exponential-moving-average weights instead of the raw ones (an error for a
        run trained without EMA and for a converted directory, which holds one set of weights).

    Variables are host numpy arrays; metadata as :func:`read_metadata`.
    """
    kind, directory, workdir = _classify(path)
    metadata = read_metadata(directory)
    if kind == "converted":
        if ema:
            raise ValueError(
                f"{directory} is a converted checkpoint with one set of weights; "
                f"the EMA choice was made at conversion (its weights_key)"
            )
        variables = ocp.StandardCheckpointer().restore(os.path.join(directory, "variables"))
        return {k: _as_numpy(v) for k, v in variables.items()}, metadata
    step_dir = directory if kind == "step" else _latest_step_dir(workdir)
    state = _restore_train_state(os.path.join(step_dir, "state"))
    collections = state.get("collections") or {}
    if ema:
        if not state.get("ema"):
            raise ValueError(f"{step_dir} holds no EMA weights (the run had ema.decay=0); load without ema")
        variables = {**collections, **state["ema"]}
    else:
        variables = {"params": state["params"], **collections}
    return variables, {**metadata, "weights": "ema" if ema else "raw"}


def create_model(metadata: dict[str, Any]):
    """The ``flax.linen`` module the metadata describe (variant, classes, input size, overrides),
    in float32 whatever the run trained in."""
    kwargs = {k: v for k, v in (metadata.get("model_kwargs") or {}).items() if k != "dtype"}
    return registry.create_model(
        metadata["model"], num_classes=metadata.get("num_classes"), img_size=metadata.get("img_size"), **kwargs
    )


def _restore_train_state(state_dir: str) -> dict[str, Any]:
    """The ``state`` item of a train checkpoint as a plain tree of host arrays, whatever devices it
    was saved from (restoring every leaf as ``np.ndarray`` needs no abstract target or mesh)."""
    checkpointer = ocp.PyTreeCheckpointer()
    tree = checkpointer.metadata(state_dir)
    tree = getattr(tree, "item_metadata", tree)
    tree = getattr(tree, "tree", tree)
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    return checkpointer.restore(state_dir, restore_args=restore_args)


def _classify(path: str | os.PathLike) -> tuple[str, str, str | None]:
    """``(kind, directory, workdir)``: kind is ``converted``, ``run`` or ``step``."""
    directory = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: no such directory")
    if os.path.isdir(os.path.join(directory, "variables")) and os.path.isfile(os.path.join(directory, METADATA_FILE)):
        return "converted", directory, None
    if os.path.isdir(os.path.join(directory, "checkpoints")):
        return "run", directory, directory
    parent = os.path.dirname(directory)
    if (
        _STEP.fullmatch(os.path.basename(directory))
        and os.path.basename(parent) == "checkpoints"
        and os.path.isdir(os.path.join(directory, "state"))
    ):
        return "step", directory, os.path.dirname(parent)
    raise FileNotFoundError(
        f"{directory} is not a jvit checkpoint: expected a converted directory (variables/ and {METADATA_FILE}), "
        f"a jvit.main run directory (checkpoints/) or a step directory (checkpoints/<step>/state)"
    )


_STEP = re.compile(r"\d+")


def _latest_step_dir(workdir: str) -> str:
    root = os.path.join(workdir, "checkpoints")
    # Only finished steps: orbax writes into "<step>.orbax-checkpoint-tmp-*" and renames when done.
    steps = [int(n) for n in os.listdir(root) if _STEP.fullmatch(n) and os.path.isdir(os.path.join(root, n, "state"))]
    if not steps:
        raise FileNotFoundError(f"{workdir} has no finished checkpoint under checkpoints/")
    return os.path.join(root, str(max(steps)))


def _write_json(path: str, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.write("\n")


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing; {os.path.dirname(path)} is not a complete jvit checkpoint")
    with open(path) as f:
        return json.load(f)


def _as_numpy(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {k: _as_numpy(v) for k, v in tree.items()}
    return np.asarray(tree)
