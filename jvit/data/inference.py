"""Preprocessing for using a model: a variant's own eval transform, and the ImageNet class names.

    transform = jvit.data.eval_transform("hvt_s_1")
    batch = np.stack([transform(path) for path in paths])      # float32 [B, 224, 224, 3], normalised
    logits = model.apply(variables, batch)

The transform is the one the original evaluated with (timm's eval transform: resize the shorter side
to ``img_size / crop_pct`` with the variant's interpolation, centre-crop, scale to [0, 1],
normalise by mean/std), taken from the variant's :class:`jvit.registry.PretrainedCfg`.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.resources
import os
from typing import Any

import jax.numpy as jnp
import numpy as np
from PIL import Image

from jvit import registry
from jvit.data import augment


@dataclasses.dataclass(frozen=True)
class EvalTransform:
    """An image (path, PIL image or uint8 array) -> the model's input, as the original evaluated it.

    Attributes:
      img_size: side of the square crop.
      crop_pct: the shorter side is resized to ``floor(img_size / crop_pct)`` before the crop.
      interpolation: resize filter (``'bicubic'``, ``'bilinear'`` or ``'nearest'``).
      mean, std: per-channel normalisation after scaling to [0, 1].
    """

    img_size: int
    crop_pct: float
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def crop(self, image: str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
        """Resize and centre-crop: uint8 ``[img_size, img_size, 3]`` (the input of an exported model)."""
        return augment.eval_transform(load_image(image), self.img_size, self.crop_pct, self.interpolation)

    def __call__(self, image: str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
        """Crop then normalise: float32 ``[img_size, img_size, 3]``."""
        return np.asarray(normalize(self.crop(image), self.mean, self.std))


def eval_transform(
    name_or_cfg: str | registry.PretrainedCfg, img_size: int | None = None, **overrides: Any
) -> EvalTransform:
    """The eval transform of a registered variant (at ``img_size``, default its first official
    resolution) or of a :class:`PretrainedCfg`; ``overrides`` replace ``crop_pct``,
    ``interpolation``, ``mean`` or ``std`` (e.g. those a training run used)."""
    cfg = (
        name_or_cfg
        if isinstance(name_or_cfg, registry.PretrainedCfg)
        else registry.get_pretrained_cfg(name_or_cfg, img_size)
    )
    fields = {
        "img_size": img_size or cfg.img_size,
        "crop_pct": cfg.crop_pct,
        "interpolation": cfg.interpolation,
        "mean": tuple(cfg.mean),
        "std": tuple(cfg.std),
    }
    unknown = set(overrides) - (set(fields) - {"img_size"})
    if unknown:
        raise TypeError(f"unknown eval-transform fields: {', '.join(sorted(unknown))}")
    fields.update({k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items() if v is not None})
    return EvalTransform(**fields)


def normalize(images: Any, mean: tuple[float, ...], std: tuple[float, ...]) -> jnp.ndarray:
    """uint8 images ``[..., 3]`` -> float32 ``(x / 255 - mean) / std`` (torchvision ToTensor + Normalize)."""
    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def load_image(image: str | os.PathLike | Image.Image | np.ndarray) -> Image.Image:
    """An RGB PIL image from a path, a PIL image (any mode) or a uint8 ``[H, W, 3]`` array."""
    if isinstance(image, np.ndarray):
        return Image.fromarray(image.astype(np.uint8)).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as f:
        return f.convert("RGB")


@functools.cache
def _imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    text = importlib.resources.files("jvit.data").joinpath("imagenet_classes.txt").read_text()
    rows = [line.split("\t") for line in text.splitlines() if line and not line.startswith("#")]
    return tuple(r[0] for r in rows), tuple(r[1] for r in rows)


def imagenet_class_names() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in label order (tfds ``imagenet2012`` and torchvision
    ``ImageFolder`` order: sorted WordNet ids), e.g. index 0 is ``'tench'``."""
    return _imagenet_classes()[1]


def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 WordNet ids of the ImageNet-1k classes in label order (``'n01440764'``, ...)."""
    return _imagenet_classes()[0]
