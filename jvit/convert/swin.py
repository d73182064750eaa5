"""Conversion rules for Swin Transformer checkpoints (microsoft/Swin-Transformer releases, ``{'model': ...}``).

Module names follow the original's (``patch_embed.proj``/``norm``, ``layers.<i>.blocks.<j>.attn.qkv``,
``...attn.relative_position_bias_table``, ``layers.<i>.downsample.reduction``/``norm``, ``norm``,
``head``), so the generic mapping loads every parameter. Two kinds of buffers are derived constants
that jvit computes from the window size and token map instead of loading:

* ``relative_position_index`` (``[M*M, M*M]``): checked equal to
  :func:`jvit.models.swin.relative_position_index` before it is skipped;
* ``attn_mask`` of shifted blocks (``[nW, M*M, M*M]``): checked equal to
  :func:`jvit.models.swin.shifted_window_mask` of that block's map, window and shift.

A checkpoint whose buffers differ (another window size or resolution than the model) fails the
conversion, naming the block.

``swin_*_sot`` variants (family ``swin_sot``) load the released backbone; Swin's linear head on the
token mean has no counterpart in SoT's visual-token head (there is no class token), so it is skipped
and the whole ``classifier`` is initialised fresh.
"""

from __future__ import annotations

import re

import flax.linen as nn
import numpy as np

from jvit.convert.core import ConversionError, ConversionRules
from jvit.models.swin import relative_position_index, shifted_window_mask

_BUFFER = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.(attn\.relative_position_index|attn_mask)$")


def check_derived_buffers(state_dict: dict[str, np.ndarray], model: nn.Module) -> dict[str, np.ndarray]:
    """Verify every ``relative_position_index`` / ``attn_mask`` buffer equals the one jvit derives for
    ``model`` (the buffers are then skipped); raise :class:`ConversionError` listing the differing ones."""
    bad = []
    for key, value in state_dict.items():
        m = _BUFFER.match(key)
        if m is None:
            continue
        stage, block = int(m.group(1)), int(m.group(2))
        if stage >= len(model.depths):
            continue  # left for the strict mapping to report as unexpected
        res = model.img_size // model.patch_size // 2**stage
        window = min(model.window_size, res)
        value = np.asarray(value)
        if m.group(3) == "attn_mask":
            shift = window // 2 if (block % 2 and res > model.window_size) else 0
            expect = shifted_window_mask(res, res, window, shift) if shift else None
        else:
            expect = relative_position_index(window)
        if expect is None or value.shape != expect.shape or not np.array_equal(value, expect):
            bad.append(
                f"{key} {value.shape}: differs from the {res}x{res} map's window {window} "
                f"{'mask' if m.group(3) == 'attn_mask' else 'index'}"
            )
    if bad:
        raise ConversionError(
            "derived Swin buffers do not match the model (another window size or img_size?):\n  " + "\n  ".join(bad)
        )
    return state_dict


_SKIPS = (
    (r"\.attn\.relative_position_index$", "relative position index: derived from the window size (verified equal)"),
    (r"\.attn_mask$", "shifted-window attention mask: derived from the map and shift (verified equal)"),
)

RULES = ConversionRules(family="swin", head_key="head.weight", skips=_SKIPS, prepare=check_derived_buffers)

SOT_RULES = ConversionRules(
    family="swin_sot",
    head_key="head.weight",
    skips=_SKIPS + ((r"^head\.", "Swin's linear head on the token mean: SoT's visual-token head replaces it"),),
    prepare=check_derived_buffers,
    fresh=(
        (r"^params/classifier/", "SoT's visual-token second-order head (MGCrP + svPN, visual_fc): no released weights"),
    ),
)
