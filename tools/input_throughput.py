"""Input-pipeline throughput: decode + train augmentation, in images per second per CPU core.

    python tools/input_throughput.py --folder PATH/train          # your JPEGs (<class>/<image> layout)
    python tools/input_throughput.py                               # makes a folder from sklearn's photos

Runs the trainer's host-side train transform, as ``jvit.train.loop.setup`` resolves it for ``--model``
(``input.train_preprocess='augment'`` with the DeiT recipe of ``jvit/recipes.py``: RandomResizedCrop,
flip, RandAugment rand-m9-mstd0.5-inc1, at the model's input size), on every
image, reading and decoding with PIL, first in one thread (the per-core figure), then through the
grain train iterator with one reader thread per core. Prints medians over ``--repeats`` passes.
Device-side augmentation (random erasing, Mixup/CutMix) is not part of this figure.

Without ``--folder`` it writes ``--num-images`` JPEGs (quality 90, ImageNet-like sizes around
500x375) cut from scikit-learn's two bundled photographs into a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np


def make_folder(root: str, num_images: int, seed: int = 0) -> str:
    """``num_images`` real-photo JPEGs in ``root/<class>/`` (2 classes), random crops and rescales of
    scikit-learn's sample photographs at typical ImageNet sizes."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(p) for p in load_sample_images().images]  # 427x640 each
    rng = np.random.default_rng(seed)
    for i in range(num_images):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = int(rng.integers(w // 2, w)), int(rng.integers(h // 2, h))
        left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
        scale = float(rng.uniform(0.8, 1.25)) * 500 / max(cw, ch)
        image = photo.crop((left, top, left + cw, top + ch)).resize(
            (round(cw * scale), round(ch * scale)), Image.BICUBIC
        )
        directory = os.path.join(root, f"class_{i % 2}")
        os.makedirs(directory, exist_ok=True)
        image.save(os.path.join(directory, f"img_{i:05d}.jpg"), quality=90)
    return root


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="a folder of images, <folder>/<class>/<image>")
    parser.add_argument("--num-images", type=int, default=256, help="images to make when --folder is not given")
    parser.add_argument("--model", default="hvt_ti_1", help="whose input size and mean/std the transform uses")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="grain reader threads (default: cores)")
    args = parser.parse_args()

    import jax

    from jvit import recipes
    from jvit.data import pipeline
    from jvit.train import loop

    folder = os.path.abspath(args.folder or make_folder(tempfile.mkdtemp(prefix="jvit_jpegs_"), args.num_images))
    # The trainer's own resolution of the recipe: the folder is the train split of its parent directory.
    config = recipes.deit_augment(recipes.imagenet(args.model))
    root, split = os.path.split(folder)
    config.input.update(dataset=f"folder:{root}", train_split=split, eval_splits=(split,))
    config.batch_size = 8
    exp = loop.setup(config)
    data, transform = exp.train_split.data, exp.train_preprocess
    n = len(data)
    sizes = [os.path.getsize(os.path.join(folder, f)) for f, _ in data.data.files]
    print(
        f"folder: {folder} ({n} images, mean {statistics.mean(sizes) / 1024:.0f} KiB); "
        f"{os.cpu_count()} CPU cores; jax {jax.__version__} on {jax.devices()[0].platform}"
    )

    one_core = []
    for r in range(args.repeats):
        start = time.perf_counter()
        for i in range(n):
            transform(data[i], np.random.default_rng([r, i]))
        one_core.append(n / (time.perf_counter() - start))
    print(
        f"1 thread (decode + augment): median {statistics.median(one_core):.1f} img/s per core "
        f"(runs: {', '.join(f'{x:.1f}' for x in one_core)})"
    )

    batch = 32
    iterator = pipeline.train_iterator(
        data, batch_size=batch, preprocess=transform, seed=0, num_threads=args.threads, prefetch_batches=2
    )
    next(iterator)  # start the reader threads
    grain_runs = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        for _ in range(max(1, n // batch)):
            next(iterator)
        grain_runs.append(max(1, n // batch) * batch / (time.perf_counter() - start))
    median = statistics.median(grain_runs)
    print(
        f"grain, {args.threads} threads: median {median:.1f} img/s = {median / os.cpu_count():.1f} img/s per core "
        f"(runs: {', '.join(f'{x:.1f}' for x in grain_runs)})"
    )


if __name__ == "__main__":
    main()
