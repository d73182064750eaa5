"""Reading PyTorch checkpoint files safely and picking the weights the original evaluated.

Released files are pickles: loading one with ``weights_only=False`` runs whatever code the pickle
names. jvit loads with ``torch.load(weights_only=True)`` and allow-lists exactly the harmless
extra types the released files of our families hold (``argparse.Namespace`` of training args).
Anything else is refused, naming the offending globals, unless the caller passes ``trust=True``.
"""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Mapping
from typing import Any

import numpy as np

# Types found next to the weights in released checkpoints that carry data, never code.
SAFE_EXTRA_TYPES: tuple[type, ...] = (argparse.Namespace,)


class UnsafeCheckpointError(RuntimeError):
    """The file needs arbitrary code to unpickle; load it only with ``trust=True`` if you trust it."""


class CheckpointFormatError(ValueError):
    """The file does not hold a state dict in a layout jvit knows."""


def _import_torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - exercised only without torch
        raise ImportError(
            "reading PyTorch checkpoints needs torch; install a CPU build, e.g. "
            "`pip install 'jvit[convert]'` or `pip install torch --index-url https://download.pytorch.org/whl/cpu`"
        ) from e
    return torch


def load_checkpoint_file(path: str | os.PathLike, *, trust: bool = False) -> Any:
    """Unpickle a ``.pth``/``.pth.tar`` file without running code from it.

    Args:
      path: the checkpoint file.
      trust: if true, fall back to PyTorch's unrestricted unpickler. Only for files from a source
        you trust: a malicious file then runs arbitrary code.

    Raises:
      FileNotFoundError: ``path`` does not exist.
      UnsafeCheckpointError: the file references globals outside PyTorch's safe set and
        :data:`SAFE_EXTRA_TYPES` (named in the message); nothing from it was executed.
      CheckpointFormatError: the file is empty, truncated, corrupt or not a PyTorch checkpoint.
    """
    torch = _import_torch()
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    _check_container(path)
    if trust:
        return torch.load(path, map_location="cpu", weights_only=False)
    with torch.serialization.safe_globals(list(SAFE_EXTRA_TYPES)):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch's restricted unpickler reports a refused global in its message
            culprits = _unsafe_globals(torch, path, str(e))
            if not culprits:
                raise CheckpointFormatError(
                    f"cannot read {path}: it is truncated, corrupt or not a PyTorch checkpoint "
                    f"({type(e).__name__}: {_first_line(e)})"
                ) from e
            raise UnsafeCheckpointError(
                f"refusing to unpickle {path}: it references {', '.join(culprits)}, outside the allow-list "
                f"(torch's safe types + {', '.join(t.__module__ + '.' + t.__qualname__ for t in SAFE_EXTRA_TYPES)}). "
                "Nothing from the file was executed. If you trust its source, pass trust=True (converter CLI: "
                "--trust-checkpoint; for training, convert it once with tools/convert_torch.py --trust-checkpoint "
                "and set init_from to the converted directory)"
            ) from e


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0][:200] if text else "no details"


def _check_container(path: str) -> None:
    """A PyTorch checkpoint is a zip archive (torch >= 1.6) or a pickle stream (legacy format):
    tell an empty, truncated or foreign file apart before unpickling anything."""
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointFormatError(f"{path} is empty (0 bytes): not a checkpoint; re-download or re-copy it")
    if head.startswith(b"PK"):
        import zipfile

        try:
            with zipfile.ZipFile(path) as z:
                z.namelist()
        except (zipfile.BadZipFile, OSError) as e:
            raise CheckpointFormatError(
                f"{path} is a damaged zip archive (truncated or corrupt: {e}); re-download or re-copy it"
            ) from e
    elif head[:1] != b"\x80":  # every pickle protocol >= 2 starts with PROTO
        raise CheckpointFormatError(
            f"{path} is not a PyTorch checkpoint (neither a zip archive nor a pickle; it starts with {head!r})"
        )


def _unsafe_globals(torch, path: str, message: str) -> list[str]:
    """The globals outside the allow-list that ``path`` references: from torch's scan of a zip
    checkpoint, else (legacy files, which torch cannot scan) from its refusal message."""
    allowed = {f"{t.__module__}.{t.__qualname__}" for t in SAFE_EXTRA_TYPES}
    try:
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) file
        found = []
    # torch names a builtin without its module ("GLOBAL exec")
    found += [g if "." in g else f"builtins.{g}" for g in re.findall(r"\bGLOBAL ([\w.]+)", message)]
    return sorted({g for g in found if g not in allowed})


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(hasattr(v, "shape") for v in obj.values())


def select_state_dict(
    checkpoint: Any, preferred: tuple[str, ...], weights_key: str | None = None
) -> tuple[dict[str, Any], str | None]:
    """Unwrap a checkpoint dict to one state dict.

    Args:
      checkpoint: what :func:`load_checkpoint_file` returned.
      preferred: wrapper keys in the order the original evaluated them (e.g.
        ``('state_dict_ema', 'state_dict')``); the first present wins.
      weights_key: pick this wrapper entry instead (e.g. ``'state_dict'`` for the non-EMA weights).

    Returns:
      ``(state_dict, key)`` with ``module.`` prefixes removed; ``key`` is ``None`` for a bare state dict.
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointFormatError(f"expected a dict in the checkpoint, got {type(checkpoint).__name__}")
    if weights_key is not None:
        if weights_key not in checkpoint:
            raise CheckpointFormatError(
                f"checkpoint has no entry {weights_key!r}; its entries are {sorted(map(str, checkpoint))}"
            )
        key, sd = weights_key, checkpoint[weights_key]
    elif _is_state_dict(checkpoint):
        key, sd = None, checkpoint
    else:
        present = [k for k in preferred if k in checkpoint and _is_state_dict(checkpoint[k])]
        if not present:
            raise CheckpointFormatError(
                f"no weights found: expected one of {list(preferred)} or a bare state dict; "
                f"the checkpoint's entries are {sorted(map(str, checkpoint))}"
            )
        key, sd = present[0], checkpoint[present[0]]
    if not _is_state_dict(sd):
        raise CheckpointFormatError(f"checkpoint entry {key!r} is not a state dict of tensors")
    return {_strip_module(k): v for k, v in sd.items()}, key


def _strip_module(key: str) -> str:
    while key.startswith("module."):
        key = key[len("module.") :]
    return key


def to_numpy(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Tensors to numpy arrays on the host (floating tensors keep their width; bf16 becomes float32)."""
    out = {}
    for k, v in state_dict.items():
        if hasattr(v, "detach"):
            v = v.detach().cpu()
            if str(v.dtype) == "torch.bfloat16":
                v = v.float()
            v = v.numpy()
        out[k] = np.asarray(v)
    return out
