"""Host-side image augmentation: the per-image train and eval transforms of the originals' timm 0.4.12.

Everything runs on one ``PIL.Image`` at a time in the grain reader threads and draws its randomness
from a ``np.random.Generator`` (one per example, derived from the seed and the stream position), so
the augmentation of every example is reproducible and survives a resume.

* :func:`random_resized_crop_box` / :func:`resized_crop`: Inception-style cropping (Szegedy et al.,
  2015) with torchvision's ``RandomResizedCrop.get_params`` algorithm.
* :class:`RandAugment`: Cubuk et al., 2020, in timm's variant (``rand-m9-mstd0.5-inc1``: magnitude 9
  with N(9, 0.5) noise per op, the "increasing" op set, 2 ops per image, each applied with p 0.5).
  The op set, the level-to-argument maps and the PIL calls are timm's (the tests compare them with
  timm's own functions).
* :func:`color_jitter`: torchvision ``ColorJitter(b, c, s)``, used by timm only without RandAugment.
* :func:`eval_transform`: timm's eval transform (resize the shorter side to ``size / crop_pct``,
  centre crop).
* :class:`TrainTransform`: the composition ``create_transform(is_training=True)`` builds, or the
  token-labeling order of LV-ViT/SP-ViT, where flips and geometric RandAugment ops also move the
  teacher's score map and the crop comes last (its box then selects the map region).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance, ImageOps
from scipy import ndimage

INTERPOLATIONS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
# timm's 'random' interpolation: one of these per image (crop) or per geometric op (RandAugment).
RANDOM_INTERPOLATIONS = (Image.BILINEAR, Image.BICUBIC)
MAX_LEVEL = 10.0
TRANSLATE_PCT = 0.45  # timm's default ``translate_pct`` for the relative translations


def pil_interpolation(name: str, rng: np.random.Generator) -> int:
    """The PIL filter for ``name``; ``'random'`` draws bilinear or bicubic (timm)."""
    if name == "random":
        return RANDOM_INTERPOLATIONS[int(rng.integers(2))]
    if name not in INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}; expected one of {', '.join(INTERPOLATIONS)} or 'random'")
    return INTERPOLATIONS[name]


# -------------------------------------------------------------------------------------------------
# Random-resized crop
# -------------------------------------------------------------------------------------------------


def random_resized_crop_box(
    rng: np.random.Generator,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """``(top, left, h, w)`` of a crop covering ``U(scale)`` of the area with aspect ratio
    log-uniform in ``ratio`` (torchvision ``RandomResizedCrop.get_params``): up to 10 tries, then a
    centre crop with the ratio clamped to ``ratio``."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(image: Image.Image, box: tuple[int, int, int, int], size: int, resample: int) -> Image.Image:
    """The ``(top, left, h, w)`` region of ``image`` resized to ``size x size`` (torchvision ``resized_crop``)."""
    top, left, h, w = box
    return image.crop((left, top, left + w, top + h)).resize((size, size), resample)


# -------------------------------------------------------------------------------------------------
# RandAugment
# -------------------------------------------------------------------------------------------------


def _negate_half(rng: np.random.Generator, value: float) -> float:
    return -value if rng.random() > 0.5 else value  # timm's _randomly_negate


def _solarize_add(image: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return image.point(lut * len(image.getbands()))


def _posterize(image: Image.Image, bits: int) -> Image.Image:
    if bits >= 8:
        return image
    if bits <= 0:
        # PosterizeIncreasing at magnitude 10 keeps 0 bits. The PIL of the originals' time masked every
        # bit away (a black image); current PIL rejects bits < 1, so that case is written out here.
        return Image.new(image.mode, image.size)
    return ImageOps.posterize(image, bits)


def _affine(matrix: Callable[[Image.Image, float], tuple]) -> Callable:
    def op(image: Image.Image, value: float, *, fill: tuple[int, ...], resample: int) -> Image.Image:
        return image.transform(image.size, Image.AFFINE, matrix(image, value), resample=resample, fillcolor=fill)

    return op


def _rotate(image: Image.Image, degrees: float, *, fill: tuple[int, ...], resample: int) -> Image.Image:
    return image.rotate(degrees, resample=resample, fillcolor=fill)


def _enhance(kind) -> Callable:
    return lambda image, factor: kind(image).enhance(factor)


@dataclasses.dataclass(frozen=True)
class Op:
    """One RandAugment operation.

    ``image_fn(image, *args[, fill=, resample=])``; ``level_fn(level, rng) -> args`` maps a magnitude
    in [0, 10] to the arguments (timm's ``LEVEL_TO_ARG``, random sign included); ``map_affine(args,
    size) -> (matrix, offset)`` is the op on (row, col) index coordinates of a token-label score map
    (geometric ops only).
    """

    image_fn: Callable
    level_fn: Callable[[float, np.random.Generator], tuple]
    map_affine: Callable[[tuple, int], tuple[np.ndarray, np.ndarray]] | None = None

    @property
    def geometric(self) -> bool:
        return self.map_affine is not None


def _rotation_map(args: tuple, size: int) -> tuple[np.ndarray, np.ndarray]:
    # The original rotates the map about (S'/2, S'/2) with M = [[cos, sin], [-sin, cos]] on (row, col).
    a = math.radians(args[0])
    m = np.array([[round(math.cos(a), 15), round(math.sin(a), 15)], [round(-math.sin(a), 15), round(math.cos(a), 15)]])
    centre = np.array([size / 2.0, size / 2.0])
    return m, centre - m @ centre


def _increasing(level: float) -> float:
    return level / MAX_LEVEL


OPS: dict[str, Op] = {
    "AutoContrast": Op(lambda im: ImageOps.autocontrast(im), lambda lv, rng: ()),
    "Equalize": Op(lambda im: ImageOps.equalize(im), lambda lv, rng: ()),
    "Invert": Op(lambda im: ImageOps.invert(im), lambda lv, rng: ()),
    "Rotate": Op(_rotate, lambda lv, rng: (_negate_half(rng, _increasing(lv) * 30.0),), _rotation_map),
    "Posterize": Op(_posterize, lambda lv, rng: (int(_increasing(lv) * 4),)),
    "PosterizeIncreasing": Op(_posterize, lambda lv, rng: (4 - int(_increasing(lv) * 4),)),
    "Solarize": Op(ImageOps.solarize, lambda lv, rng: (int(_increasing(lv) * 256),)),
    "SolarizeIncreasing": Op(ImageOps.solarize, lambda lv, rng: (256 - int(_increasing(lv) * 256),)),
    "SolarizeAdd": Op(_solarize_add, lambda lv, rng: (int(_increasing(lv) * 110),)),
    **{
        name + suffix: Op(_enhance(kind), level_fn)
        for name, kind in (
            ("Color", ImageEnhance.Color),
            ("Contrast", ImageEnhance.Contrast),
            ("Brightness", ImageEnhance.Brightness),
            ("Sharpness", ImageEnhance.Sharpness),
        )
        for suffix, level_fn in (
            ("", lambda lv, rng: (_increasing(lv) * 1.8 + 0.1,)),
            ("Increasing", lambda lv, rng: (1.0 + _negate_half(rng, _increasing(lv) * 0.9),)),
        )
    },
    # PIL's affine maps an output pixel (x, y) to the input (a x + b y + c, d x + e y + f).
    "ShearX": Op(
        _affine(lambda im, f: (1, f, 0, 0, 1, 0)),
        lambda lv, rng: (_negate_half(rng, _increasing(lv) * 0.3),),
        lambda args, size: (np.array([[1.0, 0.0], [args[0], 1.0]]), np.zeros(2)),
    ),
    "ShearY": Op(
        _affine(lambda im, f: (1, 0, 0, f, 1, 0)),
        lambda lv, rng: (_negate_half(rng, _increasing(lv) * 0.3),),
        lambda args, size: (np.array([[1.0, args[0]], [0.0, 1.0]]), np.zeros(2)),
    ),
    "TranslateXRel": Op(
        _affine(lambda im, pct: (1, 0, pct * im.size[0], 0, 1, 0)),
        lambda lv, rng: (_negate_half(rng, _increasing(lv) * TRANSLATE_PCT),),
        lambda args, size: (np.eye(2), np.array([0.0, args[0] * size])),
    ),
    "TranslateYRel": Op(
        _affine(lambda im, pct: (1, 0, 0, 0, 1, pct * im.size[1])),
        lambda lv, rng: (_negate_half(rng, _increasing(lv) * TRANSLATE_PCT),),
        lambda args, size: (np.eye(2), np.array([args[0] * size, 0.0])),
    ),
}

# timm's `_RAND_TRANSFORMS` / `_RAND_INCREASING_TRANSFORMS` (the 'inc' sets), in timm's order.
RAND_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "Posterize",
    "Solarize",
    "SolarizeAdd",
    "Color",
    "Contrast",
    "Brightness",
    "Sharpness",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_OPS = (
    "AutoContrast",
    "Equalize",
    "Invert",
    "Rotate",
    "PosterizeIncreasing",
    "SolarizeIncreasing",
    "SolarizeAdd",
    "ColorIncreasing",
    "ContrastIncreasing",
    "BrightnessIncreasing",
    "SharpnessIncreasing",
    "ShearX",
    "ShearY",
    "TranslateXRel",
    "TranslateYRel",
)


def transform_score_map(score_map: np.ndarray, matrix: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """A token-label score map ``[2, k, S', S']`` under the affine ``input = matrix @ output + offset``
    on (row, col), resampled nearest-neighbour (``scipy.ndimage.affine_transform``, order 0) as the
    original does: values outside the map become 0, class ids take the nearest edge id."""
    out = np.empty_like(score_map)
    for j in range(score_map.shape[1]):
        out[0, j] = ndimage.affine_transform(score_map[0, j], matrix, offset, order=0, mode="constant")
        out[1, j] = ndimage.affine_transform(score_map[1, j], matrix, offset, order=0, mode="nearest")
    return out


@dataclasses.dataclass(frozen=True)
class RandAugment:
    """timm's ``RandAugment``: ``num_layers`` ops drawn uniformly with replacement, each applied with
    probability 0.5 at magnitude ``N(magnitude, magnitude_std)`` clipped to [0, 10].

    Geometric ops fill with ``fill`` (timm: the model's mean in 0..255) and resample with
    ``interpolation`` (``'random'``: bilinear or bicubic per op, as timm does when the train
    interpolation is random).
    """

    ops: tuple[str, ...]
    num_layers: int
    magnitude: float
    magnitude_std: float
    fill: tuple[int, ...]
    interpolation: str

    @classmethod
    def from_spec(cls, spec: str, *, mean: tuple[float, ...], interpolation: str) -> RandAugment:
        """Parse a timm RandAugment string, e.g. ``'rand-m9-mstd0.5-inc1'`` or ``'rand-n3-m9-mstd0.5-inc1'``
        (``m`` magnitude, default 10; ``n`` ops per image, default 2; ``mstd`` magnitude noise; ``inc``
        the increasing op set — any ``inc`` value selects it, as in timm, where ``bool('0')`` is true)."""
        sections = spec.split("-")
        if sections[0] != "rand":
            raise ValueError(f"RandAugment spec {spec!r} must start with 'rand-'")
        magnitude, num_layers, std, ops = MAX_LEVEL, 2, 0.0, RAND_OPS
        for section in sections[1:]:
            match = re.fullmatch(r"([a-z]+)(\d.*)", section)
            if not match:
                raise ValueError(f"RandAugment spec {spec!r}: cannot read section {section!r}")
            key, value = match.groups()
            try:
                if key == "m":
                    magnitude = int(value)
                elif key == "n":
                    num_layers = int(value)
                elif key == "mstd":
                    std = float(value)
                elif key == "inc":
                    ops = RAND_INCREASING_OPS
                elif key == "w":
                    raise ValueError(f"RandAugment spec {spec!r}: weighted op choice ('w') is not supported")
                else:
                    raise ValueError(f"RandAugment spec {spec!r}: unknown section {section!r}")
            except ValueError as e:
                raise ValueError(str(e) if "RandAugment" in str(e) else f"RandAugment spec {spec!r}: {e}") from None
        fill = tuple(min(255, round(255 * m)) for m in mean)
        return cls(ops, num_layers, float(magnitude), std, fill, interpolation)

    def apply_op(
        self, name: str, image: Image.Image, args: tuple, rng: np.random.Generator, score_map: np.ndarray | None = None
    ) -> tuple[Image.Image, np.ndarray | None]:
        """``name`` with fixed arguments on the image (and, for geometric ops, the score map)."""
        op = OPS[name]
        if not op.geometric:
            return op.image_fn(image, *args), score_map
        resample = pil_interpolation(self.interpolation, rng)
        image = op.image_fn(image, *args, fill=self.fill, resample=resample)
        if score_map is not None:
            score_map = transform_score_map(score_map, *op.map_affine(args, score_map.shape[-1]))
        return image, score_map

    def __call__(
        self, image: Image.Image, rng: np.random.Generator, score_map: np.ndarray | None = None
    ) -> tuple[Image.Image, np.ndarray | None]:
        for index in rng.integers(0, len(self.ops), self.num_layers):
            if rng.random() > 0.5:  # each op applies with probability 0.5
                continue
            level = rng.normal(self.magnitude, self.magnitude_std) if self.magnitude_std > 0 else self.magnitude
            level = min(MAX_LEVEL, max(0.0, level))
            name = self.ops[index]
            image, score_map = self.apply_op(name, image, OPS[name].level_fn(level, rng), rng, score_map)
        return image, score_map


# -------------------------------------------------------------------------------------------------
# Colour jitter, eval transform
# -------------------------------------------------------------------------------------------------


def color_jitter(image: Image.Image, rng: np.random.Generator, strength: float) -> Image.Image:
    """torchvision ``ColorJitter(brightness=s, contrast=s, saturation=s)``: factors ``U(max(0, 1 - s),
    1 + s)`` applied in a random order."""
    if strength <= 0:
        return image
    kinds = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for i in rng.permutation(len(kinds)):
        image = kinds[i](image).enhance(rng.uniform(max(0.0, 1 - strength), 1 + strength))
    return image


def eval_transform(image: Image.Image, size: int, crop_pct: float, interpolation: str) -> np.ndarray:
    """timm's eval transform: resize the shorter side to ``floor(size / crop_pct)`` (torchvision
    ``Resize(int)``: the longer side scaled and truncated), centre-crop ``size x size`` (offsets
    rounded, torchvision ``CenterCrop``). Returns uint8 ``[size, size, 3]``.

    An image smaller than the crop after resizing cannot happen (the short side is at least
    ``size``); ``crop_pct`` above 1 is rejected.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct={crop_pct} must be in (0, 1]")
    scale = int(math.floor(size / crop_pct))
    w, h = image.size
    if min(w, h) != scale:
        new_w, new_h = (scale, int(scale * h / w)) if w <= h else (int(scale * w / h), scale)
        image = image.resize((new_w, new_h), INTERPOLATIONS[interpolation])
    w, h = image.size
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    return np.asarray(image.crop((left, top, left + size, top + size)), np.uint8)


# -------------------------------------------------------------------------------------------------
# The composed train transform
# -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainTransform:
    """The train transform of timm's ``create_transform`` for the fields of ``config.augment``.

    Standard order (DeiT): random-resized crop (or a plain resize) -> horizontal flip ->
    RandAugment (or colour jitter). Token-labeling order (``token_label_order``; LV-ViT's
    ``create_token_label_transform``): flip and RandAugment move the score map with the image, then
    the random-resized crop comes last. The call returns the crop box ``(top, left, h, w)``
    normalised by the image size at crop time (``(0, 0, 1, 1)`` without a crop), which selects the
    map region the token labels are pooled from.
    """

    img_size: int
    inception_crop: bool = True
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    interpolation: str = "bicubic"
    hflip: float = 0.5
    rand_augment: str = ""
    color_jitter: float = 0.0
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    token_label_order: bool = False

    def __post_init__(self):
        ra = (
            RandAugment.from_spec(self.rand_augment, mean=self.mean, interpolation=self.interpolation)
            if self.rand_augment
            else None
        )
        object.__setattr__(self, "_rand_augment", ra)

    def _crop(self, image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
        w, h = image.size
        resample = pil_interpolation(self.interpolation, rng)
        if not self.inception_crop:
            return image.resize((self.img_size, self.img_size), resample), np.array([0, 0, 1, 1], np.float32)
        box = random_resized_crop_box(rng, h, w, self.crop_scale, self.crop_ratio)
        top, left, ch, cw = box
        return resized_crop(image, box, self.img_size, resample), np.array(
            [top / h, left / w, ch / h, cw / w], np.float32
        )

    def _flip(self, image: Image.Image, rng: np.random.Generator, score_map: np.ndarray | None):
        if self.hflip and rng.random() < self.hflip:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            if score_map is not None:
                score_map = score_map[..., ::-1].copy()
        return image, score_map

    def _colour(self, image: Image.Image, rng: np.random.Generator, score_map: np.ndarray | None):
        if self._rand_augment is not None:
            return self._rand_augment(image, rng, score_map)
        return color_jitter(image, rng, self.color_jitter), score_map

    def __call__(
        self, image: Image.Image, rng: np.random.Generator, score_map: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
        """``(uint8 [img_size, img_size, 3], transformed score map or None, crop box float32 [4])``."""
        if self.token_label_order:
            image, score_map = self._flip(image, rng, score_map)
            image, score_map = self._colour(image, rng, score_map)
            image, box = self._crop(image, rng)
        else:
            image, box = self._crop(image, rng)
            image, score_map = self._flip(image, rng, score_map)
            image, score_map = self._colour(image, rng, score_map)
        return np.asarray(image, np.uint8), score_map, box
