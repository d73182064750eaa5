"""Device-side augmentations against timm 0.4.12's ``RandomErasing`` and ``Mixup`` run on the same
draws, plus distribution checks of the draws themselves.

timm's package ``__init__`` needs torchvision, so its two modules (which only need numpy, torch,
math and random) are loaded standalone from their files.
"""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path
from types import ModuleType, SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jvit.train import batch_augment
from jvit.train.losses import soft_targets


def load_timm_data_module(name: str) -> ModuleType:
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.fail("timm 0.4.12 is a test dependency: pip install --no-deps timm==0.4.12 (README)")
    path = Path(spec.submodule_search_locations[0]) / "data" / f"{name}.py"
    module_spec = importlib.util.spec_from_file_location(f"timm_{name}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def timm_mixup() -> ModuleType:
    return load_timm_data_module("mixup")


@pytest.fixture(scope="module")
def timm_erasing() -> ModuleType:
    return load_timm_data_module("random_erasing")


def replay(*values):
    """A stand-in for an RNG function that returns ``values`` in order, recording its arguments."""
    queue = list(values)

    def draw(*args, **kwargs):
        draw.calls.append(args)
        return queue.pop(0)

    draw.calls = []
    return draw


# ----------------------------------------------------------------------------- Mixup / CutMix

MIX_CONFIGS = [
    dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=0.7, switch_prob=0.5),
    dict(mixup_alpha=0.4, cutmix_alpha=0.0, prob=1.0, switch_prob=0.5),
    dict(mixup_alpha=0.0, cutmix_alpha=0.5, prob=1.0, switch_prob=0.5, correct_lam=False),
]


@pytest.mark.parametrize("config", MIX_CONFIGS)
def test_mixup_cutmix_matches_timm_on_the_same_draws(config, timm_mixup, monkeypatch):
    b, h, w, c, k, smoothing, seeds = 4, 12, 10, 3, 5, 0.1, 16
    rng = np.random.default_rng(0)
    images = rng.normal(size=(b, h, w, c)).astype(np.float32)
    labels = rng.integers(0, k, size=b)
    targets = soft_targets(jnp.asarray(labels), k, smoothing)
    draw_kwargs = {n: v for n, v in config.items() if n != "correct_lam"}

    @jax.jit
    @jax.vmap
    def mix(key):
        """Our result and the draws behind it, for many keys in one compile."""
        return batch_augment.sample_mix_params(key, h, w, **draw_kwargs), batch_augment.mixup_cutmix(
            key, jnp.asarray(images), targets, **config
        )

    keys = jax.random.split(jax.random.key(0), seeds)
    params, (ours_x, ours_t, ours_lam) = jax.tree.map(np.asarray, mix(keys))
    jax.tree.map(np.testing.assert_array_equal, mix(keys)[1], (ours_x, ours_t, ours_lam))  # same keys, same result
    seen = set()
    for s in range(seeds):
        p = jax.tree.map(lambda v: v[s], params)
        # timm draws: rand() < prob (apply), rand() < switch_prob (cutmix), beta, randint(H), randint(W).
        monkeypatch.setattr(np.random, "rand", replay(0.0 if p.apply else 0.9999, 0.0 if p.use_cutmix else 0.9999))
        monkeypatch.setattr(np.random, "beta", replay(float(p.lam)))
        randint = replay(int(p.centre[0]), int(p.centre[1]))
        monkeypatch.setattr(np.random, "randint", randint)
        mixer = timm_mixup.Mixup(**config, mode="batch", label_smoothing=smoothing, num_classes=k)
        x_t = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
        lam_t = mixer._mix_batch(x_t)
        t_t = timm_mixup.mixup_target(torch.from_numpy(labels), k, lam_t, smoothing, device="cpu")
        if randint.calls:
            assert randint.calls == [(0, h), (0, w)]  # centre ranges (exclusive high)

        kind = "none" if not p.apply else "cutmix" if p.use_cutmix else "mixup"
        seen.add(kind)
        timm_x = x_t.numpy().transpose(0, 2, 3, 1)
        if kind == "mixup":
            np.testing.assert_allclose(ours_x[s], timm_x, rtol=1e-6, atol=1e-6)
        else:  # copies (or nothing) only: bit-identical
            np.testing.assert_array_equal(ours_x[s], timm_x)
        np.testing.assert_allclose(ours_lam[s], lam_t, rtol=1e-6)
        np.testing.assert_allclose(ours_t[s], t_t.numpy(), rtol=1e-6, atol=1e-7)
    both = config["mixup_alpha"] and config["cutmix_alpha"]
    assert seen == ({"none", "mixup", "cutmix"} if both else {"mixup"} if config["mixup_alpha"] else {"cutmix"})


def test_cutmix_box_clips_like_timm_rand_bbox(timm_mixup, monkeypatch):
    """Boxes near the borders and of every size, against ``rand_bbox`` on forced draws."""
    h, w = 12, 10
    for lam in (0.0, 0.13, 0.5, 0.9, 1.0):
        for cy, cx in ((0, 0), (11, 9), (5, 2), (1, 8)):
            monkeypatch.setattr(np.random, "randint", replay(cy, cx))
            expected = timm_mixup.rand_bbox((2, 3, h, w), lam)
            box = batch_augment.cutmix_box(h, w, jnp.float32(lam), jnp.array([cy, cx]))
            np.testing.assert_array_equal(box, expected)


# ----------------------------------------------------------------------------- random erasing

ERASE_SHAPE = (4000, 12, 20, 3)


@jax.jit
def erase_with_boxes(key: jax.Array, images: jax.Array, prob: jax.Array):
    """random_erasing and, by its documented key derivation, the rectangles it used (one compile
    shared by the tests below)."""
    boxes = jax.vmap(lambda k: batch_augment.sample_erase_box(jax.random.split(k)[0], *images.shape[1:3], prob))(
        jax.random.split(key, images.shape[0])
    )
    return batch_augment.random_erasing(key, images, prob), boxes


def test_random_erasing_replaces_the_rectangle_timm_would(timm_erasing, monkeypatch):
    n, h, w, c = ERASE_SHAPE
    prob, checked = 0.6, 12
    images = np.random.default_rng(1).normal(size=ERASE_SHAPE).astype(np.float32)
    key = jax.random.key(3)
    ours, boxes = jax.tree.map(np.asarray, erase_with_boxes(key, jnp.asarray(images), prob))
    eraser = timm_erasing.RandomErasing(probability=prob, mode="pixel", device="cpu")
    erased = 0
    for i in range(checked):
        box = jax.tree.map(lambda v: v[i], boxes)
        bh, bw, top, left = int(box.height), int(box.width), int(box.top), int(box.left)
        # Uniforms giving exactly this height and width on timm's first attempt.
        randint = replay(top, left)
        monkeypatch.setattr(
            timm_erasing,
            "random",
            SimpleNamespace(
                random=lambda: 0.0 if box.erase else 1.0,
                uniform=replay(bh * bw / (h * w), math.log(bh / bw)),
                randint=randint,
            ),
        )
        img = torch.from_numpy(images[i].transpose(2, 0, 1).copy())
        eraser._erase(img, c, h, w, img.dtype)
        timm_changed = img.numpy().transpose(1, 2, 0) != images[i]
        ours_changed = ours[i] != images[i]
        np.testing.assert_array_equal(ours_changed, timm_changed)
        if box.erase:
            assert randint.calls == [(0, h - bh), (0, w - bw)]  # inclusive ranges
            assert ours_changed.sum() == bh * bw * c
            erased += 1
    assert 0 < erased < checked  # both outcomes were exercised


def test_random_erasing_statistics_match_timm(timm_erasing, monkeypatch):
    """Erase frequency, rectangle placement and size distribution against timm's own sampling;
    same key, same result."""
    n, h, w, c = ERASE_SHAPE
    prob = 0.25
    images = jnp.full(ERASE_SHAPE, 1e3, jnp.float32)  # N(0, 1) noise never equals 1e3
    ours = np.asarray(erase_with_boxes(jax.random.key(0), images, prob)[0])
    np.testing.assert_array_equal(erase_with_boxes(jax.random.key(0), images, prob)[0], ours)
    assert not np.array_equal(erase_with_boxes(jax.random.key(1), images, prob)[0], ours)
    changed = ours != 1e3
    assert (changed == changed[..., :1]).all()  # all channels of a pixel together
    changed = changed[..., 0]
    erased = changed.any(axis=(1, 2))
    assert abs(erased.mean() - prob) < 0.03

    # Every changed region is one full rectangle inside the image.
    rows, cols = changed.any(axis=2), changed.any(axis=1)
    heights, widths = rows.sum(1)[erased], cols.sum(1)[erased]
    np.testing.assert_array_equal(changed.sum((1, 2))[erased], heights * widths)
    assert (heights < h).all() and (widths < w).all()

    # Sizes within the area and aspect bounds up to rounding to whole pixels.
    hi_h, lo_h, hi_w, lo_w = heights + 0.5, heights - 0.5, widths + 0.5, widths - 0.5
    assert (lo_h * lo_w <= h * w / 3).all() and (hi_h * hi_w >= 0.02 * h * w).all()
    assert (lo_h / hi_w <= 1 / 0.3).all() and (hi_h / lo_w >= 0.3).all()

    # timm's sampling of the same images, driven by its own (seeded) Python RNG.
    monkeypatch.setattr(timm_erasing, "random", random.Random(0))
    eraser = timm_erasing.RandomErasing(probability=prob, mode="pixel", device="cpu")
    timm_h, timm_w = [], []
    for _ in range(n):
        img = torch.full((1, h, w), 1e3)
        eraser._erase(img, 1, h, w, img.dtype)
        mask = img[0].numpy() != 1e3
        if mask.any():
            timm_h.append(mask.any(1).sum())
            timm_w.append(mask.any(0).sum())
    timm_h, timm_w = np.array(timm_h), np.array(timm_w)
    assert abs(erased.sum() - len(timm_h)) / n < 0.04
    assert abs((heights * widths).mean() - (timm_h * timm_w).mean()) / (h * w) < 0.02
    assert abs(np.log(heights / widths).mean() - np.log(timm_h / timm_w).mean()) < 0.1
    # Top-left corners spread over all valid positions, bottom/right edges included.
    assert rows[erased][:, 0].any() and rows[erased][:, -1].any()
    assert cols[erased][:, 0].any() and cols[erased][:, -1].any()


# ----------------------------------------------------------------------------- MixToken


@pytest.mark.parametrize("grid", [(6, 10)])  # non-square, so swapped axes show
def test_mix_token_box(grid, timm_mixup):
    """Inside the grid, lam = the untouched fraction, and the same distribution as the original's
    ``rand_bbox`` (timm's CutMix box with rows named W: bbx = rows, bby = columns) with Beta(1, 1)."""
    n, (gh, gw) = 4000, grid
    draw = jax.jit(jax.vmap(lambda k: batch_augment.mix_token_box(k, gh, gw)))
    keys = jax.random.split(jax.random.key(0), n)
    boxes = np.asarray(draw(keys))
    np.testing.assert_array_equal(draw(keys), boxes)
    lams = np.asarray(batch_augment.mix_token_lam(jnp.asarray(boxes.T), gh * gw))  # rows of box.T: its fields
    assert boxes.dtype == np.int32
    assert (boxes >= 0).all() and (boxes[:, [0, 2]] <= gh).all() and (boxes[:, [1, 3]] <= gw).all()
    assert (boxes[:, 0] <= boxes[:, 2]).all() and (boxes[:, 1] <= boxes[:, 3]).all()
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    np.testing.assert_allclose(lams, 1 - area / (gh * gw), rtol=1e-6)

    np.random.seed(0)
    reference = []
    for _ in range(n):
        yl, yh, xl, xh = timm_mixup.rand_bbox((1, 1, gh, gw), np.random.beta(1.0, 1.0))
        reference.append((yl, xl, yh, xh))
    reference = np.array(reference)
    ref_lams = 1 - (reference[:, 2] - reference[:, 0]) * (reference[:, 3] - reference[:, 1]) / (gh * gw)
    assert abs(lams.mean() - ref_lams.mean()) < 0.03
    for col in range(4):
        assert abs(boxes[:, col].mean() - reference[:, col].mean()) < 0.25
    # The box area (whole tokens) has the same distribution (total variation distance).
    ref_area = (reference[:, 2] - reference[:, 0]) * (reference[:, 3] - reference[:, 1])
    freq = [np.bincount(a, minlength=gh * gw + 1) / n for a in (area, ref_area)]
    assert 0.5 * np.abs(freq[0] - freq[1]).sum() < 0.06
    assert (lams == 1).any()  # empty boxes occur, as in the original


def test_mixup_per_shard_mixes_each_device_batch_on_its_own():
    """Per-shard Mixup/CutMix is the original's per-GPU Mixup: shard ``s`` is mixed exactly as
    :func:`mixup_cutmix` mixes that slice alone with the shard's own key (own lam, own box, partner
    reversed inside the shard), so no example is paired across shards."""
    shards, per, k = 4, 3, 5
    images = jax.random.normal(jax.random.key(0), (shards * per, 16, 16, 3))
    targets = soft_targets(jnp.arange(shards * per) % k, k, 0.1)
    kwargs = dict(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5)
    key = jax.random.key(3)
    mixed, mixed_targets, lam = batch_augment.mixup_cutmix_per_shard(key, images, targets, shards=shards, **kwargs)
    assert lam.shape == (shards,)
    for s, shard_key in enumerate(jax.random.split(key, shards)):
        rows = slice(s * per, (s + 1) * per)
        ref_images, ref_targets, ref_lam = batch_augment.mixup_cutmix(shard_key, images[rows], targets[rows], **kwargs)
        np.testing.assert_allclose(mixed[rows], ref_images, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(mixed_targets[rows], ref_targets, rtol=1e-6, atol=1e-6)
        assert float(lam[s]) == pytest.approx(float(ref_lam))
    assert len({round(float(x), 6) for x in lam}) == shards  # independent draws per shard
