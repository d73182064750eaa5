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

from typing import Any, Callable

import numpy as np
from PIL import Image

from jvit.data import augment

Preprocessor = Callable[[dict[str, Any], "np.random.Generator | None"], dict[str, Any]]
TRAIN_PREPROCESSORS = ("augment", "resize")
EVAL_PREPROCESSORS = ("center_crop", "resize")


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
        img_size=img_size, inception_crop=a.inception_crop, crop_scale=tuple(a.crop_scale),
        crop_ratio=tuple(a.crop_ratio), interpolation=a.train_interpolation, hflip=a.hflip,
        rand_augment=a.rand_augment, color_jitter=a.color_jitter, mean=tuple(mean),
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
