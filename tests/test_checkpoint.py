"""One checkpoint story: a jvit.main run directory, one of its steps and a converted directory all
load with ``jvit.checkpoint.load_variables`` (raw or EMA weights) and feed ``init_from``."""

from __future__ import annotations

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import traverse_util
from test_train import tiny_config

import jvit
import jvit.checkpoint
import jvit.data
from jvit.train import loop
from jvit.train import state as state_lib


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished 6-step tiny HVT run (checkpoints at steps 2, 4, 6; EMA on)."""
    workdir = tmp_path_factory.mktemp("run")
    loop.train_and_evaluate(tiny_config(), str(workdir))
    return workdir


def _saved(workdir, step):
    """The state as the trainer's own test reads it (StandardCheckpointer, no target)."""
    return ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")


def _assert_same(a, b):
    fa, fb = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def test_run_dir_and_step_dir_load_raw_and_ema(run_dir):
    saved6, saved4 = _saved(run_dir, 6), _saved(run_dir, 4)
    raw, meta = jvit.checkpoint.load_variables(run_dir)
    _assert_same(raw, {"params": saved6["params"], **saved6["collections"]})
    assert (meta["model"], meta["num_classes"], meta["img_size"], meta["step"]) == ("hvt_ti_1", 5, 16, 6)
    assert meta["model_kwargs"]["patch_size"] == 4 and meta["weights"] == "raw"
    ema, meta = jvit.checkpoint.load_variables(run_dir / "checkpoints" / "4", ema=True)
    _assert_same(ema, {**saved4["collections"], **saved4["ema"]})
    assert meta["step"] == 4 and meta["weights"] == "ema"
    # Raw and EMA weights differ after training, so the choice is real.
    assert not np.allclose(saved6["params"]["head"]["kernel"], saved6["ema"]["params"]["head"]["kernel"])


def test_run_metadata_file_wins_and_model_rebuilds(run_dir, tmp_path):
    names = [f"class{i}" for i in range(5)]
    kwargs = json.loads((run_dir / "config.json").read_text())["model"]["kwargs"]
    path = jvit.checkpoint.write_run_metadata(
        run_dir, model="hvt_ti_1", num_classes=5, img_size=16, classes=names, model_kwargs=kwargs
    )
    try:
        meta = jvit.checkpoint.read_metadata(run_dir / "checkpoints" / "2")
        assert meta["classes"] == names and meta["step"] == 2 and meta["source"] == "jvit.main"
        variables, meta = jvit.checkpoint.load_variables(run_dir)
        model = jvit.checkpoint.create_model(meta)
        logits = model.apply(variables, np.zeros((2, 16, 16, 3), np.float32))
        assert logits.shape == (2, 5) and np.isfinite(logits).all()
    finally:
        (run_dir / "jvit.json").unlink()
    assert path.endswith("jvit.json")
    with pytest.raises(ValueError, match="3 class names"):
        jvit.checkpoint.write_run_metadata(tmp_path, model="hvt_ti_1", num_classes=5, img_size=16, classes=names[:3])


def test_init_from_run_dir(run_dir):
    config = tiny_config(init_from=str(run_dir), init_weights_key="ema")
    loaded = state_lib.load_pretrained(config)
    _assert_same(loaded, {**_saved(run_dir, 6)["collections"], **_saved(run_dir, 6)["ema"]})


def test_not_a_checkpoint_and_ema_of_converted(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a jvit checkpoint"):
        jvit.checkpoint.load_variables(tmp_path)
    variables = {"params": {"w": np.ones(3, np.float32)}}
    jvit.checkpoint.save_variables(tmp_path / "conv", variables, {"model": "hvt_ti_1"})
    with pytest.raises(ValueError, match="one set of weights"):
        jvit.checkpoint.load_variables(tmp_path / "conv", ema=True)
    _assert_same(jvit.checkpoint.load_variables(tmp_path / "conv")[0], variables)


def test_predict_on_a_run_dir_uses_the_runs_weights(run_dir, tmp_path, capsys):
    from PIL import Image

    from jvit import predict

    image = tmp_path / "x.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (24, 20, 3), dtype=np.uint8)).save(image)
    assert predict.main([str(image), "--weights", str(run_dir / "checkpoints" / "4"), "--ema", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    variables, meta = jvit.checkpoint.load_variables(run_dir / "checkpoints" / "4", ema=True)
    x = jvit.data.eval_transform(
        "hvt_ti_1",
        img_size=16,
        crop_pct=meta["crop_pct"],
        mean=meta["mean"],
        std=meta["std"],
        interpolation=meta["interpolation"],
    )(image)
    probs = np.asarray(jax.nn.softmax(jvit.checkpoint.create_model(meta).apply(variables, x[None])))[0]
    assert [t["index"] for t in row["topk"]] == np.argsort(-probs).tolist()
    assert row["topk"][0]["label"] == f"class {row['topk'][0]['index']}"
    np.testing.assert_allclose([t["prob"] for t in row["topk"]], np.sort(probs)[::-1], rtol=1e-5)
