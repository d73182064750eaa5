"""PyTorch -> jvit conversion of the originals' released checkpoints.

variables = jvit.convert.load_torch_checkpoint("So-ViT-7.pth.tar", "sovit_7")
logits = jvit.create_model("sovit_7").apply(variables, images_nhwc, train=False)
"""

from __future__ import annotations

import logging
import os
from typing import Any

from jvit.convert import deit, hvt, layout, sot, spvit, stvit, swin
from jvit.convert.core import ConversionError, ConversionReport, ConversionRules, convert_state_dict
from jvit.convert.torch_io import (
    CheckpointFormatError,
    UnsafeCheckpointError,
    load_checkpoint_file,
    select_state_dict,
    to_numpy,
)
from jvit.registry import create_model, get_model_entry, get_pretrained_cfg
from jvit.utils import abstract_variables

__all__ = [
    "CheckpointFormatError",
    "ConversionError",
    "ConversionReport",
    "ConversionRules",
    "UnsafeCheckpointError",
    "convert_checkpoint",
    "convert_state_dict",
    "layout",
    "load_checkpoint_file",
    "load_torch_checkpoint",
    "rules_for",
]

log = logging.getLogger("jvit.convert")

_RULES: dict[str, ConversionRules] = {
    r.family: r
    for r in (sot.RULES, hvt.RULES, spvit.RULES, stvit.RULES, deit.RULES, deit.SOT_RULES, swin.RULES, swin.SOT_RULES)
}


def rules_for(name: str) -> ConversionRules:
    """The conversion rules of the family model ``name`` belongs to."""
    family = get_model_entry(name).family
    if family not in _RULES:
        raise NotImplementedError(f"no PyTorch converter for family {family!r} (model {name!r}) yet")
    return _RULES[family]


def convert_checkpoint(
    path: str | os.PathLike,
    name: str,
    num_classes: int | None = None,
    img_size: int | None = None,
    *,
    weights_key: str | None = None,
    trust: bool = False,
    **model_kwargs: Any,
) -> tuple[dict[str, Any], ConversionReport]:
    """Like :func:`load_torch_checkpoint`, also returning the :class:`ConversionReport`."""
    rules = rules_for(name)
    cfg = get_pretrained_cfg(name, img_size)
    checkpoint = load_checkpoint_file(path, trust=trust)
    state_dict, used_key = select_state_dict(checkpoint, cfg.weights_keys, weights_key)
    state_dict = to_numpy(state_dict)
    if num_classes is None:
        head = state_dict.get(rules.head_key)
        num_classes = int(head.shape[0]) if head is not None else cfg.num_classes
    model = create_model(name, num_classes=num_classes, img_size=img_size, **model_kwargs)
    # A scanned model converts as its unrolled twin (the originals' one-entry-per-block layout), then
    # stacks its blocks the way the model holds them (all in ``blocks``, or runs ``blocks_<a>-<b>``).
    scanned = bool(getattr(model, "scan_blocks", False))
    target = model.clone(scan_blocks=False) if scanned else model
    variables, report = convert_state_dict(state_dict, target, rules, model_name=name, weights_key=used_key)
    if scanned:
        variables = layout.match_layout(variables, abstract_variables(model))
    log.info("%s", report)
    return variables, report


def load_torch_checkpoint(
    path: str | os.PathLike,
    name: str,
    num_classes: int | None = None,
    img_size: int | None = None,
    *,
    weights_key: str | None = None,
    trust: bool = False,
    **model_kwargs: Any,
) -> dict[str, Any]:
    """Read an original PyTorch checkpoint as variables for ``jvit.create_model(name, ...)``.

    Args:
      path: the released ``.pth``/``.pth.tar`` file (or any file in the same layout).
      name: registered model name, e.g. ``"sovit_7"``.
      num_classes: classifier width; inferred from the checkpoint's head when omitted.
      img_size: input side the model is built for (default: the variant's official resolution).
      weights_key: wrapper entry to read instead of the one the original evaluated (e.g.
        ``"state_dict"`` for non-EMA weights of a SoT file).
      trust: allow arbitrary unpickling; only for files from a trusted source.
      **model_kwargs: forwarded to :func:`jvit.create_model`; with ``scan_blocks=True`` the variables come
        in the stacked layout of a scanned model (:mod:`jvit.convert.layout`).

    Returns:
      The variables dict (``params`` and, per family, ``batch_stats`` / ``frozen``) for
      ``model.apply(variables, images_nhwc, train=False)``.

    Raises:
      UnsafeCheckpointError, CheckpointFormatError, ConversionError: with messages naming the problem.
    """
    variables, _ = convert_checkpoint(
        path, name, num_classes, img_size, weights_key=weights_key, trust=trust, **model_kwargs
    )
    return variables
