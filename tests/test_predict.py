"""``jvit predict``, the public eval transform and the shipped ImageNet class names."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import jvit
import jvit.checkpoint
import jvit.data
from jvit import predict
from jvit.data import augment, inference

TINY = {"patch_size": 4, "num_heads": 2, "head_dim": 8, "num_blocks": 2, "pool_block_width": 1}
NAMES = ["ant", "bee", "cat", "dog", "eel"]


def _images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        size = (20 + 3 * i, 17 + i)
        paths.append(folder / f"img{i}.png")
        Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)).save(paths[-1])
    return paths


@pytest.fixture
def converted(tmp_path):
    """A converted dir of a tiny 5-class HVT (16 px) with class names, and its (model, variables)."""
    model = jvit.create_model("hvt_ti_1", num_classes=5, img_size=16, **TINY)
    variables = jax.device_get(model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32)))
    jvit.checkpoint.save_variables(
        tmp_path / "conv",
        variables,
        {"model": "hvt_ti_1", "num_classes": 5, "img_size": 16, "classes": NAMES, "model_kwargs": TINY},
    )
    return tmp_path / "conv", model, variables


def test_predict_json_matches_the_model_on_the_eval_transform(converted, tmp_path, capsys):
    directory, model, variables = converted
    paths = _images(tmp_path / "imgs", 3)
    assert (
        predict.main(
            [str(tmp_path / "imgs"), "--weights", str(directory), "--json", "--topk", "3", "--batch-size", "2"]
        )
        == 0
    )
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["image"] for r in rows] == [str(p) for p in paths]
    cfg = jvit.get_pretrained_cfg("hvt_ti_1")
    for row, path in zip(rows, paths):
        crop = augment.eval_transform(Image.open(path).convert("RGB"), 16, cfg.crop_pct, cfg.interpolation)
        x = (crop / 255.0 - np.array(cfg.mean)) / np.array(cfg.std)
        probs = np.asarray(jax.nn.softmax(model.apply(variables, x[None].astype(np.float32))))[0]
        expected = np.argsort(-probs)[:3]
        assert [t["index"] for t in row["topk"]] == expected.tolist()
        assert [t["label"] for t in row["topk"]] == [NAMES[i] for i in expected]
        np.testing.assert_allclose([t["prob"] for t in row["topk"]], probs[expected], rtol=1e-5, atol=1e-6)


def test_expand_images_globs_and_errors(tmp_path):
    paths = _images(tmp_path / "a", 2) + _images(tmp_path / "a" / "sub", 1)
    assert predict.expand_images([str(tmp_path / "a")]) == sorted(map(str, paths))
    assert predict.expand_images([str(tmp_path / "a" / "*.png")]) == sorted(map(str, paths[:2]))
    with pytest.raises(FileNotFoundError, match="no such image"):
        predict.expand_images([str(tmp_path / "nothing*.jpg")])


def test_predict_reports_clear_errors(converted, tmp_path, capsys):
    directory, _, _ = converted
    image = _images(tmp_path / "i", 1)[0]
    assert predict.main([str(image), "--weights", str(directory), "--model", "sovit_7"]) == 1
    assert "holds 'hvt_ti_1' weights" in capsys.readouterr().err
    assert predict.main([str(image), "--model", "stvit_small", "--cache-dir", str(tmp_path)]) == 1
    assert "drive.google.com" in capsys.readouterr().err


def test_eval_transform_is_the_variants_own():
    t = jvit.data.eval_transform("stvit_small", img_size=384)
    assert (t.img_size, t.crop_pct, t.interpolation) == (384, 1.0, "bicubic")
    assert jvit.data.eval_transform("spvit_s").crop_pct == 0.9
    image = np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8)
    out = jvit.data.eval_transform("hvt_s_1")(image)
    assert out.shape == (224, 224, 3) and out.dtype == np.float32
    crop = augment.eval_transform(Image.fromarray(image), 224, 0.875, "bicubic")
    np.testing.assert_allclose(
        out,
        (crop / 255.0 - np.array(jvit.registry.IMAGENET_MEAN)) / np.array(jvit.registry.IMAGENET_STD),
        rtol=1e-6,
        atol=1e-6,
    )


def test_imagenet_names_follow_tfds_label_order():
    import tensorflow_datasets as tfds  # its label file is the independent source of the index order

    labels = Path(tfds.__file__).parent / "datasets" / "imagenet2012" / "labels.txt"
    assert inference.imagenet_wnids() == tuple(labels.read_text().split())
    names = jvit.data.imagenet_class_names()
    assert len(names) == 1000 and names[0] == "tench" and names[999] == "toilet tissue"


def test_console_entry_point_runs_as_module(converted, tmp_path):
    directory, _, _ = converted
    image = _images(tmp_path / "i", 1)[0]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(
        [sys.executable, "-m", "jvit.cli", "predict", str(image), "--weights", str(directory), "--topk", "2"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert out.splitlines()[0] == str(image) and len(out.splitlines()) == 3


@pytest.mark.slow
def test_predict_full_size_sovit_7_from_a_pth_gives_imagenet_names(tmp_path, capsys):
    """The README's command on the full-size So-ViT-7 (a file in the released layout, random weights)."""
    from parity import case_dir

    pth = case_dir("sovit", "so_vit_7_224") / "checkpoint.pth"
    image = _images(tmp_path / "i", 1)[0]
    assert predict.main(["--model", "sovit_7", "--weights", str(pth), str(image), "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    names = jvit.data.imagenet_class_names()
    assert len(row["topk"]) == 5 and all(t["label"] == names[t["index"]] for t in row["topk"])
    probs = [t["prob"] for t in row["topk"]]
    assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
