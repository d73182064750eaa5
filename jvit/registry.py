"""Model registry: every official variant by name, with the facts needed to use its released weights.

A family module registers each official variant with :func:`register_variant` (or any factory with
:func:`register_model`); users call :func:`create_model`.
The contract the rest of jvit (and its users) rely on::

    model = jvit.create_model("sot_tiny", num_classes=1000, img_size=224)   # a flax.linen.Module
    logits = model.apply(variables, images_nhwc, train=False)
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable

import flax.linen as nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclasses.dataclass(frozen=True)
class PretrainedCfg:
    """How a variant's released weights were evaluated by the original code.

    Attributes:
      img_size: input side the weights were trained/evaluated at.
      crop_pct: eval transform resizes the shorter side to ``img_size / crop_pct``, then centre-crops.
      interpolation: resize filter of the eval transform (``'bicubic'`` or ``'bilinear'``).
      mean, std: per-channel normalisation applied after scaling pixels to [0, 1].
      num_classes: classes of the released head.
      weights_keys: entries of the released checkpoint dict holding weights, the one the original
        evaluated first (e.g. ``('state_dict_ema', 'state_dict')``).
      files: names of the released checkpoint files, for reference.
      urls: direct download URLs of the released file, tried in order by :func:`jvit.pretrained.load`
        (empty when the release needs a browser; see ``manual_download``).
      sha256: hex SHA-256 of the released file when a source states it; ``None`` means unknown (the
        download is then not verified).
      top1: ImageNet-1k top-1 accuracy (%) the paper reports for these weights at ``img_size``.
      manual_download: where to get the file by hand (e.g. a Google-Drive folder) when it cannot be
        fetched by URL; shown in the error asking for ``weights=PATH``.
    """

    img_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    num_classes: int = 1000
    weights_keys: tuple[str, ...] = ("model",)
    files: tuple[str, ...] = ()
    urls: tuple[str, ...] = ()
    sha256: str | None = None
    top1: float | None = None
    manual_download: str = ""


@dataclasses.dataclass(frozen=True)
class ModelEntry:
    """A registered variant: its factory, its family (which selects the converter) and pretrained cfgs."""

    name: str
    family: str
    factory: Callable[..., nn.Module]
    pretrained_cfgs: tuple[PretrainedCfg, ...]

    @property
    def default_cfg(self) -> PretrainedCfg:
        return self.pretrained_cfgs[0]


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(
    name: str, family: str, pretrained_cfgs: PretrainedCfg | tuple[PretrainedCfg, ...]
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering ``factory(num_classes, img_size, **overrides) -> nn.Module`` as ``name``.

    ``pretrained_cfgs`` lists one :class:`PretrainedCfg` per official resolution, the default first.
    """
    cfgs = pretrained_cfgs if isinstance(pretrained_cfgs, tuple) else (pretrained_cfgs,)

    def wrap(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[name] = ModelEntry(name, family, factory, cfgs)
        return factory

    return wrap


def register_variant(
    name: str,
    family: str,
    pretrained_cfgs: PretrainedCfg | tuple[PretrainedCfg, ...],
    module: Callable[..., nn.Module],
    **config,
) -> None:
    """Register ``name`` as ``module(num_classes=..., img_size=..., **config)``: an official variant is
    its family's module with fixed hyper-parameters; ``create_model``'s keyword overrides replace them."""

    def factory(num_classes: int, img_size: int, **overrides) -> nn.Module:
        return module(num_classes=num_classes, img_size=img_size, **{**config, **overrides})

    factory.__name__ = name
    factory.__doc__ = f"{name}: {module.__name__}({', '.join(f'{k}={v!r}' for k, v in config.items())})"
    register_model(name, family, pretrained_cfgs)(factory)


def list_models(family: str | None = None) -> list[str]:
    """Names of all registered variants (of one family if ``family`` is given), sorted."""
    return sorted(n for n, e in _REGISTRY.items() if family is None or e.family == family)


def get_model_entry(name: str) -> ModelEntry:
    """The registry entry of ``name``; an unknown name raises ``KeyError`` listing close matches."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, _REGISTRY, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise KeyError(f"unknown model {name!r}.{hint} Known models: {', '.join(list_models())}") from None


def get_pretrained_cfg(name: str, img_size: int | None = None) -> PretrainedCfg:
    """The pretrained cfg of ``name`` at ``img_size`` (default: its first official resolution).

    A resolution without released weights gets the default cfg with ``img_size`` replaced.
    """
    entry = get_model_entry(name)
    if img_size is None:
        return entry.default_cfg
    for cfg in entry.pretrained_cfgs:
        if cfg.img_size == img_size:
            return cfg
    return dataclasses.replace(entry.default_cfg, img_size=img_size)


def create_model(name: str, num_classes: int | None = None, img_size: int | None = None, **kwargs) -> nn.Module:
    """Build the registered variant ``name`` as a ``flax.linen.Module``.

    Args:
      name: a name from :func:`list_models`.
      num_classes: classifier width (default: the released head's).
      img_size: square input side (default: the variant's first official resolution).
      **kwargs: overrides of the variant's module attributes, e.g. ``drop_path_rate=0.1`` or
        ``dtype=jnp.bfloat16``.
    """
    entry = get_model_entry(name)
    cfg = entry.default_cfg
    return entry.factory(
        num_classes=cfg.num_classes if num_classes is None else num_classes,
        img_size=cfg.img_size if img_size is None else img_size,
        **kwargs,
    )
