"""Resizing learned position tables to another input size, bit-compatible with the originals' loaders.

The originals that fine-tune at a higher resolution (SP-ViT/LV-ViT, timm's ViTs) resize a learned
``pos_embed`` grid with ``torch.nn.functional.interpolate(grid, size, mode='bicubic',
align_corners=False)``. That is Keys' cubic convolution (Keys 1981, eq. 15) with ``a = -0.75``, source
coordinates ``(dst + 0.5) * in / out - 0.5`` (no clamping of the coordinate, no antialiasing) and
border clamping of the four taps. ``jax.image.resize`` uses ``a = -0.5`` and antialiases when
shrinking, so it differs; here the same kernel is written as one ``[out, in]`` weight matrix per axis
and applied with two einsums, so no torch is needed.

:func:`fit_pos_embed` is what checkpoint loading calls for a ``pos_embed`` whose shape differs from
the model's: a grid table (a square number of rows after an optional class-token row) is resized in
2-D; HVT's per-stage tables (``blocks_i/pos_embed``) live on the 1-D pooled raster sequence with no
2-D meaning (hvt.md section 2.6), so they are resized along that sequence with the same 1-D kernel
(the original never resizes them: this is jvit's extension, the natural one for a sequence table).
"""

from __future__ import annotations

import logging
import math

import jax.numpy as jnp
import numpy as np

log = logging.getLogger("jvit")

KEYS_A = -0.75  # PyTorch's bicubic coefficient (aten upsample_bicubic2d)


def _cubic(x: np.ndarray, a: float = KEYS_A) -> np.ndarray:
    """Keys' cubic convolution kernel W(x) (Keys 1981, eq. 15), support [-2, 2]."""
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x <= 1, near, np.where(x < 2, far, 0.0))


def bicubic_weights(in_size: int, out_size: int) -> np.ndarray:
    """The ``[out_size, in_size]`` matrix of torch's 1-D bicubic resampling (``align_corners=False``).

    Output ``i`` reads source coordinate ``s = (i + 0.5) * in / out - 0.5`` from the four taps
    ``floor(s) - 1 .. floor(s) + 2`` (clamped to the border, so edge taps accumulate) with weights
    ``W(s - tap)``. Rows sum to 1. Computed in float64.
    """
    if in_size < 1 or out_size < 1:
        raise ValueError(f"bicubic resize needs positive sizes, got {in_size} -> {out_size}")
    src = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    base = np.floor(src)
    weights = np.zeros((out_size, in_size), np.float64)
    rows = np.arange(out_size)
    for offset in (-1, 0, 1, 2):
        tap = base + offset
        np.add.at(weights, (rows, np.clip(tap, 0, in_size - 1).astype(np.int64)), _cubic(src - tap))
    return weights


def resize_grid(grid: jnp.ndarray, size: tuple[int, int]) -> jnp.ndarray:
    """Bicubic resize of ``[..., H, W, C]`` to ``[..., size[0], size[1], C]``, as torch's
    ``interpolate(mode='bicubic', align_corners=False)`` on the channels-first layout."""
    wh = jnp.asarray(bicubic_weights(grid.shape[-3], size[0]), jnp.float32)
    ww = jnp.asarray(bicubic_weights(grid.shape[-2], size[1]), jnp.float32)
    x = jnp.einsum("oh,...hwc->...owc", wh, jnp.asarray(grid, jnp.float32))
    return jnp.einsum("pw,...owc->...opc", ww, x).astype(grid.dtype)


def resize_sequence(table: jnp.ndarray, length: int) -> jnp.ndarray:
    """Resize ``[..., L, C]`` along ``L`` with the same 1-D kernel (a ``1 x L`` bicubic grid)."""
    w = jnp.asarray(bicubic_weights(table.shape[-2], length), jnp.float32)
    return jnp.einsum("ol,...lc->...oc", w, jnp.asarray(table, jnp.float32)).astype(table.dtype)


def fit_pos_embed(name: str, table: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """``table`` (a checkpoint's ``[1, N, C]`` ``pos_embed`` named ``name``) resized to ``shape``;
    ``None`` when it is not a position table this can resize (the caller reports the mismatch).

    * a top-level ``pos_embed`` is a row-major square grid, optionally after prefix rows (a class
      token's): the prefix rows are kept, the grid is resized in 2-D (:func:`resize_grid`);
    * a ``pos_embed`` inside a block (HVT's stage tables) is a 1-D sequence (:func:`resize_sequence`).
    """
    parts = name.split("/")
    if parts[-1] != "pos_embed" or len(table.shape) != 3 or len(shape) != 3 or table.shape[::2] != shape[::2]:
        return None
    log.info("resizing %s from %s to %s (bicubic)", name, tuple(table.shape), tuple(shape))
    if len(parts) > 2:  # params/blocks_i/pos_embed: a stage table over the pooled sequence
        return np.asarray(resize_sequence(jnp.asarray(table), shape[1]))
    for prefix in (0, 1):
        old, new = math.isqrt(table.shape[1] - prefix), math.isqrt(shape[1] - prefix)
        if old * old == table.shape[1] - prefix and new * new == shape[1] - prefix:
            grid = table[:, prefix:].reshape(1, old, old, -1)
            resized = np.asarray(resize_grid(jnp.asarray(grid), (new, new))).reshape(1, new * new, -1)
            return np.concatenate([table[:, :prefix], resized], axis=1)
    return None
