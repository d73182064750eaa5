"""Random-access data sources for one split: tfds datasets, image folders, the embedded digits, mock data.

A source is a sequence of examples with ``len``; grain reads it by index, which is what makes the
input order a pure function of the seed and the position. Raw sources return ``{"image": encoded
bytes or uint8 array, "label": int, ...}``; :class:`DecodedSource` turns them into the form the
transforms take (an RGB ``PIL.Image``, the label, optionally the ReaL label set or a token-label
score map) and applies the bad-input policy:

* a file that cannot be decoded (corrupt, truncated, not an image) is **skipped in training**:
  the example is replaced by the next readable one of the split (so labels always match their
  images and the order stays a function of the seed), and every skip is counted and logged with
  the file name. More than ``MAX_CONSECUTIVE_BAD`` unreadable files in a row stops the run.
  **In evaluation** it is an error naming the file: a skipped eval image would change the score.
* entries named like images that are not readable files (broken symlinks, directories, files
  without read permission) are found when the folder is listed (:mod:`jvit.data.files`) and follow
  the same policy: skipped and logged in training, an error naming them in evaluation. A
  decompression bomb (a header claiming more pixels than PIL allows) counts as undecodable.
* grayscale, palette, CMYK and RGBA images are converted to RGB, as the originals' PIL loader does.
* a missing dataset directory, a missing split, an empty class folder or an unprepared tfds
  dataset is a :class:`~jvit.errors.ConfigError` naming what is missing.

Dataset strings (``config.input.dataset``): ``'mock'``, ``'jvit_digits'``, ``'folder:PATH'`` (the
``PATH/<split>/<class>/<image>`` layout, class names sorted) or a tfds name.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from jvit.data import files as data_files
from jvit.errors import ConfigError, CorruptImageError

log = logging.getLogger("jvit.data")

# Extensions read from an image folder (torchvision's IMG_EXTENSIONS); other files are ignored.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MAX_CONSECUTIVE_BAD = 10
FOLDER_PREFIX = "folder:"


@dataclasses.dataclass(frozen=True)
class Split:
    """An opened split.

    Attributes:
      data: the decoded examples (random access), see :class:`DecodedSource`.
      num_classes: classes of the dataset's label space.
      name: ``'<dataset>:<split>'``, for messages.
      class_subset: for test sets covering part of the label space (ImageNet-A: 200 of the 1000
        ImageNet classes) the class ids a prediction is restricted to; ``None`` = all.
      multi_label: ReaL-style evaluation (``label_set`` per example; accuracy counts a prediction
        in the set and ignores examples whose set is empty).
      class_names: the label space's class names in label order (folder names, tfds label names),
        ``None`` where the dataset has none (mock data).
    """

    data: Sequence[dict[str, Any]]
    num_classes: int
    name: str = ""
    class_subset: tuple[int, ...] | None = None
    multi_label: bool = False
    class_names: tuple[str, ...] | None = None


# -------------------------------------------------------------------------------------------------
# Raw sources
# -------------------------------------------------------------------------------------------------


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


class ImageFolder:
    """The files of ``root/<class>/<image>`` (torchvision ``ImageFolder`` layout), read by index.

    Classes are ``classes`` (the training split's sorted folder names, so every split of a
    dataset shares one label space); files are in sorted order per class. Examples are
    ``{"image": bytes, "label": int, "file_name": str, "class_name": str}``; decoding happens in
    :class:`DecodedSource`, so a corrupt file costs nothing until it is read.
    """

    def __init__(self, root: str, classes: Sequence[str]):
        self.root, self.classes = root, tuple(classes)
        index = {c: i for i, c in enumerate(self.classes)}
        present = _class_dirs(root)
        unknown = sorted(set(present) - set(index))
        if unknown:
            raise ConfigError(f"{root} has class folders the training split does not have: {', '.join(unknown[:10])}")
        self.files: list[tuple[str, int]] = []
        self.unusable: list[tuple[str, str]] = []  # (class/name, why): see jvit.data.files
        for name in present:
            files, bad = data_files.list_images(os.path.join(root, name), IMAGE_EXTENSIONS)
            self.unusable += [(os.path.join(name, f), why) for f, why in bad]
            if not files:
                raise ConfigError(
                    f"class folder {os.path.join(root, name)} has no image files "
                    f"(looked for {', '.join(IMAGE_EXTENSIONS)}); remove it or add its images"
                )
            self.files += [(os.path.join(name, f), index[name]) for f in files]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self.files[index]
        data = data_files.read_file(os.path.join(self.root, path))
        class_name, file_name = os.path.split(path)
        return {"image": data, "label": label, "file_name": file_name, "class_name": class_name}


def _class_dirs(root: str) -> list[str]:
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


# -------------------------------------------------------------------------------------------------
# Decoding and the bad-input policy
# -------------------------------------------------------------------------------------------------


def decode_image(image: Any, name: str = "") -> Image.Image:
    """An RGB ``PIL.Image`` from encoded bytes or a uint8 ``[H, W]`` / ``[H, W, 1|3]`` array.

    Grayscale, palette, CMYK and alpha images are converted with PIL's ``convert('RGB')`` (the
    originals' ``pil_loader``). Undecodable or truncated data raises :class:`CorruptImageError`.
    """
    if isinstance(image, (bytes, bytearray, np.bytes_)) or (isinstance(image, np.ndarray) and image.dtype == object):
        try:
            with Image.open(io.BytesIO(bytes(image))) as im:
                im.load()  # decode now: truncated files raise here rather than later in a transform
                return im.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise CorruptImageError(f"cannot decode image {name or '(unnamed)'}: {e}") from e
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] != 3):
        raise CorruptImageError(
            f"image {name or '(unnamed)'} is a {array.dtype} array of shape {array.shape}; "
            "expected uint8 [H, W], [H, W, 1] or [H, W, 3]"
        )
    return Image.fromarray(array).convert("RGB")


class DecodedSource:
    """Wraps a raw source: decodes images, attaches what the labels need, applies the bad-input policy.

    Each example becomes ``{"image": PIL RGB, "label": int}`` plus ``"label_set"`` (bool
    ``[num_classes]``) for multi-label (ReaL) splits and ``"score_map"`` (float32 ``[2, k, S', S']``)
    when token labels are configured (``token_labels``).

    Args:
      data: the raw source.
      name: the split's name for messages.
      skip_corrupt: replace undecodable examples by the next readable one (train) instead of
        raising (eval).
      label_key / label_set_key: which fields hold the label and the ReaL label list.
      num_classes: size of ``label_set``.
      token_labels: a :class:`TokenLabelMaps` or ``None``.
    """

    def __init__(
        self,
        data: Sequence[dict[str, Any]],
        *,
        name: str,
        skip_corrupt: bool,
        num_classes: int,
        label_key: str = "label",
        label_set_key: str | None = None,
        token_labels: TokenLabelMaps | None = None,
    ):
        self.data, self.name, self.skip_corrupt, self.num_classes = data, name, skip_corrupt, num_classes
        self.label_key, self.label_set_key, self.token_labels = label_key, label_set_key, token_labels
        self._lock = threading.Lock()
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for attempt in range(MAX_CONSECUTIVE_BAD + 1):
            where = f"{self.name} #{(index + attempt) % len(self.data)}"
            try:
                raw = self.data[(index + attempt) % len(self.data)]  # inside: a file can fail to read (files.py)
                where = _describe(raw, self.name, (index + attempt) % len(self.data))
                image = decode_image(raw["image"], where)
            except CorruptImageError as e:
                if not self.skip_corrupt:
                    raise CorruptImageError(f"{e}. Evaluation scores every example: remove or replace the file") from e
                with self._lock:
                    self.skipped += 1
                    count = self.skipped
                log.warning(
                    "skipping unreadable training image (%d so far), using the next example instead: %s", count, e
                )
                continue
            return self._example(raw, image)
        raise CorruptImageError(
            f"{MAX_CONSECUTIVE_BAD + 1} consecutive unreadable images in {self.name} from index "
            f"{index}; the dataset looks broken (last: {where})"
        )

    def _example(self, raw: dict[str, Any], image: Image.Image) -> dict[str, Any]:
        example = {"image": image, "label": int(raw[self.label_key])}
        if self.label_set_key:
            label_set = np.zeros(self.num_classes, bool)
            label_set[np.asarray(raw[self.label_set_key], np.int64)] = True
            example["label_set"] = label_set
        if self.token_labels is not None:
            example["score_map"] = self.token_labels.load(raw, example["label"])
        return example


def _describe(raw: dict[str, Any], split: str, index: int) -> str:
    name = raw.get("file_name")
    if isinstance(name, bytes):
        name = name.decode()
    if "class_name" in raw:
        name = os.path.join(raw["class_name"], name)
    return f"{split} #{index}" + (f" ({name})" if name else "")


class TokenLabelMaps:
    """Dense token-label score maps in the original's format (LV-ViT ``generate_label.py``).

    One file per training image, ``<root>/<class folder>/<file stem>.pt`` (or ``.npy``): a
    ``[2, k, S', S']`` array of the teacher's top-k logits and their class ids (float). The class
    folder is the image's folder for image folders and the class name (the WordNet id) for tfds
    ImageNet. ``.pt`` files need torch (read with ``weights_only=True``); ``.npy`` files do not.
    A missing map is an error naming the file (never a silently wrong target).
    """

    def __init__(self, root: str, class_names: Sequence[str] | None):
        if not os.path.isdir(root):
            raise ConfigError(f"input.token_label_dir={root!r} is not a directory")
        self.root, self.class_names = root, class_names

    def path_stem(self, raw: dict[str, Any], label: int) -> str:
        file_name = raw.get("file_name")
        if file_name is None:
            raise ConfigError("token labels need each example's file name; this dataset has no 'file_name' field")
        if isinstance(file_name, bytes):
            file_name = file_name.decode()
        class_dir = raw.get("class_name") or (self.class_names[label] if self.class_names else str(label))
        # The original names the map after the file name up to its first '.'.
        return os.path.join(self.root, class_dir, os.path.basename(file_name).split(".")[0])

    def load(self, raw: dict[str, Any], label: int) -> np.ndarray:
        stem = self.path_stem(raw, label)
        if os.path.exists(stem + ".npy"):
            score_map = np.load(stem + ".npy")
        elif os.path.exists(stem + ".pt"):
            import torch

            score_map = torch.load(stem + ".pt", weights_only=True, map_location="cpu").float().numpy()
        else:
            raise FileNotFoundError(f"no token-label map {stem}.pt or .npy for this training image")
        if score_map.ndim != 4 or score_map.shape[0] != 2 or score_map.shape[2] != score_map.shape[3]:
            raise ValueError(f"token-label map {stem} has shape {score_map.shape}; expected [2, k, S', S']")
        return score_map.astype(np.float32)


# -------------------------------------------------------------------------------------------------
# Opening a split
# -------------------------------------------------------------------------------------------------

# ImageNet-A (Hendrycks et al., "Natural Adversarial Examples", CVPR 2021) covers 200 of the 1000
# ImageNet classes; tfds labels it with ImageNet-1k ids and its paper scores a model by the argmax over
# these 200 logits only. The ids are those of `indices_in_1k` in the authors' eval.py
# (github.com/hendrycks/natural-adv-examples), in tfds/torchvision class order (sorted WordNet ids).
IMAGENET_A_CLASSES = (
    6,
    11,
    13,
    15,
    17,
    22,
    23,
    27,
    30,
    37,
    39,
    42,
    47,
    50,
    57,
    70,
    71,
    76,
    79,
    89,
    90,
    94,
    96,
    97,
    99,
    105,
    107,
    108,
    110,
    113,
    124,
    125,
    130,
    132,
    143,
    144,
    150,
    151,
    207,
    234,
    235,
    254,
    277,
    283,
    287,
    291,
    295,
    298,
    301,
    306,
    307,
    308,
    309,
    310,
    311,
    313,
    314,
    315,
    317,
    319,
    323,
    324,
    326,
    327,
    330,
    334,
    335,
    336,
    347,
    361,
    363,
    372,
    378,
    386,
    397,
    400,
    401,
    402,
    404,
    407,
    411,
    416,
    417,
    420,
    425,
    428,
    430,
    437,
    438,
    445,
    456,
    457,
    461,
    462,
    470,
    472,
    483,
    486,
    488,
    492,
    496,
    514,
    516,
    528,
    530,
    539,
    542,
    543,
    549,
    552,
    557,
    561,
    562,
    569,
    572,
    573,
    575,
    579,
    589,
    606,
    607,
    609,
    614,
    626,
    627,
    640,
    641,
    642,
    643,
    658,
    668,
    677,
    682,
    684,
    687,
    701,
    704,
    719,
    736,
    746,
    749,
    752,
    758,
    763,
    765,
    768,
    773,
    774,
    776,
    779,
    780,
    786,
    792,
    797,
    802,
    803,
    804,
    813,
    815,
    820,
    823,
    831,
    833,
    835,
    839,
    845,
    847,
    850,
    859,
    862,
    870,
    879,
    880,
    888,
    890,
    897,
    900,
    907,
    913,
    924,
    932,
    933,
    934,
    937,
    943,
    945,
    947,
    951,
    954,
    956,
    957,
    959,
    971,
    972,
    980,
    981,
    984,
    986,
    987,
    988,
)
# ImageNet-R (Hendrycks et al., "The Many Faces of Robustness", ICCV 2021): renditions (art, cartoons,
# sketches, ...) of 200 ImageNet classes, labelled by tfds with ImageNet-1k ids and scored by the argmax over
# these 200 logits. The ids are the positions of `imagenet_r_wnids` in `all_wnids` (sorted WordNet ids, the
# tfds/torchvision class order) in the authors' eval.py (github.com/hendrycks/imagenet-r, commit 3131cac).
IMAGENET_R_CLASSES = (
    1,
    2,
    4,
    6,
    8,
    9,
    11,
    13,
    22,
    23,
    26,
    29,
    31,
    39,
    47,
    63,
    71,
    76,
    79,
    84,
    90,
    94,
    96,
    97,
    99,
    100,
    105,
    107,
    113,
    122,
    125,
    130,
    132,
    144,
    145,
    147,
    148,
    150,
    151,
    155,
    160,
    161,
    162,
    163,
    171,
    172,
    178,
    187,
    195,
    199,
    203,
    207,
    208,
    219,
    231,
    232,
    234,
    235,
    242,
    245,
    247,
    250,
    251,
    254,
    259,
    260,
    263,
    265,
    267,
    269,
    276,
    277,
    281,
    288,
    289,
    291,
    292,
    293,
    296,
    299,
    301,
    308,
    309,
    310,
    311,
    314,
    315,
    319,
    323,
    327,
    330,
    334,
    335,
    337,
    338,
    340,
    341,
    344,
    347,
    353,
    355,
    361,
    362,
    365,
    366,
    367,
    368,
    372,
    388,
    390,
    393,
    397,
    401,
    407,
    413,
    414,
    425,
    428,
    430,
    435,
    437,
    441,
    447,
    448,
    457,
    462,
    463,
    469,
    470,
    471,
    472,
    476,
    483,
    487,
    515,
    546,
    555,
    558,
    570,
    579,
    583,
    587,
    593,
    594,
    596,
    609,
    613,
    617,
    621,
    629,
    637,
    657,
    658,
    701,
    717,
    724,
    763,
    768,
    774,
    776,
    779,
    780,
    787,
    805,
    812,
    815,
    820,
    824,
    833,
    847,
    852,
    866,
    875,
    883,
    889,
    895,
    907,
    928,
    931,
    932,
    933,
    934,
    936,
    937,
    943,
    945,
    947,
    948,
    949,
    951,
    953,
    954,
    957,
    963,
    965,
    967,
    980,
    981,
    983,
    988,
)
CLASS_SUBSETS = {"imagenet_a": IMAGENET_A_CLASSES, "imagenet_r": IMAGENET_R_CLASSES}


def parse_split(spec: str, default_dataset: str) -> tuple[str, str]:
    """``'validation'`` -> ``(default_dataset, 'validation')``; ``'imagenet_v2:test'`` ->
    ``('imagenet_v2', 'test')``; ``'folder:/data/x:val'`` -> ``('folder:/data/x', 'val')``."""
    if ":" not in spec:
        return default_dataset, spec
    dataset, split = spec.rsplit(":", 1)
    if not dataset or not split or dataset == "folder":
        raise ConfigError(f"eval split {spec!r} is neither a split name nor '<dataset>:<split>'")
    return dataset, split


def open_split(input_config: Any, spec: str, *, train: bool, img_size: int, seed: int) -> Split:
    """Open ``spec`` (a split of ``input_config.dataset``, or ``'<dataset>:<split>'``) for training
    (corrupt images skipped, token labels attached when configured) or evaluation.

    * ``'mock'``: :class:`MockSource` (``mock_train_examples`` / ``mock_eval_examples`` images).
    * ``'jvit_digits'``: the embedded digits, written into ``data_dir`` on first use.
    * ``'folder:PATH'``: :class:`ImageFolder` on ``PATH/<split>``; classes from ``PATH/<train_split>``.
    * any other name: ``tfds`` ``data_source`` over ArrayRecord files in ``data_dir``; with
      ``input.prepare`` an unprepared dataset is downloaded/built first (``manual_dir`` for the
      datasets that need manual downloads, e.g. ``imagenet2012``).
    """
    dataset, split = parse_split(spec, input_config.dataset)
    name = f"{dataset}:{split}"
    token_dir = input_config.token_label_dir if train else ""
    if dataset == "mock":
        if token_dir:
            raise ConfigError(
                "input.token_label_dir needs a dataset with file names (a folder or tfds ImageNet), not mock"
            )
        n = input_config.mock_train_examples if train else input_config.mock_eval_examples
        k = input_config.mock_num_classes
        # Different seeds keep the mock train and eval splits apart.
        raw = MockSource(n, k, img_size, seed + (0 if train else 1))
        return Split(DecodedSource(raw, name=name, skip_corrupt=train, num_classes=k), k, name)
    if dataset.startswith(FOLDER_PREFIX):
        return _open_folder(dataset[len(FOLDER_PREFIX) :], split, input_config, train=train, name=name)
    return _open_tfds(dataset, split, input_config, train=train, name=name, token_dir=token_dir)


def _open_folder(root: str, split: str, input_config: Any, *, train: bool, name: str) -> Split:
    root = os.path.expanduser(root)
    if not os.path.isdir(root):
        raise ConfigError(f"dataset directory {root!r} does not exist (input.dataset='folder:{root}')")
    train_dir = os.path.join(root, input_config.train_split)
    split_dir = os.path.join(root, split)
    for d in (train_dir, split_dir):
        if not os.path.isdir(d):
            have = ", ".join(_class_dirs(root)) or "nothing"
            raise ConfigError(f"{d!r} does not exist; {root} has: {have} (expected {root}/<split>/<class>/<image>)")
    classes = _class_dirs(train_dir)
    if not classes:
        raise ConfigError(f"{train_dir} has no class folders (expected {train_dir}/<class>/<image>)")
    raw = ImageFolder(split_dir, classes)
    data_files.apply_policy(raw.unusable, root=split_dir, train=train, split=name)
    if not len(raw):
        raise ConfigError(f"{split_dir} has no images")
    tokens = TokenLabelMaps(input_config.token_label_dir, classes) if train and input_config.token_label_dir else None
    data = DecodedSource(raw, name=name, skip_corrupt=train, num_classes=len(classes), token_labels=tokens)
    return Split(data, len(classes), name, class_names=tuple(classes))


def _open_tfds(dataset: str, split: str, input_config: Any, *, train: bool, name: str, token_dir: str) -> Split:
    import tensorflow_datasets as tfds

    if dataset == "jvit_digits":
        from jvit.data import digits

        builder = digits.prepare(input_config.data_dir)
    else:
        try:
            builder = tfds.builder(dataset, data_dir=input_config.data_dir, file_format="array_record")
        except tfds.core.registered.DatasetNotFoundError as e:
            raise ConfigError(
                f"input dataset {dataset!r} is not a tfds dataset, 'folder:PATH', 'jvit_digits' or 'mock': {e}"
            ) from e
        if not builder.is_prepared():
            if not input_config.prepare:
                raise ConfigError(
                    f"tfds dataset {dataset!r} is not prepared in {builder.data_dir_root}; set "
                    "--config.input.prepare=True to build it there (with --config.input.manual_dir for manually "
                    f"downloaded data such as imagenet2012), or run `tfds build {dataset} --file_format=array_record`, "
                    "or point config.input.data_dir at a prepared copy"
                )
            _prepare(builder, input_config.manual_dir)
    if split not in builder.info.splits:
        raise ConfigError(f"dataset {dataset!r} has no split {split!r}; it has: {', '.join(builder.info.splits)}")
    features = builder.info.features
    decoders = {"image": tfds.decode.SkipDecoding()} if "image" in features else None
    try:
        # Images stay encoded: PIL decodes them, as the originals' loaders do.
        raw = builder.as_data_source(split, decoders=decoders)
    except Exception as e:  # tfds raises several types for missing ArrayRecord files
        raise ConfigError(
            f"cannot read {dataset!r} split {split!r} by index ({e}); jvit reads tfds datasets through "
            "tfds.data_source, which needs the dataset prepared with file_format='array_record'"
        ) from e
    multi_label = "real_label" in features  # imagenet2012_real: ReaL label sets beside the original label
    label_key = "original_label" if multi_label else "label"
    label = features[label_key]
    names = list(label.names) if getattr(label, "names", None) else None
    tokens = TokenLabelMaps(token_dir, names) if token_dir else None
    subset = CLASS_SUBSETS.get(dataset.split("/")[0])
    data = DecodedSource(
        raw,
        name=name,
        skip_corrupt=train,
        num_classes=int(label.num_classes),
        label_key=label_key,
        label_set_key="real_label" if multi_label else None,
        token_labels=tokens,
    )
    return Split(
        data,
        int(label.num_classes),
        name,
        class_subset=subset,
        multi_label=multi_label,
        class_names=tuple(names) if names else None,
    )


def _prepare(builder: Any, manual_dir: str | None) -> None:
    import tensorflow_datasets as tfds

    log.info(
        "preparing tfds dataset %s in %s (ArrayRecord); this can take long for large datasets",
        builder.name,
        builder.data_dir_root,
    )
    config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    try:
        builder.download_and_prepare(download_config=config, file_format="array_record")
    except AssertionError as e:  # tfds signals missing manual downloads with an AssertionError
        raise ConfigError(f"cannot prepare {builder.name!r}: {e}") from e
