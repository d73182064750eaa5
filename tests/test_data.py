"""Input pipelines: image folders end to end, bad input, exact iterator resume, per-host sharding,
eval padding, repeated augmentation and the eval-suite metrics (ReaL, ImageNet-A's 200 classes).

Folders are written by the tests from scikit-learn's two bundled photographs (real JPEGs).
"""

from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_train import load_config

from jvit.data import pipeline, preprocess, sources
from jvit.errors import ConfigError
from jvit.train import config as config_lib
from jvit.train import loop, steps


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    from sklearn.datasets import load_sample_images

    return [Image.fromarray(p) for p in load_sample_images().images]


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **kwargs)
    return buffer.getvalue()


def write_folder(root: Path, photos, layout: dict[str, dict[str, int]], size: int = 48) -> Path:
    """``root/<split>/<class>/img_<i>.jpg`` with ``layout[split][class]`` images each: crops of the
    photos, a different one per file so every image (and its label) is recognisable."""
    k = 0
    for split, classes in layout.items():
        for c, (name, count) in enumerate(sorted(classes.items())):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(count):
                photo = photos[c % len(photos)]
                left, top = 7 * k % 300, 5 * k % 200
                crop = photo.crop((left, top, left + 2 * size, top + size + 3 * (k % 5))).resize((size, size + k % 5))
                (root / split / name / f"img_{i}.jpg").write_bytes(jpeg_bytes(crop))
                k += 1
    return root


# --- folder sources and bad input ------------------------------------------------------------------


def folder_input(root: Path, **overrides):
    c = config_lib.default_config()
    c.input.dataset = f"folder:{root}"
    c.input.eval_splits = ("val",)
    for k, v in overrides.items():
        c.input[k] = v
    return c.input


def test_folder_source_classes_labels_and_decoding(tmp_path, photos):
    root = write_folder(tmp_path, photos, {"train": {"b_cat": 2, "a_dog": 3}, "val": {"b_cat": 1}})
    (root / "train" / "a_dog" / "notes.txt").write_text("not an image")  # ignored
    gray = photos[0].convert("L").crop((0, 0, 40, 30))
    (root / "train" / "b_cat" / "gray.jpg").write_bytes(jpeg_bytes(gray))
    cmyk = photos[1].convert("CMYK").crop((0, 0, 40, 30))
    (root / "train" / "b_cat" / "cmyk.jpg").write_bytes(jpeg_bytes(cmyk))
    split = sources.open_split(folder_input(root), "train", train=True, img_size=16, seed=0)
    assert split.num_classes == 2 and len(split.data) == 7
    files = split.data.data.files
    assert [f for f, _ in files][:3] == [os.path.join("a_dog", f"img_{i}.jpg") for i in range(3)]  # sorted classes
    assert [label for _, label in files] == [0, 0, 0, 1, 1, 1, 1]
    examples = {f: split.data[i] for i, (f, _) in enumerate(files)}
    for example in examples.values():
        assert example["image"].mode == "RGB"
    g = np.asarray(examples[os.path.join("b_cat", "gray.jpg")]["image"])
    assert g.shape == (30, 40, 3) and (g[..., 0] == g[..., 1]).all() and (g[..., 1] == g[..., 2]).all()
    c = np.asarray(examples[os.path.join("b_cat", "cmyk.jpg")]["image"]).astype(int)
    reference = np.asarray(photos[1].crop((0, 0, 40, 30))).astype(int)
    assert np.abs(c - reference).mean() < 12  # a CMYK JPEG comes back as the same picture in RGB
    val = sources.open_split(folder_input(root), "val", train=False, img_size=16, seed=0)
    assert len(val.data) == 1 and val.data[0]["label"] == 1  # b_cat keeps the training split's index


def test_folder_errors_name_what_is_missing(tmp_path, photos):
    with pytest.raises(ConfigError, match="does not exist"):
        sources.open_split(folder_input(tmp_path / "nowhere"), "train", train=True, img_size=16, seed=0)
    root = write_folder(tmp_path / "d", photos, {"train": {"a": 1, "b": 1}})
    with pytest.raises(ConfigError, match=r"val' does not exist.*has: train"):
        sources.open_split(folder_input(root), "val", train=False, img_size=16, seed=0)
    (root / "train" / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"class folder .*empty has no image files"):
        sources.open_split(folder_input(root), "train", train=True, img_size=16, seed=0)
    (root / "train" / "empty").rmdir()
    write_folder(root, photos, {"val": {"a": 1, "zebra": 1}})
    with pytest.raises(ConfigError, match="zebra"):  # a class the training split does not have
        sources.open_split(folder_input(root), "val", train=False, img_size=16, seed=0)
    with pytest.raises(ConfigError, match="neither a split name"):
        sources.parse_split("folder:val", "x")
    assert sources.parse_split("folder:/a/b:val", "x") == ("folder:/a/b", "val")
    assert sources.parse_split("imagenet_v2:test", "x") == ("imagenet_v2", "test")
    assert sources.parse_split("validation", "imagenet2012") == ("imagenet2012", "validation")


def test_corrupt_images_are_skipped_and_counted_in_training_and_fatal_in_eval(tmp_path, photos, caplog):
    root = write_folder(tmp_path, photos, {"train": {"a": 3, "b": 2}, "val": {"a": 2}})
    good = (root / "train" / "a" / "img_1.jpg").read_bytes()
    (root / "train" / "a" / "img_1.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (root / "train" / "b" / "img_0.jpg").write_bytes(b"\xff\xd8 not really a jpeg")  # corrupt
    (root / "val" / "a" / "img_0.jpg").write_bytes(good[: len(good) // 3])
    split = sources.open_split(folder_input(root), "train", train=True, img_size=16, seed=0)
    with caplog.at_level(logging.WARNING, logger="jvit.data"):
        examples = [split.data[i] for i in range(len(split.data))]
    assert split.data.skipped == 2
    named = " ".join(r.getMessage() for r in caplog.records)
    assert os.path.join("a", "img_1.jpg") in named and os.path.join("b", "img_0.jpg") in named
    # Each unreadable file is replaced by the next readable example, with that example's own label.
    files = split.data.data.files
    for i, example in enumerate(examples):
        replacement = {1: 2, 3: 4}.get(i, i)
        reference = Image.open(root / "train" / files[replacement][0]).convert("RGB")
        np.testing.assert_array_equal(np.asarray(example["image"]), np.asarray(reference))
        assert example["label"] == files[replacement][1]
    val = sources.open_split(folder_input(root), "val", train=False, img_size=16, seed=0)
    with pytest.raises(sources.CorruptImageError, match=r"img_0.jpg.*remove or replace"):
        val.data[0]
    # A broken dataset (nothing readable) stops instead of looping.
    for f in (root / "train" / "a").iterdir():
        f.write_bytes(b"garbage")
    for f in (root / "train" / "b").iterdir():
        f.write_bytes(b"garbage")
    broken = sources.open_split(folder_input(root), "train", train=True, img_size=16, seed=0)
    with pytest.raises(sources.CorruptImageError, match="consecutive unreadable"):
        broken.data[0]


def test_folder_dataset_trains_end_to_end_with_the_deit_recipe(tmp_path, photos, capsys):
    """``configs/hvt_ti_1.py:folder:PATH`` (the full DeiT recipe: random-resized crop, flip,
    RandAugment, random erasing, Mixup/CutMix, repeated augmentation, timm eval crop) shrunk to a
    tiny HVT: it trains, evaluates every val image once, and prints the final line."""
    root = write_folder(tmp_path / "data", photos, {"train": {"cat": 10, "dog": 10}, "val": {"cat": 3, "dog": 4}})
    config = load_config("hvt_ti_1", f"folder:{root}")
    assert config.input.dataset == f"folder:{root}" and config.input.eval_splits == ("val",)
    config.model.img_size = 16
    config.model.kwargs.update(patch_size=4, num_heads=2, head_dim=8, num_blocks=2, pool_block_width=1)
    config.update(batch_size=8, eval_batch_size=8, num_train_steps=4, eval_every_steps=0, log_every_steps=2)
    config.input.num_threads = 1
    config.checkpoint.every_steps = 4
    result = loop.train_and_evaluate(config, str(tmp_path / "run"))
    assert result["step"] == 4 and 0 <= result["eval/top1"] <= 1
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["num_classes"] == 2 and saved["input"]["crop_pct"] == 0.875
    assert any(line.startswith("final: step=4 ") for line in capsys.readouterr().out.splitlines())


# --- determinism, resume, hosts ---------------------------------------------------------------------


class IndexedSource:
    """``n`` tiny images whose pixels and label encode their index."""

    def __init__(self, n: int, size: int = 8):
        self.n, self.size = n, size

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": np.full((self.size, self.size, 3), i % 251, np.uint8), "label": i}


def indexed(n: int) -> sources.DecodedSource:
    return sources.DecodedSource(IndexedSource(n), name="indexed", skip_corrupt=True, num_classes=n)


def resize_preprocess(size: int = 8):
    c = config_lib.default_config()
    return preprocess.train_preprocessor(c, img_size=size, mean=(0.5, 0.5, 0.5))


def augment_preprocess(size: int = 16):
    c = load_config("hvt_ti_1")  # the DeiT recipe's host-side transform
    return preprocess.train_preprocessor(c, img_size=size, mean=(0.485, 0.456, 0.406))


def test_iterator_state_restores_the_exact_next_batch(tmp_path, photos):
    root = write_folder(tmp_path, photos, {"train": {"a": 9, "b": 8}})
    data = sources.open_split(folder_input(root), "train", train=True, img_size=16, seed=0).data
    kwargs = dict(batch_size=4, preprocess=augment_preprocess(), seed=3, repeated_aug=3, num_threads=2)
    first = pipeline.train_iterator(data, **kwargs)
    for _ in range(5):  # into the second epoch (17 examples, 4 per batch)
        next(first)
    state = json.loads(json.dumps(first.get_state()))  # what the checkpoint stores
    expected = [next(first) for _ in range(4)]
    restarted = pipeline.train_iterator(data, **kwargs)
    restarted.set_state(state)
    for want in expected:
        got = next(restarted)
        assert set(got) == set(want)
        for k in want:
            np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    other_seed = pipeline.train_iterator(data, **{**kwargs, "seed": 4})
    other_seed.set_state(state)
    assert not np.array_equal(next(other_seed)["image"], expected[0]["image"])


def simulate_host(monkeypatch, host: int, hosts: int = 2):
    monkeypatch.setattr(jax, "process_count", lambda: hosts)
    monkeypatch.setattr(jax, "process_index", lambda: host)


def test_two_hosts_split_every_global_batch_and_cover_eval_once(monkeypatch):
    data, batch = indexed(22), 6
    single = pipeline.train_iterator(data, batch_size=batch, preprocess=resize_preprocess(), seed=1, num_threads=1)
    global_batches = [next(single)["label"] for _ in range(8)]  # 48 positions: into the third epoch
    per_host = []
    for host in range(2):
        simulate_host(monkeypatch, host)
        it = pipeline.train_iterator(data, batch_size=batch, preprocess=resize_preprocess(), seed=1, num_threads=1)
        per_host.append([next(it)["label"] for _ in range(8)])
    for k, want in enumerate(global_batches):
        got = np.empty(batch, int)
        got[0::2], got[1::2] = per_host[0][k], per_host[1][k]  # host i holds positions i, i + 2, ...
        np.testing.assert_array_equal(got, want)
    # Each epoch is a permutation: the first 22 positions hold every example once.
    assert sorted(np.concatenate(global_batches)[:22].tolist()) == list(range(22))

    for n, eval_batch in ((13, 4), (1, 4)):  # uneven shares; with n=1 host 1 has nothing at all
        seen, batches = [], []
        for host in range(2):
            simulate_host(monkeypatch, host)
            out = list(pipeline.eval_batches(indexed(n), batch_size=eval_batch, preprocess=resize_preprocess()))
            batches.append(len(out))
            for b in out:
                assert b["image"].shape == (eval_batch // 2, 8, 8, 3) and b["mask"].shape == (eval_batch // 2,)
                seen += b["label"][b["mask"] == 1].tolist()
        assert batches[0] == batches[1] == pipeline.num_eval_batches(n, eval_batch)
        assert sorted(seen) == list(range(n))  # every example exactly once


def test_eval_batches_pad_the_last_batch_with_masked_rows():
    out = list(pipeline.eval_batches(indexed(13), batch_size=8, preprocess=resize_preprocess()))
    assert len(out) == 2
    np.testing.assert_array_equal(out[1]["mask"], [1] * 5 + [0] * 3)
    np.testing.assert_array_equal(out[1]["label"], list(range(8, 13)) + [0] * 3)
    assert not out[1]["image"][5:].any()


def test_repeated_augmentation_repeats_each_example_with_different_augmentations(tmp_path, photos):
    root = write_folder(tmp_path, photos, {"train": {"a": 6, "b": 6}})
    data = sources.open_split(folder_input(root), "train", train=True, img_size=16, seed=0).data
    it = pipeline.train_iterator(
        data, batch_size=12, preprocess=augment_preprocess(), seed=0, repeated_aug=3, num_threads=1
    )
    epoch = next(it)  # one epoch = 12 positions = 4 examples x 3 copies
    labels = epoch["label"].tolist()
    assert all(labels[3 * j] == labels[3 * j + 1] == labels[3 * j + 2] for j in range(4))
    for j in range(4):
        copies = epoch["image"][3 * j : 3 * j + 3]
        assert not np.array_equal(copies[0], copies[1]) and not np.array_equal(copies[1], copies[2])
    plain = pipeline.train_iterator(indexed(12), batch_size=12, preprocess=resize_preprocess(), seed=0, num_threads=1)
    repeated = pipeline.train_iterator(
        indexed(12), batch_size=12, preprocess=resize_preprocess(), seed=0, repeated_aug=3, num_threads=1
    )
    # The copies are the first examples of the same epoch permutation.
    np.testing.assert_array_equal(next(repeated)["label"], np.repeat(next(plain)["label"][:4], 3))


# --- eval suites --------------------------------------------------------------------------------------


class PixelLogits(nn.Module):
    """Logits = the first ``k`` normalised pixel values of row 0 (lets a test choose the predictions)."""

    k: int

    @nn.compact
    def __call__(self, x, train=False):
        return x[:, 0, : self.k, 0]


def scores(logits: np.ndarray, labels, **extra):
    """eval_step sums for images whose normalised pixels give ``logits`` (mean 0, std 1/255)."""
    b, k = logits.shape
    images = np.zeros((b, 1, k, 3), np.uint8)
    images[:, 0, :, 0] = logits
    batch = {"image": jnp.asarray(images), "label": jnp.asarray(labels), "mask": jnp.ones(b), **extra}
    subset = batch.pop("class_subset", None)
    out = steps.eval_step({}, batch, model=PixelLogits(k), mean=(0, 0, 0), std=(1 / 255, 1, 1), class_subset=subset)
    return {name: float(v) for name, v in out.items()}


def test_imagenet_a_scores_the_argmax_over_its_200_classes():
    subset = sources.CLASS_SUBSETS["imagenet_a"]
    assert len(subset) == 200 == len(set(subset)) and list(subset) == sorted(subset) and subset[-1] < 1000
    logits = np.zeros((2, 10), np.uint8)
    logits[0, [1, 3]] = (9, 5)  # best class 1 is outside the subset {3, 7}: the prediction is 3
    logits[1, [7, 3]] = (4, 2)
    assert scores(logits, [3, 7])["top1"] == 1  # unrestricted: predictions 1 (a miss) and 7
    restricted = scores(logits, [3, 7], class_subset=(3, 7))
    assert restricted["top1"] == 2 and restricted["top5"] == 2


def test_imagenet_r_subset_is_in_the_suite_and_names_its_classes():
    from tensorflow_datasets.datasets.imagenet2012 import imagenet_common

    from jvit import recipes

    subset = sources.CLASS_SUBSETS["imagenet_r"]
    assert len(subset) == 200 == len(set(subset)) and list(subset) == sorted(subset) and subset[-1] < 1000
    assert "imagenet_r:test" in recipes.IMAGENET_SUITE
    with open(imagenet_common.label_names_file()) as f:
        wnids = f.read().split()
    # The ids index tfds's label order: the smallest and largest of the authors' wnids (goldfish, acorn).
    assert [wnids[i] for i in (subset[0], subset[-1])] == ["n01443537", "n12267677"]
    assert sources.IMAGENET_A_CLASSES != subset


def test_real_labels_count_a_prediction_in_the_set_and_skip_unlabelled_images():
    logits = np.zeros((3, 6), np.uint8)
    logits[:, 2] = 9  # every image predicts class 2
    label_set = np.zeros((3, 6), bool)
    label_set[0, [2, 4]] = True  # hit although the original label is 4
    label_set[1, 5] = True  # miss
    out = scores(logits, [4, 5, 2], label_set=jnp.asarray(label_set))  # image 2 has no ReaL labels
    assert (out["count"], out["scored"], out["top1"]) == (3, 2, 1)
    raw = sources.DecodedSource(
        [{"image": np.zeros((4, 4, 3), np.uint8), "original_label": 3, "real_label": [1, 4]}],
        name="real",
        skip_corrupt=False,
        num_classes=6,
        label_key="original_label",
        label_set_key="real_label",
    )
    example = raw[0]
    assert example["label"] == 3 and example["label_set"].tolist() == [False, True, False, False, True, False]
