"""Token labeling targets and loss (Jiang et al., 2021, "All Tokens Matter: Token Labeling for
Training Better Vision Transformers"; LV-ViT/SP-ViT's ``mixup_target`` with dense score maps and
``TokenLabelCrossEntropy``).

A teacher's top-5 logits at every location of an ``S' x S'`` map are stored per image; the
training crop's box cuts the matching region out of the map and resamples it to the student's
``S x S`` token grid with torchvision's ``roi_align`` (bilinear, adaptive sampling). Here that
resampling is done with two per-axis weight matrices (an axis-aligned box makes it separable), so
everything is one einsum with static shapes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def _roi_align_weights(start: jax.Array, end: jax.Array, out_size: int, in_size: int) -> jax.Array:
    """Per-axis weights ``[out_size, in_size]`` of torchvision ``roi_align`` (``aligned=False``,
    ``spatial_scale=1``, ``sampling_ratio=-1``) for one box edge pair ``[start, end]`` (map pixels).

    roi_align averages ``grid = ceil(roi_len / out_size)`` bilinear samples per output bin and axis,
    at ``start + p * bin + (i + 0.5) * bin / grid`` with ``roi_len = max(end - start, 1)``. The
    average of products of per-axis bilinear weights factorises into these matrices. ``grid``
    depends on the box, so samples are laid out up to a static bound (boxes inside the map have
    ``roi_len <= in_size``; one map pixel of margin for rounding) and the unused ones masked out.
    Bilinear edge rule (torchvision ``bilinear_interpolate``): a sample below -1 or above
    ``in_size`` contributes nothing, one in ``[-1, 0]`` reads pixel 0, one at or past the last pixel
    reads the last pixel.
    """
    max_grid = math.ceil((in_size + 1) / out_size)
    roi_len = jnp.maximum(end - start, 1.0)
    bin_size = roi_len / out_size
    grid = jnp.ceil(roi_len / out_size)
    p = jnp.arange(out_size, dtype=jnp.float32)[:, None]
    i = jnp.arange(max_grid, dtype=jnp.float32)[None, :]
    # Same operation order as torchvision's kernel, for float32 agreement.
    c = start + p * bin_size + (i + 0.5) * bin_size / grid  # [out_size, max_grid]
    keep = (i < grid) & (c >= -1.0) & (c <= in_size)
    c = jnp.maximum(c, 0.0)
    low = jnp.floor(c)
    at_edge = low >= in_size - 1
    low = jnp.where(at_edge, in_size - 1, low)
    frac = jnp.where(at_edge, 0.0, c - low)
    high = jnp.where(at_edge, low, low + 1)
    pixels = jnp.arange(in_size, dtype=jnp.float32)
    w = (pixels == low[..., None]) * (1.0 - frac[..., None]) + (pixels == high[..., None]) * frac[..., None]
    return (w * keep[..., None]).sum(axis=1) / grid


def _smoothed(probs: jax.Array, smoothing: float) -> jax.Array:
    """The original's label smoothing of a probability vector: ``p * on + off`` with
    ``off = smoothing / K`` and ``on = 1 - smoothing + off``. Not renormalised: rows sum to
    ``1 + smoothing / K``, as in the original."""
    off = smoothing / probs.shape[-1]
    return probs * (1.0 - smoothing + off) + off


def dense_targets(
    score_map: jax.Array,
    crop_box: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    label_size: int,
    smoothing: float,
    transposed_crop: bool = True,
) -> dict[str, jax.Array]:
    """Token-labeling targets of a batch (the original's ``mixup_target`` ->
    ``get_labelmaps_with_coords``, SP-ViT spec §6.1).

    Args:
      score_map: ``[B, 2, N, S', S']``: the teacher's top-N logits at each map location and their
        class ids (as floats).
      crop_box: ``[B, 4]`` the training crop's normalised ``(top, left, height, width)``.
      labels: ``[B]`` int ground-truth classes.
      label_size: ``S``, the student's token grid side.
      transposed_crop: read the box as the original does: its roi_align box row
        ``[top, left, top + h, left + w] * S' - 0.5`` is taken as ``(x1, y1, x2, y2)``, so the crop's
        vertical range selects map COLUMNS and its horizontal range map ROWS. ``False`` crops rows
        ``top..top+h`` and columns ``left..left+w``.

    Returns:
      ``image``: ``[B, K]`` smoothed one-hot ground truth; ``crop``: ``[B, K]`` the crop-level label
      (roi_align to 1x1); ``tokens``: ``[B, S*S, K]`` per-token labels, row-major. The crop and token
      labels are the softmax of the resampled logits (classes outside a location's top-N count as
      logit 0), smoothed with :func:`_smoothed`.
    """
    values, ids = score_map[:, 0], score_map[:, 1].astype(jnp.int32)
    in_size = score_map.shape[-1]
    # Dense logit map [B, S', S', K]: each location's top-N values at their class ids, 0 elsewhere.
    dense = (jax.nn.one_hot(ids, num_classes, dtype=values.dtype) * values[..., None]).sum(axis=1)

    top, left, height, width = (crop_box[:, i].astype(jnp.float32) for i in range(4))
    vertical = (top * in_size - 0.5, (top + height) * in_size - 0.5)
    horizontal = (left * in_size - 0.5, (left + width) * in_size - 0.5)
    row_span, col_span = (horizontal, vertical) if transposed_crop else (vertical, horizontal)

    def resample(out_size: int) -> jax.Array:
        """roi_align of the dense map over the crop to ``[B, out_size, out_size, K]``."""
        wy = jax.vmap(_roi_align_weights, in_axes=(0, 0, None, None))(*row_span, out_size, in_size)
        wx = jax.vmap(_roi_align_weights, in_axes=(0, 0, None, None))(*col_span, out_size, in_size)
        return jnp.einsum("biy,bjx,byxk->bijk", wy, wx, dense)

    crop = _smoothed(jax.nn.softmax(resample(1)[:, 0, 0], axis=-1), smoothing)
    tokens = _smoothed(jax.nn.softmax(resample(label_size), axis=-1), smoothing)
    # timm ``one_hot(labels, K, on_value=on, off_value=off)``: unlike _smoothed, the true class gets
    # ``on`` itself (rows sum to 1).
    off = smoothing / num_classes
    image = jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), 1.0 - smoothing + off, off)
    return {"image": image, "crop": crop, "tokens": tokens.reshape(tokens.shape[0], -1, num_classes)}


def _soft_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """``-sum_k t_k log softmax(z)_k`` over the last axis (timm ``SoftTargetCrossEntropy`` per row)."""
    return -(targets * jax.nn.log_softmax(logits, axis=-1)).sum(axis=-1)


def token_label_loss(
    cls_logits: jax.Array,
    aux_logits: jax.Array,
    targets: dict[str, jax.Array] | jax.Array,
    lam: jax.Array | float,
) -> jax.Array:
    """Per-example token-labeling loss ``[B]`` (the original's ``TokenLabelCrossEntropy`` with
    ``dense_weight = cls_weight = 1``): ``CE(cls_logits, t_cls) + mean_L CE(aux_logits, t_tokens)``.

    ``targets`` is either the dict of :func:`dense_targets` (``t_cls`` = the teacher's crop-level
    label ``crop``, ``t_tokens`` = ``tokens [B, L, K]``) or an image-level ``[B, K]`` target used
    for the class token and every token (the original without dense maps). ``t_cls`` is mixed with
    the MixToken ``lam``: ``lam * t + (1 - lam) * t[::-1]`` (``lam = 1``: unmixed); the token
    targets are not, because the model un-mixes its aux logits. The original averages the class
    rows over B and the token rows over B * L, i.e. the batch mean of this loss.
    """
    if isinstance(targets, dict):
        t_cls, t_tokens = targets["crop"], targets["tokens"]
    else:
        t_cls, t_tokens = targets, targets[:, None, :]
    t_cls = lam * t_cls + (1.0 - lam) * t_cls[::-1]
    aux = _soft_cross_entropy(aux_logits, jnp.broadcast_to(t_tokens, aux_logits.shape))
    return _soft_cross_entropy(cls_logits, t_cls) + aux.mean(axis=-1)
