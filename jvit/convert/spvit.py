"""Conversion rules for SP-ViT checkpoints (timm ``CheckpointSaver`` files of ZhouYuxuanYX/SP-ViT).

The jvit module tree mirrors the original's state dict, so the generic mapping does everything
but two checks and one adaptation, done by :func:`prepare`:

* the block types: ``blocks.i.attn.qk.weight`` marks an SP-SA block, ``blocks.i.attn.qkv.weight``
  a plain one; they must agree with the model's explicit ``spsa_blocks`` (the original builds
  them from a run-time argument, and the released SP-ViT-L could differ from what its code builds);
* the ``pos_embed`` layout: ``L`` rows when the class token enters late, ``L + 1`` when it is
  prepended (``cls_insert_block == 0``);
* a ``pos_embed`` for another grid (a 224 checkpoint loaded into a 384 model) is resized with
  PyTorch's own bicubic interpolation, exactly as the original's fine-tune loader does; official 384
  checkpoints already hold the 24x24 table and load unchanged. SP-SA priors need nothing: they
  are recomputed from the offsets of the model's grid.

Wrappers: the released files hold ``state_dict`` and (for EMA runs) ``state_dict_ema``; the
variants' ``PretrainedCfg.weights_keys`` pick what the original evaluated.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from jvit.convert.core import ConversionError, ConversionRules
from jvit.convert.torch_io import _import_torch

log = logging.getLogger("jvit.convert")


def resize_pos_embed(pos_embed: np.ndarray, grid: int, num_prefix: int) -> np.ndarray:
    """Resize a ``[1, prefix + s*s, C]`` position table to ``[1, prefix + grid*grid, C]``.

    The ``num_prefix`` leading rows (a class token's) are kept as they are; the ``s x s`` grid rows
    (row-major) are resized with ``torch.nn.functional.interpolate(mode='bicubic',
    align_corners=False)``, the call the original's fine-tune loader makes, so the result is
    bit-identical to it (PyTorch's bicubic is Keys' kernel with a = -0.75 and border clamping;
    ``jax.image.resize`` uses a = -0.5). Reading the checkpoint needs torch anyway. Without torch
    (``init_from`` a converted directory into a larger model) :mod:`jvit.models.resize` computes the
    same resize in JAX, equal to this to float32 rounding (~1e-7), not bit for bit.
    """
    torch = _import_torch()
    prefix, table = pos_embed[:, :num_prefix], pos_embed[0, num_prefix:]
    old = math.isqrt(table.shape[0])
    if old * old != table.shape[0]:
        raise ConversionError(f"pos_embed has {table.shape[0]} grid rows, not a square grid")
    g = torch.from_numpy(np.ascontiguousarray(table)).reshape(1, old, old, -1).permute(0, 3, 1, 2)
    g = torch.nn.functional.interpolate(g, size=(grid, grid), mode="bicubic", align_corners=False)
    resized = g.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).numpy()
    return np.concatenate([prefix, resized.astype(pos_embed.dtype)], axis=1)


def _check_block_types(state_dict: dict[str, np.ndarray], model) -> None:
    """Fail, naming each block, where the checkpoint's attention type disagrees with ``spsa_blocks``."""
    spsa = set(model.spsa_blocks)
    problems = []
    found_spsa = []
    for i in range(model.depth):
        has_qk = f"blocks.{i}.attn.qk.weight" in state_dict
        has_qkv = f"blocks.{i}.attn.qkv.weight" in state_dict
        if has_qk:
            found_spsa.append(i)
        if has_qk and i not in spsa:
            problems.append(f"block {i}: the checkpoint has SP-SA weights (attn.qk), the model plain attention")
        elif has_qkv and i in spsa:
            problems.append(f"block {i}: the checkpoint has plain attention (attn.qkv), the model SP-SA")
    if problems:
        raise ConversionError(
            "attention types differ between checkpoint and model configuration "
            f"(spsa_blocks={tuple(model.spsa_blocks)}):\n    "
            + "\n    ".join(problems)
            + f"\n  The checkpoint's SP-SA blocks are {tuple(found_spsa)}; if that is right, build the model with "
            f"spsa_blocks={tuple(found_spsa)} (and cls_insert_block after them)."
        )


def _fit_pos_embed(state_dict: dict[str, np.ndarray], model) -> dict[str, np.ndarray]:
    pos = state_dict.get("pos_embed")
    if pos is None or pos.ndim != 3:
        return state_dict  # the strict mapping reports it
    grid = model.img_size // 16
    prefix = int(model.cls_insert_block == 0)  # the class token's row, present only when it enters first
    if pos.shape[1] == grid * grid + prefix:
        return state_dict
    side = math.isqrt(pos.shape[1] - prefix)
    if side * side != pos.shape[1] - prefix:
        layout = "L + 1 rows (class token first)" if prefix else "L rows (late class token, no class row)"
        raise ConversionError(
            f"pos_embed has {pos.shape[1]} rows, which is not the layout of this model: {layout} on a square grid "
            f"(cls_insert_block={model.cls_insert_block}); the checkpoint was made for another class-token placement"
        )
    log.info("resizing pos_embed from %dx%d to %dx%d (bicubic)", side, side, grid, grid)
    return {**state_dict, "pos_embed": resize_pos_embed(pos, grid, prefix)}


def prepare(state_dict: dict[str, np.ndarray], model) -> dict[str, np.ndarray]:
    """Check the block types against the model's configuration and fit ``pos_embed`` to its grid."""
    _check_block_types(state_dict, model)
    return _fit_pos_embed(state_dict, model)


RULES = ConversionRules(family="spvit", head_key="head.weight", prepare=prepare)
