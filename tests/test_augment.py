"""Host-side augmentation against timm 0.4.12's own definitions (loaded from its source file) and on
known images: RandAugment's op set, magnitudes and pixels, the random-resized crop, flips and
score maps in the token-labeling order, colour jitter and the eval crop."""

from __future__ import annotations

import importlib.util
import math
import random
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jvit.data import augment

MEAN = (0.485, 0.456, 0.406)


@pytest.fixture(scope="module")
def timm_aa():
    """timm 0.4.12's ``data/auto_augment.py``, imported alone (timm's package needs torchvision)."""
    spec = importlib.util.find_spec("timm")
    path = Path(spec.submodule_search_locations[0]) / "data" / "auto_augment.py"
    module_spec = importlib.util.spec_from_file_location("timm_auto_augment", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    from sklearn.datasets import load_sample_image

    return Image.fromarray(load_sample_image("china.jpg")).resize((96, 64), Image.BICUBIC)


def test_op_sets_and_spec_parsing_match_timm(timm_aa):
    assert augment.RAND_INCREASING_OPS == tuple(timm_aa._RAND_INCREASING_TRANSFORMS)
    assert augment.RAND_OPS == tuple(timm_aa._RAND_TRANSFORMS)
    for spec in ("rand-m9-mstd0.5-inc1", "rand-n3-m9-mstd0.5-inc1", "rand-m7", "rand-m9-mstd0.5-inc0"):
        ours = augment.RandAugment.from_spec(spec, mean=MEAN, interpolation="bicubic")
        theirs = timm_aa.rand_augment_transform(spec, {"img_mean": (124, 116, 104)})
        assert ours.num_layers == theirs.num_layers
        # timm's ops carry their functions, not their names: compare those.
        assert [(op.aug_fn, op.level_fn) for op in theirs.ops] == [
            (timm_aa.NAME_TO_OP[n], timm_aa.LEVEL_TO_ARG[n]) for n in ours.ops
        ]
        assert {op.magnitude for op in theirs.ops} == {ours.magnitude}
        assert {op.magnitude_std for op in theirs.ops} == {ours.magnitude_std}
    assert augment.RandAugment.from_spec("rand-m9", mean=MEAN, interpolation="bicubic").fill == (124, 116, 104)
    for bad in ("rand-q3", "auto-m9", "rand-w0-m9"):
        with pytest.raises(ValueError, match="RandAugment spec"):
            augment.RandAugment.from_spec(bad, mean=MEAN, interpolation="bicubic")


class _Sign:
    """Drives a ``random``-style draw: returns ``value`` from ``random()``."""

    def __init__(self, value):
        self.value = value

    def random(self):
        return self.value


@pytest.mark.parametrize("level", [0, 3, 9, 10, 6.37])
def test_level_to_arguments_match_timm(timm_aa, level, monkeypatch):
    hparams = {"translate_pct": 0.45, "translate_const": 100, "img_mean": (124, 116, 104)}
    for draw in (0.2, 0.8):  # timm negates when random() > 0.5; so do we (rng.random() > 0.5)
        monkeypatch.setattr(timm_aa.random, "random", lambda: draw)
        for name in augment.RAND_OPS + augment.RAND_INCREASING_OPS:
            level_fn = timm_aa.LEVEL_TO_ARG[name]
            theirs = level_fn(level, hparams) if level_fn is not None else ()
            ours = augment.OPS[name].level_fn(level, _Sign(draw))
            assert ours == pytest.approx(theirs), (name, level, draw)


def test_every_op_gives_timms_pixels(timm_aa, photo):
    ra = augment.RandAugment.from_spec("rand-m9-mstd0.5-inc1", mean=MEAN, interpolation="bicubic")
    args_for = {
        "Rotate": (17.5,),
        "ShearX": (-0.21,),
        "ShearY": (0.13,),
        "TranslateXRel": (0.3,),
        "TranslateYRel": (-0.2,),
        "Posterize": (2,),
        "PosterizeIncreasing": (3,),
        "Solarize": (100,),
        "SolarizeIncreasing": (180,),
        "SolarizeAdd": (66,),
    }
    for name in set(augment.RAND_OPS + augment.RAND_INCREASING_OPS):
        args = args_for.get(name, () if name in ("AutoContrast", "Equalize", "Invert") else (1.37,))
        ours, _ = ra.apply_op(name, photo, args, np.random.default_rng(0))
        theirs = timm_aa.NAME_TO_OP[name](photo, *args, fillcolor=ra.fill, resample=Image.BICUBIC)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(theirs), err_msg=name)
        if name not in ("Posterize", "PosterizeIncreasing") or args[0] < 8:
            assert not np.array_equal(np.asarray(ours), np.asarray(photo)), name  # the op did something


def test_posterize_to_zero_bits_is_black(photo):
    """Magnitude 10 (reachable with mstd noise) keeps 0 bits: a black image, not a PIL error."""
    ra = augment.RandAugment.from_spec("rand-m9-mstd0.5-inc1", mean=MEAN, interpolation="bicubic")
    args = augment.OPS["PosterizeIncreasing"].level_fn(10.0, np.random.default_rng(0))
    assert args == (0,)
    out, _ = ra.apply_op("PosterizeIncreasing", photo, args, np.random.default_rng(0))
    assert out.size == photo.size and not np.asarray(out).any()


def test_rand_augment_statistics_and_determinism(photo):
    ra = augment.RandAugment.from_spec("rand-m9-mstd0.5-inc1", mean=MEAN, interpolation="random")
    outs = [np.asarray(ra(photo, np.random.default_rng(s))[0]) for s in range(40)]
    unchanged = sum(np.array_equal(o, np.asarray(photo)) for o in outs)
    assert 4 <= unchanged <= 20  # both ops skipped with p 0.25 (or drew a no-op magnitude)
    np.testing.assert_array_equal(np.asarray(ra(photo, np.random.default_rng(3))[0]), outs[3])


def test_random_resized_crop_box_follows_torchvision():
    rng = np.random.default_rng(0)
    for _ in range(300):
        top, left, h, w = augment.random_resized_crop_box(rng, 300, 400)
        assert 0 <= top and top + h <= 300 and 0 <= left and left + w <= 400
        # torchvision rounds w and h separately: allow that slack on the sampled scale and ratio.
        assert 0.08 * 0.9 <= h * w / 120000 <= 1.0
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1 or (h, w) == (300, 400)
    # Impossible ratios fall back to the centre crop with the ratio clamped (torchvision).
    assert augment.random_resized_crop_box(rng, 100, 1000, scale=(1.0, 1.0), ratio=(1.0, 1.0)) == (0, 450, 100, 100)
    assert augment.random_resized_crop_box(rng, 1000, 100, scale=(1.0, 1.0), ratio=(2.0, 2.0)) == (475, 0, 50, 100)


def test_train_transform_crop_flip_and_box(photo):
    t = augment.TrainTransform(img_size=32, interpolation="bilinear", hflip=0.0)
    image, score_map, box = t(photo, np.random.default_rng(5))
    top, left, h, w = augment.random_resized_crop_box(np.random.default_rng(5), 64, 96)
    np.testing.assert_array_equal(image, np.asarray(augment.resized_crop(photo, (top, left, h, w), 32, Image.BILINEAR)))
    np.testing.assert_allclose(box, [top / 64, left / 96, h / 64, w / 96], rtol=1e-6)
    assert score_map is None
    flip = augment.TrainTransform(img_size=96, inception_crop=False, hflip=1.0, interpolation="bilinear")
    out, _, box = flip(photo.resize((96, 96)), np.random.default_rng(0))
    np.testing.assert_array_equal(out, np.asarray(photo.resize((96, 96)))[:, ::-1])
    np.testing.assert_array_equal(box, [0, 0, 1, 1])


def position_map(size: int = 8, k: int = 2) -> np.ndarray:
    """A score map whose values encode (row, col) and whose ids encode the column."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    values = np.stack([100 * (rows + 1) + cols + 1] * k)
    ids = np.stack([cols] * k)
    return np.stack([values, ids])


def test_score_maps_move_with_the_image():
    """Geometric ops on the token-label map follow the image: compare where a bright square lands."""
    size = 8
    image = Image.new("RGB", (64, 64))
    image.paste((255, 255, 255), (32, 16, 40, 24))  # map cell (row 2, col 4)
    score_map = np.zeros((2, 1, size, size), np.float32)
    score_map[0, 0, 2, 4] = 1.0
    ra = augment.RandAugment.from_spec("rand-m9", mean=(0, 0, 0), interpolation="bilinear")
    for name, args in (
        ("TranslateXRel", (-0.25,)),
        ("TranslateYRel", (-0.5,)),
        ("Rotate", (90.0,)),
        ("ShearX", (-0.5,)),
        ("ShearY", (0.5,)),
    ):
        out, moved = ra.apply_op(name, image, args, np.random.default_rng(0), score_map)
        cells = np.asarray(out, np.float32).mean(-1).reshape(size, 8, size, 8).mean((1, 3))
        got = np.unravel_index(moved[0, 0].argmax(), (size, size))
        want = np.unravel_index(cells.argmax(), (size, size))
        if name == "Rotate":
            # The original rotates the map about index (S'/2, S'/2), half a cell off the image's centre
            # (spvit.md 6.1): output (4, 2) reads input M ((4, 2) - c) + c = (2, 4), one row below the image's.
            want = (want[0] + 1, want[1])
        assert got == want, name
    # Colour ops leave the map alone; translations fill values with 0 and ids with the nearest edge id.
    same = ra.apply_op("Invert", image, (), np.random.default_rng(0), position_map())[1]
    np.testing.assert_array_equal(same, position_map())
    shifted = ra.apply_op("TranslateXRel", image, (0.25,), np.random.default_rng(0), position_map())[1]
    np.testing.assert_array_equal(shifted[0, :, :, :6], position_map()[0, :, :, 2:])
    assert not shifted[0, :, :, 6:].any() and (shifted[1, :, :, 6:] == 7).all()


def test_token_label_order_flips_the_map_and_crops_last(photo):
    t = augment.TrainTransform(img_size=32, hflip=1.0, interpolation="bicubic", token_label_order=True)
    image, score_map, box = t(photo, np.random.default_rng(2), position_map())
    np.testing.assert_array_equal(score_map, position_map()[..., ::-1])
    flipped = photo.transpose(Image.FLIP_LEFT_RIGHT)
    rng = np.random.default_rng(2)
    rng.random()  # the flip draw
    top, left, h, w = augment.random_resized_crop_box(rng, 64, 96)
    np.testing.assert_array_equal(
        image, np.asarray(augment.resized_crop(flipped, (top, left, h, w), 32, Image.BICUBIC))
    )
    np.testing.assert_allclose(box, [top / 64, left / 96, h / 64, w / 96], rtol=1e-6)


def test_color_jitter_range_and_identity(photo):
    assert augment.color_jitter(photo, np.random.default_rng(0), 0.0) is photo
    a = np.asarray(augment.color_jitter(photo, np.random.default_rng(0), 0.4), np.float32)
    assert not np.array_equal(a, np.asarray(photo))
    # Brightness alone at the extremes of U(0.6, 1.4) bounds the mean.
    mean = np.asarray(photo, np.float32).mean()
    assert 0.6 * mean * 0.7 < a.mean() < 1.4 * mean * 1.3


def test_eval_transform_resizes_by_crop_pct_then_centre_crops():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8))
    out = augment.eval_transform(image, 224, 0.875, "bicubic")
    scale = math.floor(224 / 0.875)  # 256: shorter side
    resized = image.resize((int(scale * 300 / 200), scale), Image.BICUBIC)  # (384, 256)
    top, left = int(round((256 - 224) / 2.0)), int(round((384 - 224) / 2.0))
    np.testing.assert_array_equal(out, np.asarray(resized)[top : top + 224, left : left + 224])
    square = Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8))
    np.testing.assert_array_equal(augment.eval_transform(square, 224, 1.0, "bicubic"), np.asarray(square))
    with pytest.raises(ValueError, match="crop_pct"):
        augment.eval_transform(square, 224, 1.2, "bicubic")


def test_timm_random_draw_convention_is_what_we_reproduce(timm_aa):
    """timm negates a level when ``random() > 0.5``; check it on timm itself so a change shows up."""
    random.seed(0)
    draws = [random.random() for _ in range(50)]
    random.seed(0)
    args = [timm_aa._rotate_level_to_arg(10, {})[0] for _ in range(50)]
    assert [a < 0 for a in args] == [d > 0.5 for d in draws]
