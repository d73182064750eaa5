"""Classify images with a model: top-k class names and probabilities.

    jvit predict --model hvt_s_1 photo.jpg                      # released weights (downloaded, cached)
    jvit predict --model sovit_7 --weights So-ViT-7.pth.tar photos/ '*.png'
    jvit predict --weights runs/hvt --ema --json photos/         # a jvit.main run (or runs/hvt/checkpoints/N)
    python -m jvit.predict ...                                    # the same

Each image goes through the variant's own eval transform (:func:`jvit.data.eval_transform`); images
are classified in fixed-size batches by one compiled function. ``--json`` prints one object per line:
``{"image": PATH, "topk": [{"index": I, "label": NAME, "prob": P}, ...]}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np

from jvit import checkpoint, pretrained
from jvit.data.inference import EvalTransform, eval_transform, imagenet_class_names

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".JPEG")


@dataclasses.dataclass
class Predictor:
    """A model with its weights, eval transform and class names.

    Attributes:
      name: registered variant name.
      model: the linen module.
      variables: its variables.
      transform: the eval transform its inputs go through.
      class_names: one name per logit.
    """

    name: str
    model: nn.Module
    variables: dict[str, Any]
    transform: EvalTransform
    class_names: tuple[str, ...]

    def __post_init__(self):
        self._probs = jax.jit(lambda v, x: jax.nn.softmax(self.model.apply(v, x, train=False), axis=-1))

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax of the logits of preprocessed images ``[B, H, W, 3]``: ``[B, num_classes]``."""
        return np.asarray(self._probs(self.variables, images))

    def topk(self, paths: Sequence[str], k: int = 5, batch_size: int = 32) -> Iterator[tuple[str, list[dict]]]:
        """``(path, [{"index", "label", "prob"}, ...])`` per image, most probable first.

        Every batch has the same shape (the last is padded), so the model compiles once.
        """
        k = min(k, len(self.class_names))
        batch_size = max(1, min(batch_size, len(paths)))
        for start in range(0, len(paths), batch_size):
            chunk = list(paths[start : start + batch_size])
            batch = np.stack([self.transform(p) for p in chunk])
            pad = batch_size - len(chunk)
            if pad:
                batch = np.concatenate([batch, np.zeros((pad, *batch.shape[1:]), batch.dtype)])
            probs = self.probabilities(batch)[: len(chunk)]
            for path, p in zip(chunk, probs):
                order = np.argsort(-p, kind="stable")[:k]
                yield path, [{"index": int(i), "label": self.class_names[i], "prob": float(p[i])} for i in order]


def load_predictor(
    model: str | None = None,
    weights: str | os.PathLike | None = None,
    *,
    ema: bool = False,
    img_size: int | None = None,
    cache_dir: str | None = None,
) -> Predictor:
    """A :class:`Predictor` from a registry name and/or weights.

    Args:
      model: registered variant; needed unless ``weights`` is a jvit directory (which names it).
      weights: ``None`` (the registry's release, downloaded and cached), a released ``.pth`` file, a
        URL to one, a converted directory, a ``jvit.main`` run directory or one of its steps.
      ema: a run's EMA weights instead of the raw ones.
      img_size: official resolution of the release (default: the variant's first).
      cache_dir: download cache root (see :func:`jvit.pretrained.resolve_cache_dir`).
    """
    path = None if weights is None else os.path.expanduser(os.fspath(weights))
    if path is not None and os.path.isdir(path):
        variables, meta = checkpoint.load_variables(path, ema=ema)
        if model is not None and model != meta["model"]:
            raise ValueError(f"{path} holds {meta['model']!r} weights, not {model!r}; drop --model or fix it")
        name, module = meta["model"], checkpoint.create_model(meta)
        transform = eval_transform(
            name, img_size=module.img_size, **{k: meta.get(k) for k in ("crop_pct", "interpolation", "mean", "std")}
        )
        classes = meta.get("classes")
    else:
        if model is None:
            raise ValueError("name the model (--model NAME) unless --weights is a jvit directory")
        if ema:
            raise ValueError(
                "--ema applies to a jvit.main run directory; a released file's EMA choice is the registry's weights_key"
            )
        name = model
        module, variables = pretrained.load(model, cache_dir=cache_dir, img_size=img_size, weights=path)
        transform = eval_transform(model, img_size=img_size)
        classes = None
    num_classes = module.num_classes
    if classes is None:
        classes = imagenet_class_names() if num_classes == 1000 else tuple(f"class {i}" for i in range(num_classes))
    return Predictor(name, module, variables, transform, tuple(classes))


def expand_images(items: Sequence[str]) -> list[str]:
    """Files named by ``items``: files as given, folders searched recursively for images, glob
    patterns (``*``, ``?``, ``[``) expanded, each sorted. Raises if one names nothing."""
    paths = []
    for item in items:
        if os.path.isdir(item):
            found = sorted(
                os.path.join(root, f)
                for root, _, files in os.walk(item)
                for f in files
                if f.endswith(IMAGE_EXTENSIONS) or f.lower().endswith(IMAGE_EXTENSIONS)
            )
        elif any(c in item for c in "*?["):
            found = sorted(p for p in glob.glob(item, recursive=True) if os.path.isfile(p))
        else:
            found = [item] if os.path.isfile(item) else []
        if not found:
            raise FileNotFoundError(f"{item}: no such image, folder with images, or matching file")
        paths += found
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    """``jvit predict``: parse arguments, classify, print (text or JSON lines). Returns the exit code."""
    parser = argparse.ArgumentParser(prog="jvit predict", description=__doc__.split("\n")[0])
    parser.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    parser.add_argument("--model", help="registered variant (not needed for a jvit directory)")
    parser.add_argument(
        "--weights",
        help="a .pth, a URL, a converted dir, a jvit.main run dir or its checkpoints/N "
        "(default: the registry's release, downloaded into $JVIT_CACHE)",
    )
    parser.add_argument("--ema", action="store_true", help="a run's EMA weights instead of the raw ones")
    parser.add_argument("--img-size", type=int, help="official resolution of the release (default: the first)")
    parser.add_argument("--topk", type=int, default=5, help="classes per image (default 5)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--json", action="store_true", help="one JSON object per line per image")
    parser.add_argument("--cache-dir", help="download cache (default $JVIT_CACHE or ~/.cache/jvit)")
    args = parser.parse_args(argv)
    if args.topk < 1 or args.batch_size < 1:
        parser.error("--topk and --batch-size must be positive")
    try:
        paths = expand_images(args.images)
        predictor = load_predictor(
            args.model, args.weights, ema=args.ema, img_size=args.img_size, cache_dir=args.cache_dir
        )
        for path, top in predictor.topk(paths, args.topk, args.batch_size):
            if args.json:
                print(json.dumps({"image": path, "topk": top}), flush=True)
            else:
                print(path)
                for rank, t in enumerate(top, 1):
                    print(f"  {rank}. {t['label']} ({t['index']}): {t['prob']:.4f}")
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
