"""The embedded dataset: scikit-learn's 1,797 handwritten 8x8 digits as a tfds dataset builder.

E. Alpaydin, C. Kaynak, "Optical Recognition of Handwritten Digits", UCI ML repository (1998);
scikit-learn ships the test half as ``sklearn.datasets.load_digits``. Exposing it as a tfds
builder lets the trainer read it exactly like ImageNet (``tfds.data_source`` over ArrayRecord
files) with no download: the builder writes the files into ``data_dir`` on first use.

Images are 8x8x1 uint8 (sklearn's 0..16 intensities scaled to 0..255 and rounded); labels 0..9.
The split is fixed: a seed-0 permutation puts 360 images (20%) in ``test`` and 1,437 in ``train``.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

NUM_TEST = 360


class JvitDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's 8x8 digits (1,437 train / 360 test), built locally from the bundled copy."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "sklearn load_digits, seed-0 20% test split."}

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(num_classes=10),
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: scikit-learn bundles the data
        from sklearn.datasets import load_digits

        digits = load_digits()
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        labels = digits.target.astype(np.int64)
        order = np.random.default_rng(0).permutation(len(labels))
        test, train = np.sort(order[:NUM_TEST]), np.sort(order[NUM_TEST:])
        return {
            "train": self._generate_examples(images, labels, train),
            "test": self._generate_examples(images, labels, test),
        }

    def _generate_examples(self, images, labels, indices):
        for i in indices:
            yield int(i), {"image": images[i], "label": int(labels[i])}


def prepare(data_dir: str | None = None) -> JvitDigits:
    """The builder with its ArrayRecord files written into ``data_dir`` (tfds's default if None)."""
    builder = JvitDigits(data_dir=data_dir, file_format="array_record")
    builder.download_and_prepare()
    return builder
