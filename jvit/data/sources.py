"""Random-access data sources for one split: tfds datasets (ArrayRecord) and mock data.

A source is any sequence of examples ``{"image": uint8 [H, W, C], "label": int, ...}`` with
``len``; grain reads it by index, which is what makes the input order a pure function of the seed
and the position.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from jvit.train.config import ConfigError


@dataclasses.dataclass(frozen=True)
class Split:
    """An opened split: its examples (random access) and the dataset's number of classes."""

    data: Sequence[dict[str, Any]]
    num_classes: int


class MockSource:
    """``num_examples`` random uint8 images ``[size, size, 3]`` with random labels.

    Example ``i`` is a pure function of ``(seed, i)``, so mock runs resume exactly like real ones.
    For tests and for starting a full-size model with no dataset at hand.
    """

    def __init__(self, num_examples: int, num_classes: int, size: int, seed: int):
        self.num_examples, self.num_classes, self.size, self.seed = num_examples, num_classes, size, seed

    def __len__(self) -> int:
        return self.num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_examples:
            raise IndexError(f"mock example {index} out of range [0, {self.num_examples})")
        rng = np.random.default_rng([self.seed, index])
        image = rng.integers(0, 256, (self.size, self.size, 3), dtype=np.uint8)
        return {"image": image, "label": int(rng.integers(self.num_classes))}


def open_split(input_config: Any, split: str, *, train: bool, img_size: int, seed: int) -> Split:
    """Open ``split`` of ``input_config.dataset``.

    * ``'mock'``: :class:`MockSource` (``mock_train_examples`` / ``mock_eval_examples`` images).
    * ``'jvit_digits'``: the embedded digits, written into ``data_dir`` on first use.
    * any other name: ``tfds.data_source(name, split, data_dir)``; the dataset must already be
      prepared in ArrayRecord format there.
    """
    name = input_config.dataset
    if name == "mock":
        n = input_config.mock_train_examples if train else input_config.mock_eval_examples
        # Different seeds keep the mock train and eval splits apart.
        return Split(MockSource(n, input_config.mock_num_classes, img_size, seed + (0 if train else 1)),
                     input_config.mock_num_classes)

    import tensorflow_datasets as tfds

    if name == "jvit_digits":
        from jvit.data import digits

        builder = digits.prepare(input_config.data_dir)
    else:
        builder = tfds.builder(name, data_dir=input_config.data_dir)
        if not builder.is_prepared():
            raise ConfigError(
                f"tfds dataset {name!r} is not prepared in {builder.data_dir_root}; prepare it there with "
                f"file_format='array_record' (e.g. `tfds build {name} --file_format=array_record`) or set "
                "config.input.data_dir"
            )
    if split not in builder.info.splits:
        raise ConfigError(f"dataset {name!r} has no split {split!r}; it has: {', '.join(builder.info.splits)}")
    try:
        data = builder.as_data_source(split)
    except Exception as e:  # tfds raises several types for missing ArrayRecord files
        raise ConfigError(
            f"cannot read {name!r} split {split!r} by index ({e}); jvit reads tfds datasets through "
            "tfds.data_source, which needs the dataset prepared with file_format='array_record'"
        ) from e
    label = builder.info.features["label"]
    return Split(data, int(label.num_classes))
