"""Per-example preprocessing, selected by name (``config.input.train_preprocess`` / ``eval_preprocess``).

A preprocessor maps ``(example, img_size, rng)`` to ``{"image": uint8 [img_size, img_size, 3],
"label": int32}``. ``rng`` is a ``np.random.Generator`` seeded by grain from the pipeline seed and
the example's position (``None`` for eval), so random augmentations stay reproducible and
resumable. Normalisation (mean/std) happens on the device, so hosts ship uint8.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
from PIL import Image

Preprocessor = Callable[[dict[str, Any], int, "np.random.Generator | None"], dict[str, Any]]


def rgb(image: np.ndarray) -> np.ndarray:
    """``[H, W, 3]`` uint8 from a grayscale (``[H, W]`` / ``[H, W, 1]``) or RGB image."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"expected an [H, W, 1|3] image, got shape {image.shape}")
    return np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image


def resize(example: dict[str, Any], img_size: int, rng: np.random.Generator | None = None) -> dict[str, Any]:
    """Resize the whole image to ``img_size x img_size`` (bilinear, aspect ratio not kept); no
    augmentation. Enough for the embedded digits and mock data; the originals' ImageNet transforms
    (crop-pct resize + centre crop, RandomResizedCrop, RandAugment, ...) are separate entries."""
    del rng
    image = rgb(np.asarray(example["image"]))
    if image.shape[:2] != (img_size, img_size):
        image = np.asarray(Image.fromarray(image).resize((img_size, img_size), Image.BILINEAR))
    return {"image": image.astype(np.uint8), "label": np.int32(example["label"])}


PREPROCESSORS: dict[str, Preprocessor] = {"resize": resize}
