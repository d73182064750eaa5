"""Strict mapping of a PyTorch state dict onto a Flax model's variables.

jvit modules are named after the original's ``state_dict`` keys, so most of a conversion is
mechanical:

1. a family's ordered regex ``renames`` turn a torch key into the jvit name
   (``visual_tokens.tokens.stem.0.weight`` -> ``visual_tokens.stem.weight``);
2. numbered children join their parent (``blocks.3.attn`` -> ``blocks_3/attn``);
3. the leaf name and layout follow from the Flax target: ``weight`` becomes ``kernel`` (Linear
   transposed, Conv OIHW -> HWIO, a 1x1 conv onto a Dense squeezed) or ``scale``;
   ``running_mean``/``running_var`` go to ``batch_stats`` ``mean``/``var``; other names (``cls_token``,
   ``pos_embed``) keep theirs, in whichever collection the model declares them.

Every torch key must land on a Flax variable of the same size or be skipped by a rule that says
why; every Flax variable must be filled, or be one the family's ``fresh`` rules initialise (a new
head on a released backbone), again saying why. Anything else fails the conversion with a report naming
each key.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.linen as nn
import numpy as np
from flax import traverse_util

from jvit.utils import abstract_variables, count_params, init_variables

# (regex on the torch key, function(array) -> array in torch layout)
Transform = tuple[str, Callable[[np.ndarray], np.ndarray]]

ALWAYS_SKIP: tuple[tuple[str, str], ...] = (
    (r"(^|\.)num_batches_tracked$", "BatchNorm step counter: unused in eval, no Flax counterpart"),
)


class ConversionError(ValueError):
    """The state dict does not fit the model; the message lists every offending key."""


@dataclasses.dataclass(frozen=True)
class ConversionRules:
    """What a family's converter needs beyond the generic mapping.

    Attributes:
      family: registry family these rules convert.
      head_key: torch key whose first dimension is the number of classes.
      renames: ordered ``(pattern, replacement)`` regex substitutions from torch to jvit names.
      skips: ``(pattern, reason)``: torch keys that are derived constants, deliberately not loaded.
      transforms: ``(pattern, fn)``: torch-layout rewrites applied before the generic layout rules
        (e.g. reordering a per-head interleaved qkv weight).
      prepare: optional ``fn(state_dict, model) -> state_dict`` run first, for whole-dict
        adaptations (e.g. resizing a position table to the model's grid).
      fresh: ``(pattern, reason)``: Flax variables (``'/'``-joined path, e.g. ``params/classifier/...``)
        the checkpoint cannot hold, taken from the model's own initialisation (seed 0) instead.
    """

    family: str
    head_key: str
    renames: tuple[tuple[str, str], ...] = ()
    skips: tuple[tuple[str, str], ...] = ()
    transforms: tuple[Transform, ...] = ()
    prepare: Callable[[dict[str, np.ndarray], nn.Module], dict[str, np.ndarray]] | None = None
    fresh: tuple[tuple[str, str], ...] = ()


@dataclasses.dataclass
class ConversionReport:
    """What a conversion did: the model built, counts per collection, the skipped keys and why."""

    model: str
    num_classes: int | None
    img_size: Any
    weights_key: str | None
    converted: int
    per_collection: dict[str, int]
    skipped: list[tuple[str, str]]
    fresh: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __str__(self) -> str:
        cols = ", ".join(f"{c}: {n:,}" for c, n in sorted(self.per_collection.items()))
        src = f"entry {self.weights_key!r}" if self.weights_key else "a bare state dict"
        lines = [f"{self.model}: converted {self.converted} tensors from {src} ({cols} scalars)"]
        reasons: dict[str, int] = {}
        for _, reason in self.skipped:
            reasons[reason] = reasons.get(reason, 0) + 1
        lines += [f"  skipped {n} x {reason}" for reason, n in reasons.items()]
        initialised: dict[str, int] = {}
        for _, reason in self.fresh:
            initialised[reason] = initialised.get(reason, 0) + 1
        lines += [f"  initialised {n} variables fresh: {reason}" for reason, n in initialised.items()]
        return "\n".join(lines)


def _flax_path(key: str) -> tuple[str, ...]:
    """``blocks.3.attn.qkv.weight`` -> ``('blocks_3', 'attn', 'qkv', 'weight')``."""
    parts: list[str] = []
    for seg in key.split("."):
        if seg.isdigit() and parts:
            parts[-1] = f"{parts[-1]}_{seg}"
        else:
            parts.append(seg)
    return tuple(parts)


def _candidates(path: tuple[str, ...], collections: list[str]) -> list[tuple[str, ...]]:
    *mod, leaf = path
    mod = tuple(mod)
    if leaf == "weight":
        return [("params", *mod, n) for n in ("kernel", "scale", "weight")]
    if leaf == "bias":
        return [("params", *mod, "bias")]
    if leaf == "running_mean":
        return [("batch_stats", *mod, "mean")]
    if leaf == "running_var":
        return [("batch_stats", *mod, "var")]
    return [(c, *mod, leaf) for c in collections]


def _to_flax_layout(w: np.ndarray, target_shape: tuple[int, ...], is_kernel: bool) -> np.ndarray:
    if not is_kernel:
        return w
    if w.ndim == 2 and len(target_shape) == 2:  # Linear (out, in) -> Dense (in, out)
        return w.T
    if w.ndim == 4 and len(target_shape) == 4:  # Conv2d OIHW -> HWIO
        return w.transpose(2, 3, 1, 0)
    if w.ndim == 4 and len(target_shape) == 2 and w.shape[2:] == (1, 1):  # 1x1 conv onto a Dense
        return w[:, :, 0, 0].T
    if w.ndim == 3 and len(target_shape) == 3:  # Conv1d OIW -> WIO
        return w.transpose(2, 1, 0)
    return w


def convert_state_dict(
    state_dict: Mapping[str, np.ndarray],
    model: nn.Module,
    rules: ConversionRules,
    *,
    model_name: str = "",
    weights_key: str | None = None,
) -> tuple[dict[str, Any], ConversionReport]:
    """Map ``state_dict`` (numpy arrays, torch names and layouts) onto ``model``'s variables.

    Returns:
      ``(variables, report)``: ``variables`` is a nested dict per collection of float32 numpy
      arrays, ready for ``model.apply``.

    Raises:
      ConversionError: listing every missing, unexpected, duplicated or shape-mismatched key.
    """
    sd = dict(state_dict)
    if rules.prepare is not None:
        sd = rules.prepare(sd, model)
    target = traverse_util.flatten_dict(abstract_variables(model))
    collections = sorted({p[0] for p in target})
    skips = ALWAYS_SKIP + rules.skips
    out: dict[tuple[str, ...], np.ndarray] = {}
    source_of: dict[tuple[str, ...], str] = {}
    skipped: list[tuple[str, str]] = []
    unexpected: list[str] = []
    mismatched: list[str] = []
    duplicated: list[str] = []

    for key, w in sd.items():
        reason = next((r for pat, r in skips if re.search(pat, key)), None)
        if reason is not None:
            skipped.append((key, reason))
            continue
        name = key
        for pat, repl in rules.renames:
            name = re.sub(pat, repl, name)
        path = _flax_path(name)
        dest = next((c for c in _candidates(path, collections) if c in target), None)
        if dest is None:
            unexpected.append(f"{key} (looked for {'/'.join(_candidates(path, collections)[0])})")
            continue
        if dest in out:
            duplicated.append(f"{key} and {source_of[dest]} both map to {'/'.join(dest)}")
            continue
        w = np.asarray(w)
        for pat, fn in rules.transforms:
            if re.search(pat, key):
                w = fn(w)
        shape = tuple(target[dest].shape)
        w = _to_flax_layout(w, shape, dest[-1] == "kernel")
        if w.shape != shape:
            mismatched.append(f"{key} {tuple(np.shape(sd[key]))} -> {'/'.join(dest)} expects {shape}")
            continue
        out[dest] = w.astype(target[dest].dtype)
        source_of[dest] = key

    fresh: list[tuple[str, str]] = []
    for p in target:
        reason = next((r for pat, r in rules.fresh if re.search(pat, "/".join(p))), None)
        if reason is not None and p not in out:
            fresh.append(("/".join(p), reason))
    if fresh:
        init = traverse_util.flatten_dict(init_variables(model, 0), sep="/")
        for name, _ in fresh:
            out[tuple(name.split("/"))] = np.asarray(init[name])
    missing = ["/".join(p) for p in target if p not in out]
    problems = []
    for title, items in (
        ("missing (in the model, not in the checkpoint)", missing),
        ("unexpected (in the checkpoint, not in the model)", unexpected),
        ("shape mismatch", mismatched),
        ("duplicate targets", duplicated),
    ):
        if items:
            problems.append(f"{len(items)} {title}:\n    " + "\n    ".join(items))
    label = model_name or type(model).__name__
    if problems:
        raise ConversionError(f"state dict does not fit {label}:\n  " + "\n  ".join(problems))

    variables = traverse_util.unflatten_dict(out)
    report = ConversionReport(
        model=label,
        num_classes=getattr(model, "num_classes", None),
        img_size=getattr(model, "img_size", None),
        weights_key=weights_key,
        converted=len(out),
        per_collection={c: count_params(v) for c, v in variables.items()},
        skipped=skipped,
        fresh=fresh,
    )
    return variables, report
