"""SavedModel export through jax2tf reproduces jvit's logits (uint8 input, fixed batch)."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tensorflow as tf

import jvit
import jvit.checkpoint
import jvit.data
from jvit import export
from jvit.data import inference

TINY = {"patch_size": 4, "num_heads": 2, "head_dim": 8, "num_blocks": 2, "pool_block_width": 1}


def test_saved_model_reproduces_logits(tmp_path):
    model = jvit.create_model("hvt_ti_1", num_classes=7, img_size=16, **TINY)
    variables = jax.device_get(model.init(jax.random.key(0), np.zeros((1, 16, 16, 3), np.float32)))
    cfg = jvit.data.eval_transform("hvt_ti_1", img_size=16)
    rng = np.random.default_rng(0)
    for batch in (1, 3):
        path = export.to_saved_model(model, variables, tmp_path / f"sm{batch}", cfg, batch_size=batch)
        serve = tf.saved_model.load(path).signatures["serving_default"]
        images = rng.integers(0, 256, (batch, 16, 16, 3), dtype=np.uint8)
        out = serve(images=tf.constant(images))
        expected = model.apply(variables, inference.normalize(images, cfg.mean, cfg.std))
        np.testing.assert_allclose(out["logits"].numpy(), expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(out["probabilities"].numpy(), jax.nn.softmax(expected), atol=1e-6)
    with pytest.raises(FileExistsError):
        export.to_saved_model(model, variables, path, cfg)


def test_export_cli_on_a_converted_dir(tmp_path, capsys):
    model = jvit.create_model("hvt_ti_1", num_classes=3, img_size=16, **TINY)
    variables = jax.device_get(model.init(jax.random.key(1), np.zeros((1, 16, 16, 3), np.float32)))
    jvit.checkpoint.save_variables(
        tmp_path / "conv", variables, {"model": "hvt_ti_1", "num_classes": 3, "img_size": 16, "model_kwargs": TINY}
    )
    args = ["--weights", str(tmp_path / "conv"), "--output", str(tmp_path / "sm")]
    assert export.main([*args, "--batch-size", "2"]) == 0
    serve = tf.saved_model.load(str(tmp_path / "sm")).signatures["serving_default"]
    assert serve.structured_outputs["logits"].shape.as_list() == [2, 3]
    assert export.main(args) == 1
    assert "already exists" in capsys.readouterr().err
