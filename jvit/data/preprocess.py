"""Per-example preprocessing on the hosts, selected by ``config.input.train_preprocess`` / ``eval_preprocess``.

A preprocessor maps ``(example, rng)`` to arrays of fixed shapes: ``{"image": uint8 [S, S, 3],
"label": int32}``, plus ``"label_set"`` (ReaL eval) and, with token labels, ``"score_map"``
(float32 ``[2, k, S', S']``) and ``"crop_box"`` (float32 ``[4]``). ``example["image"]`` is an RGB
``PIL.Image`` (:class:`jvit.data.sources.DecodedSource`). ``rng`` is a ``np.random.Generator``
seeded by grain from the pipeline seed and the example's stream position (``None`` in eval), so
augmentations stay reproducible and resumable.

Train: ``'augment'`` is the timm/DeiT train transform driven by ``config.augment``
(:class:`jvit.data.augment.TrainTransform`); ``'resize'`` only resizes. Eval: ``'center_crop'``
is timm's eval transform (resize by ``crop_pct``, centre crop, the model's interpolation);
``'resize'`` resizes the whole image. Normalisation (mean/std), random erasing and Mixup/CutMix
happen on the device (:mod:`jvit.train.batch_augment`), so hosts ship uint8.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from jvit.data import augment

Preprocessor = Callable[[dict[str, Any], "np.random.Generator | None"], dict[str, Any]]
TRAIN_PREPROCESSORS = ("augment", "resize")
EVAL_PREPROCESSORS = ("center_crop", "resize")
TRAIN_INTERPOLATIONS = ("bilinear", "bicubic", "random")


def validate(input_config: Any, augment_config: Any) -> list[str]:
    """Errors of the config's ``input`` and ``augment`` sections (each message names the field)."""
    errors = []

    def check(ok: bool, message: str) -> None:
        if not ok:
            errors.append(message)

    def one_of(field: str, value: Any, allowed) -> None:
        check(value in allowed, f"{field}={value!r} is not one of: {', '.join(map(str, allowed))}")

    i, a = input_config, augment_config
    one_of("input.train_preprocess", i.train_preprocess, TRAIN_PREPROCESSORS)
    one_of("input.eval_preprocess", i.eval_preprocess, EVAL_PREPROCESSORS)
    check(i.crop_pct is None or 0 < i.crop_pct <= 1, f"input.crop_pct={i.crop_pct} must be in (0, 1]")
    if i.eval_interpolation:
        one_of("input.eval_interpolation", i.eval_interpolation, ("bilinear", "bicubic"))
    check(
        all(isinstance(s, str) and s for s in i.eval_splits),
        f"input.eval_splits={i.eval_splits!r} must be a tuple of split names",
    )
    for field in ("mean", "std"):
        check(len(i[field]) in (0, 3), f"input.{field}={i[field]!r} must be empty (model default) or 3 numbers")
    check(all(s > 0 for s in i.std), f"input.std={i.std!r} must be positive")
    for field in ("mock_train_examples", "mock_eval_examples", "mock_num_classes"):
        check(i[field] > 0, f"input.{field}={i[field]} must be positive")
    check(i.num_threads >= 0, f"input.num_threads={i.num_threads} must be >= 0")
    check(i.prefetch_batches >= 0, f"input.prefetch_batches={i.prefetch_batches} must be >= 0")
    check(i.device_prefetch >= 0, f"input.device_prefetch={i.device_prefetch} must be >= 0")

    one_of("augment.train_interpolation", a.train_interpolation, TRAIN_INTERPOLATIONS)
    check(
        len(a.crop_scale) == 2 and 0 < a.crop_scale[0] <= a.crop_scale[1] <= 1,
        f"augment.crop_scale={a.crop_scale!r} must be (low, high) with 0 < low <= high <= 1",
    )
    check(
        len(a.crop_ratio) == 2 and 0 < a.crop_ratio[0] <= a.crop_ratio[1],
        f"augment.crop_ratio={a.crop_ratio!r} must be (low, high) with 0 < low <= high",
    )
    for field in ("hflip", "random_erasing", "mixup_prob", "mixup_switch_prob"):
        check(0 <= a[field] <= 1, f"augment.{field}={a[field]} must be a probability in [0, 1]")
    for field in ("color_jitter", "mixup_alpha", "cutmix_alpha"):
        check(a[field] >= 0, f"augment.{field}={a[field]} must be >= 0")
    check(a.repeated_aug >= 0, f"augment.repeated_aug={a.repeated_aug} must be >= 0")
    if a.rand_augment:
        try:
            augment.RandAugment.from_spec(a.rand_augment, mean=(0.5, 0.5, 0.5), interpolation="bilinear")
        except ValueError as e:
            errors.append(f"augment.rand_augment={a.rand_augment!r}: {e}")
    check(
        not (a.rand_augment and a.color_jitter),
        "augment.color_jitter and augment.rand_augment are both set; timm applies colour jitter only without "
        "RandAugment (set color_jitter=0 to match the originals)",
    )
    for field in ("inception_crop", "hflip", "rand_augment", "color_jitter"):
        check(
            i.train_preprocess == "augment" or not a[field],
            f"augment.{field}={a[field]!r} needs input.train_preprocess='augment'",
        )
    return errors


def _resize(image: Image.Image, img_size: int) -> np.ndarray:
    """The whole image at ``img_size x img_size`` (bilinear, aspect ratio not kept)."""
    if image.size != (img_size, img_size):
        image = image.resize((img_size, img_size), Image.BILINEAR)
    return np.asarray(image, np.uint8)


def _labels(example: dict[str, Any]) -> dict[str, Any]:
    out = {"label": np.int32(example["label"])}
    if "label_set" in example:
        out["label_set"] = example["label_set"]
    return out


def train_preprocessor(config: Any, *, img_size: int, mean: tuple[float, ...]) -> Preprocessor:
    """The train preprocessor ``config.input.train_preprocess`` names, with ``config.augment``.

    With token labels (examples carrying ``score_map``) the transform runs in the original's
    token-labeling order (flip and RandAugment also move the map; the random-resized crop comes
    last and its box goes out as ``crop_box``).
    """
    name = config.input.train_preprocess
    if name == "resize":

        def resize(example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
            del rng  # no augmentation
            if "score_map" in example:
                raise ValueError("token labels need input.train_preprocess='augment' (it returns the crop box)")
            return {"image": _resize(example["image"], img_size), **_labels(example)}

        return resize
    a = config.augment
    transform = augment.TrainTransform(
        img_size=img_size,
        inception_crop=a.inception_crop,
        crop_scale=tuple(a.crop_scale),
        crop_ratio=tuple(a.crop_ratio),
        interpolation=a.train_interpolation,
        hflip=a.hflip,
        rand_augment=a.rand_augment,
        color_jitter=a.color_jitter,
        mean=tuple(mean),
        token_label_order=bool(config.input.token_label_dir),
    )

    def train(example: dict[str, Any], rng: np.random.Generator | None) -> dict[str, Any]:
        image, score_map, box = transform(example["image"], rng, example.get("score_map"))
        out = {"image": image, **_labels(example)}
        if score_map is not None:
            out["score_map"], out["crop_box"] = score_map.astype(np.float32), np.asarray(box, np.float32)
        return out

    return train


def eval_preprocessor(config: Any, *, img_size: int, crop_pct: float, interpolation: str) -> Preprocessor:
    """The eval preprocessor ``config.input.eval_preprocess`` names (deterministic, ``rng`` unused)."""
    name = config.input.eval_preprocess

    def evaluate(example: dict[str, Any], rng: np.random.Generator | None = None) -> dict[str, Any]:
        del rng
        if name == "resize":
            image = _resize(example["image"], img_size)
        else:
            image = augment.eval_transform(example["image"], img_size, crop_pct, interpolation)
        return {"image": image, **_labels(example)}

    return evaluate
