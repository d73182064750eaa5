"""Device-side batch augmentations: random erasing, Mixup/CutMix and the MixToken box.

Everything here is pure JAX with static shapes, so it runs inside the jitted train step on the
normalised batch (``[B, H, W, C]`` float32, ``(x / 255 - mean) / std``). Each function takes an
explicit ``jax.random`` key. Where the originals draw from Python's or NumPy's global RNG (timm
0.4.12 ``RandomErasing`` and ``Mixup``, LV-ViT's MixToken ``rand_bbox``), the same distributions
are drawn from the key; the ``sample_*`` helpers expose the draws so that tests can feed them to
the original code.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp


class EraseBox(NamedTuple):
    """One example's random-erasing decision: whether to erase, and the rectangle (int32 scalars)."""

    erase: jax.Array
    top: jax.Array
    left: jax.Array
    height: jax.Array
    width: jax.Array


def sample_erase_box(
    key: jax.Array,
    img_h: int,
    img_w: int,
    prob: float,
    *,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    max_attempts: int = 10,
) -> EraseBox:
    """The rectangle timm 0.4.12 ``RandomErasing._erase`` (``max_count=1``) picks for one image.

    Erase with probability ``prob``; then up to ``max_attempts`` attempts, each drawing an area
    ``U(min_area, max_area) * H * W`` and an aspect ``exp(U(log min_aspect, -log min_aspect))``,
    giving ``h = round(sqrt(area * aspect))``, ``w = round(sqrt(area / aspect))`` (``jnp.round`` is
    half-to-even like Python's ``round``). The first attempt with ``h < H`` and ``w < W`` wins, with
    ``top ~ randint(0, H - h)`` and ``left ~ randint(0, W - w)``, both ends inclusive like
    ``random.randint``. No valid attempt: no erasing.

    All attempts are drawn at once (static shapes); the ones after the first valid one are unused,
    exactly as the original never draws them.
    """
    k_apply, k_area, k_aspect, k_top, k_left = jax.random.split(key, 5)
    area = jax.random.uniform(k_area, (max_attempts,), minval=min_area, maxval=max_area) * (img_h * img_w)
    log_aspect = jax.random.uniform(
        k_aspect, (max_attempts,), minval=math.log(min_aspect), maxval=math.log(1 / min_aspect)
    )
    aspect = jnp.exp(log_aspect)
    h = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
    w = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
    valid = (h < img_h) & (w < img_w)
    # An exclusive maxval of H - h + 1 makes the range inclusive; invalid attempts get a
    # meaningless position, but they are never picked.
    top = jax.random.randint(k_top, (max_attempts,), 0, img_h - h + 1)
    left = jax.random.randint(k_left, (max_attempts,), 0, img_w - w + 1)
    first = jnp.argmax(valid)  # index of the first True (0 when none, then masked by `erase`)
    erase = (jax.random.uniform(k_apply) < prob) & valid.any()
    return EraseBox(erase, top[first], left[first], h[first], w[first])


def random_erasing(
    key: jax.Array,
    images: jax.Array,
    prob: float,
    *,
    min_area: float = 0.02,
    max_area: float = 1 / 3,
    min_aspect: float = 0.3,
    max_attempts: int = 10,
) -> jax.Array:
    """timm 0.4.12 ``RandomErasing(probability=prob, mode='pixel', max_count=1)`` on a normalised
    batch ``[B, H, W, C]``, each example independently (Zhong et al., 2017, "Random Erasing Data
    Augmentation").

    Example ``i`` takes ``k_box, k_noise = split(split(key, B)[i])``; its rectangle is
    :func:`sample_erase_box` of ``k_box`` and its pixels are replaced by per-pixel, per-channel
    N(0, 1) noise from ``k_noise`` (mode 'pixel': noise in the normalised space, as timm applies it
    after normalisation in the prefetcher).
    """
    b, img_h, img_w, c = images.shape

    def erase_one(k: jax.Array, image: jax.Array) -> jax.Array:
        k_box, k_noise = jax.random.split(k)
        box = sample_erase_box(
            k_box,
            img_h,
            img_w,
            prob,
            min_area=min_area,
            max_area=max_area,
            min_aspect=min_aspect,
            max_attempts=max_attempts,
        )
        rows = jnp.arange(img_h)
        cols = jnp.arange(img_w)
        in_rows = (rows >= box.top) & (rows < box.top + box.height)
        in_cols = (cols >= box.left) & (cols < box.left + box.width)
        mask = box.erase & in_rows[:, None] & in_cols[None, :]
        noise = jax.random.normal(k_noise, (img_h, img_w, c), image.dtype)
        return jnp.where(mask[:, :, None], noise, image)

    return jax.vmap(erase_one)(jax.random.split(key, b), images)


class MixParams(NamedTuple):
    """The per-batch draws of timm's ``Mixup(mode='batch')``.

    ``lam`` is the raw Beta draw (1 when mixing is not applied), before CutMix's area correction;
    ``centre`` is CutMix's box centre ``(cy, cx)`` (int32[2], drawn even when unused).
    """

    apply: jax.Array
    use_cutmix: jax.Array
    lam: jax.Array
    centre: jax.Array


def sample_mix_params(
    key: jax.Array,
    img_h: int,
    img_w: int,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float,
    switch_prob: float,
) -> MixParams:
    """timm 0.4.12 ``Mixup._params_per_batch`` plus ``rand_bbox``'s centre draw.

    Mix with probability ``prob``. With both alphas > 0, CutMix with probability ``switch_prob``
    and ``lam ~ Beta(cutmix_alpha, cutmix_alpha)``, else Mixup with ``lam ~ Beta(mixup_alpha,
    mixup_alpha)``; with one alpha > 0 only that method. Centre ``cy ~ randint(0, H)``,
    ``cx ~ randint(0, W)`` (exclusive high, like ``np.random.randint``).
    """
    if mixup_alpha <= 0 and cutmix_alpha <= 0:
        raise ValueError("sample_mix_params needs mixup_alpha > 0 or cutmix_alpha > 0")
    k_apply, k_switch, k_mixup, k_cutmix, k_centre = jax.random.split(key, 5)
    apply = jax.random.uniform(k_apply) < prob
    if mixup_alpha > 0 and cutmix_alpha > 0:
        use_cutmix = jax.random.uniform(k_switch) < switch_prob
    else:
        use_cutmix = jnp.asarray(cutmix_alpha > 0)
    # Only the chosen method's alpha is drawn from in the original; drawing both and selecting
    # keeps the shapes static and gives the same distribution.
    lam_mixup = jax.random.beta(k_mixup, mixup_alpha, mixup_alpha) if mixup_alpha > 0 else 1.0
    lam_cutmix = jax.random.beta(k_cutmix, cutmix_alpha, cutmix_alpha) if cutmix_alpha > 0 else 1.0
    lam = jnp.where(apply, jnp.where(use_cutmix, lam_cutmix, lam_mixup), 1.0).astype(jnp.float32)
    centre = jax.random.randint(k_centre, (2,), 0, jnp.array([img_h, img_w]))
    return MixParams(apply, apply & use_cutmix, lam, centre)


def cutmix_box(img_h: int, img_w: int, lam: jax.Array, centre: jax.Array) -> jax.Array:
    """timm's CutMix ``rand_bbox(img_shape, lam)`` given its centre draw: int32 ``(yl, yh, xl, xh)``.

    ``cut = int(size * sqrt(1 - lam))`` per axis and the box is ``centre -/+ cut // 2`` clipped to
    the image, so it may be smaller than ``cut`` (hence CutMix's lam correction) or empty.
    """
    ratio = jnp.sqrt(1.0 - lam)
    cut_h = jnp.floor(img_h * ratio).astype(jnp.int32)
    cut_w = jnp.floor(img_w * ratio).astype(jnp.int32)
    cy, cx = centre[0], centre[1]
    return jnp.stack(
        [
            jnp.clip(cy - cut_h // 2, 0, img_h),
            jnp.clip(cy + cut_h // 2, 0, img_h),
            jnp.clip(cx - cut_w // 2, 0, img_w),
            jnp.clip(cx + cut_w // 2, 0, img_w),
        ]
    ).astype(jnp.int32)


def mixup_cutmix(
    key: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    prob: float,
    switch_prob: float,
    correct_lam: bool = True,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """timm 0.4.12 ``Mixup(mode='batch')`` (Zhang et al., 2018, mixup; Yun et al., 2019, CutMix)
    on images ``[B, H, W, C]`` and soft targets ``[B, K]``; returns ``(images, targets, lam)``.

    Every example is mixed with its partner in the batch reversed along the axis given here (the
    global batch under jit, as the original mixes its per-GPU batch). Mixup:
    ``lam * x + (1 - lam) * x[::-1]``; CutMix: the box of :func:`cutmix_box` is taken from
    ``x[::-1]`` and, with ``correct_lam``, ``lam = 1 - box area / (H * W)``. Targets are mixed with
    the same lam (timm ``mixup_target``; the caller passes smoothed one-hots, so the result equals
    ``mixup_target(labels, K, lam, smoothing)``). Without mixing ``lam = 1`` and both pass through.
    """
    _, img_h, img_w, _ = images.shape
    p = sample_mix_params(
        key, img_h, img_w, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha, prob=prob, switch_prob=switch_prob
    )
    yl, yh, xl, xh = cutmix_box(img_h, img_w, p.lam, p.centre)
    rows = jnp.arange(img_h)
    cols = jnp.arange(img_w)
    in_box = ((rows >= yl) & (rows < yh))[:, None] & ((cols >= xl) & (cols < xh))[None, :]
    flipped = images[::-1]
    cut = jnp.where(in_box[None, :, :, None], flipped, images)
    # With lam = 1 (no mixing) the blend is exactly `images`, so it doubles as the identity.
    blend = p.lam * images + (1.0 - p.lam) * flipped
    lam_cutmix = 1.0 - ((yh - yl) * (xh - xl)).astype(jnp.float32) / (img_h * img_w) if correct_lam else p.lam
    lam = jnp.where(p.use_cutmix, lam_cutmix, p.lam)
    mixed_images = jnp.where(p.use_cutmix, cut, blend)
    mixed_targets = lam * targets + (1.0 - lam) * targets[::-1]
    return mixed_images, mixed_targets, lam


def mixup_cutmix_per_shard(
    key: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    *,
    shards: int,
    **kwargs,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """:func:`mixup_cutmix` run independently on each of ``shards`` equal, contiguous slices of the
    batch; returns ``(images, targets, lam [shards])``.

    With ``shards`` = the devices the batch is split over, each slice is one device's rows, so every
    example is paired inside its own device's batch with a lam and a box drawn for that device: what
    the originals do with one ``Mixup`` per GPU under DDP, and no image crosses devices (the global
    reversal of :func:`mixup_cutmix` compiles to a collective-permute of the whole image batch).
    """
    b = images.shape[0]
    if b % shards:
        raise ValueError(f"batch {b} is not divisible into {shards} shards")

    def one(k, x, t):
        return mixup_cutmix(k, x, t, **kwargs)

    split = lambda a: a.reshape(shards, b // shards, *a.shape[1:])  # noqa: E731
    mixed, mixed_targets, lam = jax.vmap(one)(jax.random.split(key, shards), split(images), split(targets))
    return mixed.reshape(images.shape), mixed_targets.reshape(targets.shape), lam


def mix_token_box(key: jax.Array, grid_h: int, grid_w: int, alpha: float = 1.0) -> jax.Array:
    """LV-ViT/SP-ViT MixToken box on the token grid (Jiang et al., 2021): int32
    ``(bbx1, bby1, bbx2, bby2)`` = (row lo, col lo, row hi, col hi).

    The original draws ``lam ~ Beta(alpha, alpha)`` and calls its ``rand_bbox`` on the
    ``(B, C, rows, cols)`` stem output, naming rows "W" and columns "H"; the box is CutMix's
    (:func:`cutmix_box`) on the grid, reordered to the original's return order, which
    :func:`jvit.models.spvit.mix_tokens` reads as rows ``box[0]:box[2]``, cols ``box[1]:box[3]``.
    """
    k_lam, k_centre = jax.random.split(key)
    lam = jax.random.beta(k_lam, alpha, alpha)
    centre = jax.random.randint(k_centre, (2,), 0, jnp.array([grid_h, grid_w]))
    row_lo, row_hi, col_lo, col_hi = cutmix_box(grid_h, grid_w, lam, centre)
    return jnp.stack([row_lo, col_lo, row_hi, col_hi])


def mix_token_lam(box: jax.Array, num_tokens: int) -> jax.Array:
    """The MixToken lam of a box (the original's ``TokenLabelCrossEntropy``): the fraction of
    tokens NOT replaced, ``1 - (bbx2 - bbx1) * (bby2 - bby1) / num_tokens`` (float32)."""
    area = (box[2] - box[0]) * (box[3] - box[1])
    return 1.0 - area.astype(jnp.float32) / num_tokens
