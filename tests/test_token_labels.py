"""Token-labeling targets and loss against the original SP-ViT/LV-ViT code (``token_label.npz``,
made by running the original ``mixup_target`` and ``TokenLabelCrossEntropy``) and against the
torchvision ``roi_align`` sampling rule."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from parity import case_dir

from jvit.train import batch_augment, token_labels

# Jitted once per static configuration: op-by-op dispatch of these functions is far slower.
dense_targets = jax.jit(
    token_labels.dense_targets, static_argnames=("num_classes", "label_size", "smoothing", "transposed_crop")
)
roi_align_weights = jax.jit(token_labels._roi_align_weights, static_argnums=(2, 3))
token_label_loss = jax.jit(token_labels.token_label_loss)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(case_dir("spvit", "s_like_spsa") / "token_label.npz") as f:
        return {k: f[k] for k in f.files}


def fixture_targets(golden, **kwargs) -> dict[str, jax.Array]:
    """dense_targets of the fixture's batch, split the way the original's batch packs it."""
    maps = golden["score_maps"]
    labels = maps[:, 2, 0, 0, 5].astype(np.int32)
    np.testing.assert_array_equal(labels, golden["labels"])
    return dense_targets(
        jnp.asarray(maps[:, 0:2]),
        jnp.asarray(maps[:, 2, 0, 0, 0:4]),
        jnp.asarray(labels),
        num_classes=golden["target"].shape[1],
        label_size=int(golden["label_size"]),
        smoothing=float(golden["smoothing"]),
        **kwargs,
    )


def test_dense_targets_match_the_original(golden):
    out = fixture_targets(golden)
    target = golden["target"]  # (B, K, 2 + S*S)
    np.testing.assert_allclose(out["image"], target[:, :, 0], atol=1e-6, rtol=0)
    np.testing.assert_allclose(out["image"], golden["target_image_level"], atol=1e-6, rtol=0)
    np.testing.assert_allclose(out["crop"], target[:, :, 1], atol=1e-6, rtol=0)
    np.testing.assert_allclose(out["tokens"], target[:, :, 2:].transpose(0, 2, 1), atol=2e-6, rtol=0)


def test_token_label_loss_matches_the_original(golden):
    box = golden["train_bbox"]
    num_tokens = golden["train_aux_logits"].shape[1]
    lam = batch_augment.mix_token_lam(jnp.asarray(box), num_tokens)
    assert float(lam) < 1  # the fixture's box really mixes the class target
    cls, aux = jnp.asarray(golden["train_cls_logits"]), jnp.asarray(golden["train_aux_logits"])
    loss = token_label_loss(cls, aux, fixture_targets(golden), lam)
    assert loss.shape == (2,)
    np.testing.assert_allclose(float(loss.mean()), golden["loss"], rtol=1e-5)
    image_level = token_label_loss(cls, aux, jnp.asarray(golden["target_image_level"]), lam)
    np.testing.assert_allclose(float(image_level.mean()), golden["loss_image_level"], rtol=1e-5)


def test_transposed_crop_flag(golden):
    transposed = fixture_targets(golden)
    straight = fixture_targets(golden, transposed_crop=False)
    top, left, h, w = golden["score_maps"][0, 2, 0, 0, 0:4]
    assert (top, h) != (left, w)  # example 0's crop is not symmetric under transposition
    assert np.abs(np.asarray(transposed["tokens"][0] - straight["tokens"][0])).max() > 1e-2

    maps = jnp.asarray(golden["score_maps"][:, 0:2])
    symmetric = jnp.array([[0.2, 0.2, 0.5, 0.5], [0.1, 0.1, 0.8, 0.8]], jnp.float32)
    kw = dict(num_classes=10, label_size=8, smoothing=0.1)
    a = dense_targets(maps, symmetric, jnp.array([0, 1]), **kw)
    b = dense_targets(maps, symmetric, jnp.array([0, 1]), transposed_crop=False, **kw)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])


def coordinate_map(size: int, axis: int) -> jax.Array:
    """A (1, 2, 5, size, size) score map whose only nonzero logit at (y, x) is class y (axis 0) or x."""
    coord = np.indices((size, size))[axis]
    values = np.zeros((5, size, size), np.float32)
    values[0] = 20.0
    ids = (coord[None] + np.arange(5)[:, None, None]) % size  # distinct ids per location, like a top-5
    return jnp.asarray(np.stack([values, ids.astype(np.float32)])[None])


@pytest.mark.parametrize("transposed", [True, False])
def test_which_map_axis_the_crop_selects(transposed):
    """Spec §6.1: a crop of image rows 0-0.5 / cols 0.5-1 yields, in the original (transposed),
    labels from map rows 0.5-1; token rows still follow map rows."""
    size = 8
    box = jnp.array([[0.0, 0.5, 0.5, 0.5]], jnp.float32)  # (top, left, h, w)
    kw = dict(num_classes=size, label_size=size, smoothing=0.0, transposed_crop=transposed)
    by_row = dense_targets(coordinate_map(size, 0), box, jnp.array([0]), **kw)
    by_col = dense_targets(coordinate_map(size, 1), box, jnp.array([0]), **kw)
    row_class = np.asarray(by_row["tokens"][0].argmax(-1)).reshape(size, size)
    col_class = np.asarray(by_col["tokens"][0].argmax(-1)).reshape(size, size)
    lower, upper = range(0, size // 2), range(size // 2, size)
    rows_expected, cols_expected = (upper, lower) if transposed else (lower, upper)
    assert set(row_class.ravel()) <= set(rows_expected)
    assert set(col_class.ravel()) <= set(cols_expected)
    # Token row i samples map rows in increasing order, token column j map columns.
    assert (np.diff(row_class, axis=0) >= 0).all() and (np.diff(row_class, axis=1) == 0).all()
    assert (np.diff(col_class, axis=1) >= 0).all() and (np.diff(col_class, axis=0) == 0).all()
    # The crop-level label puts its mass on the selected half too.
    crop_rows = np.asarray(by_row["crop"][0])
    assert crop_rows[list(rows_expected)].sum() > 0.9


def naive_roi_align(image: np.ndarray, box: tuple[float, float, float, float], out: int) -> np.ndarray:
    """torchvision's ``roi_align`` CPU kernel (aligned=False, scale 1, sampling_ratio -1) for one
    channel, one bilinear sample at a time; ``box`` = (x1, y1, x2, y2)."""
    height, width = image.shape
    x1, y1, x2, y2 = box
    roi_w, roi_h = max(x2 - x1, 1.0), max(y2 - y1, 1.0)
    bin_w, bin_h = roi_w / out, roi_h / out
    grid_w, grid_h = math.ceil(roi_w / out), math.ceil(roi_h / out)

    def bilinear(y, x):
        if y < -1.0 or y > height or x < -1.0 or x > width:
            return 0.0
        y, x = max(y, 0.0), max(x, 0.0)
        yl, xl = int(y), int(x)
        if yl >= height - 1:
            yh = yl = height - 1
            y = float(yl)
        else:
            yh = yl + 1
        if xl >= width - 1:
            xh = xl = width - 1
            x = float(xl)
        else:
            xh = xl + 1
        ly, lx = y - yl, x - xl
        return (
            (1 - ly) * (1 - lx) * image[yl, xl]
            + (1 - ly) * lx * image[yl, xh]
            + ly * (1 - lx) * image[yh, xl]
            + ly * lx * image[yh, xh]
        )

    result = np.zeros((out, out))
    for ph in range(out):
        for pw in range(out):
            total = 0.0
            for iy in range(grid_h):
                y = y1 + ph * bin_h + (iy + 0.5) * bin_h / grid_h
                for ix in range(grid_w):
                    total += bilinear(y, x1 + pw * bin_w + (ix + 0.5) * bin_w / grid_w)
            result[ph, pw] = total / (grid_h * grid_w)
    return result


@pytest.mark.parametrize(
    "crop",
    [
        (0.0, 0.0, 1.0, 1.0),  # whole map: samples reach the last pixel (edge clamp)
        (0.1, 0.55, 0.3, 0.4),
        (0.9, 0.02, 0.05, 0.9),  # shorter than one map pixel: roi_len clamps to 1
        (0.0, 0.3, 0.999, 0.2),
        (0.6, -0.15, 0.6, 0.5),  # partly outside the map (RandomResizedCrop never does this): zero samples
    ],
)
@pytest.mark.parametrize("out", [1, 4, 8])
def test_separable_weights_equal_roi_align(crop, out):
    """The per-axis weight matrices reproduce roi_align's adaptive, averaged bilinear samples,
    including the adaptive sample count (up to in_size samples for the 1x1 crop-level output)."""
    size = 9
    image = np.random.default_rng(0).normal(size=(size, size)).astype(np.float32)
    top, left, h, w = crop
    x1, y1, x2, y2 = (v * size - 0.5 for v in (top, left, top + h, left + w))  # the original's box row
    wy = roi_align_weights(jnp.float32(y1), jnp.float32(y2), out, size)
    wx = roi_align_weights(jnp.float32(x1), jnp.float32(x2), out, size)
    ours = np.asarray(wy @ image @ wx.T)
    np.testing.assert_allclose(ours, naive_roi_align(image.astype(np.float64), (x1, y1, x2, y2), out), atol=1e-5)
