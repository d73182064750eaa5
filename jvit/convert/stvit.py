"""Conversion rules for STViT checkpoints (the original ``main.py`` files).

Released files are ``{'model': state_dict, 'model_ema': ..., 'optimizer': ..., 'args': Namespace,
...}``; the original evaluates ``'model'`` (``PretrainedCfg.weights_keys``), ``weights_key='model_ema'``
picks the EMA copy. Module names mirror the original, so besides the generic mapping only three
things need care:

* ``stoken_refine.qkv`` is a 1x1 conv whose 3C output channels are grouped per head
  (``head, q|k|v, channel``); jvit's :class:`~jvit.models.layers.Attention` expects timm's
  ``(q|k|v, head, channel)``. The permutation needs the stage's head count, hence a ``prepare`` hook.
* layer scale ``gamma_1``/``gamma_2`` is stored ``(1, C, 1, 1)``; jvit keeps ``(C,)``.
* every block stores the constant one-hot 3x3 kernels of the original's Unfold/Fold helpers;
  jvit expresses those as shifted slices, so they are skipped (in ``model_ema`` they are even
  EMA-averaged and may have drifted from exact 0/1 by rounding).
"""

from __future__ import annotations

import re

import flax.linen as nn
import numpy as np

from jvit.convert.core import ConversionError, ConversionRules

_QKV = re.compile(r"^layers\.(\d+)\.blocks\.\d+\.attn\.stoken_refine\.qkv\.(weight|bias)$")


def per_head_to_timm_qkv(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder the output channels (axis 0) of a fused qkv weight/bias from ``(head, q|k|v, d)``
    to ``(q|k|v, head, d)``."""
    width = w.shape[0]
    if width % (3 * num_heads):
        raise ConversionError(f"qkv output width {width} is not divisible by 3 x {num_heads} heads")
    d = width // (3 * num_heads)
    order = np.arange(width).reshape(num_heads, 3, d).transpose(1, 0, 2).reshape(-1)
    return w[order]


def reorder_qkv(state_dict: dict[str, np.ndarray], model: nn.Module) -> dict[str, np.ndarray]:
    """Apply :func:`per_head_to_timm_qkv` to every block's ``stoken_refine.qkv`` with its stage's heads."""
    out = {}
    for key, w in state_dict.items():
        m = _QKV.match(key)
        if m is not None:
            stage = int(m.group(1))
            if stage >= len(model.num_heads):
                raise ConversionError(f"{key}: the model has only {len(model.num_heads)} stages")
            w = per_head_to_timm_qkv(np.asarray(w), model.num_heads[stage])
        out[key] = w
    return out


RULES = ConversionRules(
    family="stvit",
    head_key="head.weight",
    renames=((r"\.norm1\.norm\.", ".norm1."),),  # LayerNorm2d wrapper -> the LayerNorm itself
    skips=(
        (
            r"\.attn\.(unfold|fold)\.weights$",
            "constant one-hot 3x3 Unfold/Fold kernels of STA: jvit uses shifted slices instead",
        ),
    ),
    transforms=((r"\.gamma_[12]$", lambda w: w.reshape(-1)),),
    prepare=reorder_qkv,
)
